"""The console front end of 3-eval_chat.py: which checkpoint to load, loading it with one line saying what was
loaded, and answering questions about image files (one question per image of a folder, one question about several
images together, or a chat loop with history). Errors are one line on stderr; the functions return exit codes.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from checkpoints.files import CheckpointError
from checkpoints.vision_pairing import stand_in_warning
from data_pipeline.image_decode import ImageError

from .app_images import open_app_image
from .chat import GenerationSettings, TooManyImagesError, VLMChat
from .model_files import newest_chat_checkpoint

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_IMAGES = "dataset/eval_images"


def choose_checkpoint(args: argparse.Namespace, root: str) -> tuple[Optional[str], bool]:
    """(checkpoint path, whether it was picked automatically): --ckpt; with --dim/--use_moe the v1 default name
    in --out_dir; else the newest SFT checkpoint or model directory in --out_dir or `root`."""
    if args.ckpt:
        return args.ckpt, False
    if args.dim is not None or args.use_moe:
        return os.path.join(args.out_dir, f"{args.dim or 512}{'_moe' if args.use_moe else ''}_vlm_sft.pth"), False
    found = newest_chat_checkpoint(args.out_dir, root)
    return (str(found), True) if found is not None else (None, True)


def load_chat(args: argparse.Namespace, ckpt: Optional[str], picked: bool) -> Optional[VLMChat]:
    """The checkpoint (from choose_checkpoint) with its encoder and tokenizer, as loaded (the CPU kernel is chosen
    afterwards); None after printing a one-line error."""
    if ckpt is None:
        print(f"error: no checkpoint found (no {args.out_dir}/*_vlm_sft.pth and no model directory in {args.out_dir}/ "
              f"or the project root): download the published model with `python scripts/download.py --what model "
              f"--dim 512`, train one with 2-sft_vlm.py or `make demo`, or pass --ckpt", file=sys.stderr)
        return None
    if picked:
        print(f"model: {ckpt} (the newest SFT checkpoint or model directory found; choose another with --ckpt)")
    try:
        chat = VLMChat.load(ckpt, args.clip_path, args.tokenizer_path, args.device, max_seq_len=args.max_seq_len,
                            allow_encoder_mismatch=args.allow_encoder_mismatch, dim=args.dim, n_layers=args.n_layers)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        hint = " (train one with 2-sft_vlm.py or `make demo`)" if not os.path.exists(ckpt) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return None
    note = stand_in_warning(chat.encoder.path)
    if note:
        print(note)
    print(f"model: {ckpt} ({chat.n_params / 1e6:.2f}M parameters) on {args.device}, tokenizer: {chat.tokenizer_path}")
    return chat


def list_images(path: str) -> list[str]:
    """The image files of a folder, sorted (by extension), or the path itself."""
    if os.path.isdir(path):
        return [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.lower().endswith(IMAGE_EXTENSIONS)]
    return [path]


def ask(chat: VLMChat, question: str, images, history, settings: GenerationSettings, stream: bool) -> str:
    """Print and return the answer, streamed piece by piece or printed whole."""
    print("[A]: ", end="", flush=True)
    pieces = []
    for piece in chat.stream(question, images, history, settings):
        pieces.append(piece)
        if stream:
            print(piece, end="", flush=True)
    answer = "".join(pieces)
    print(answer if not stream else "", flush=True)
    return answer


def chat_loop(chat: VLMChat, images: list, settings: GenerationSettings, stream: bool) -> None:
    """Questions from stdin about the same images, with history, until EOF or exit/quit."""
    history: list[tuple[str, str]] = []
    while True:
        try:
            question = input("[Q]: ").strip()
        except EOFError:
            return
        if question.lower() in {"exit", "quit"}:
            return
        if question:
            history.append((question, ask(chat, question, images, history, settings, stream)))


def image_sets(image_args: Optional[Sequence[str]]) -> list[list[str]]:
    """What each question is about: every image of one folder (or one file) on its own, or several --image
    files together in one question."""
    image_args = list(image_args or [DEFAULT_IMAGES])
    if len(image_args) == 1:
        return [[path] for path in list_images(image_args[0])]
    return [image_args]


def answer_images(chat: VLMChat, image_args: Optional[Sequence[str]], prompt: str, settings: GenerationSettings,
                  interactive: bool = False, stream: bool = True) -> int:
    """One question about each image of a folder (or about all --image files together), or a chat loop; a bad
    image is reported in one line and the rest are still answered. More images than one question can take are
    refused in one line before any is decoded, as the web page and the API refuse them (TooManyImagesError)."""
    sets = image_sets(image_args)
    if not sets:
        print(f"error: no images found in {(image_args or [DEFAULT_IMAGES])[0]}", file=sys.stderr)
        return 1
    try:
        chat.check_image_count(len(sets[0]))  # every set holds as many images
    except TooManyImagesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    failures = 0
    for paths in sets:
        try:
            images = [open_app_image(path, generation=chat.generation) for path in paths]
        except ImageError as e:
            print(f"error: {e}", file=sys.stderr)
            failures += 1
            continue
        print(f"[Image]: {', '.join(os.path.basename(path) for path in paths)}")
        if interactive:
            chat_loop(chat, images, settings, stream)
        else:
            print(f"[Q]: {prompt}")
            ask(chat, prompt, images, (), settings, stream)
        print()
    return 1 if failures else 0
