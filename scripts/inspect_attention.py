"""Where does the answer look in the image? Answer a question about an image, then draw the attention from each
answer token to the 50 image positions (CLS + 7x7 patches; a minimind-3v checkpoint: its 64 positions, 8x8 patches),
per layer, and print the same numbers.

    python scripts/inspect_attention.py --ckpt out/128_vlm_sft.pth --clip_path model/clip_model/stand_in_clip_vit_b32 \\
        --image dataset/demo/images/test/test_00003.png --prompt "what shape is in the image?" --out attention.png

The answer is generated greedily by default (--temperature 0), then the prompt and answer are run once more with
the attention written out by hand (inference/attention_map.py); the normal generation path is untouched. Row p of a
heat map is the attention of the position whose output produced answer token p.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from inference.attention_map import inspect_answer  # noqa: E402
from inference.attention_plot import (MAX_TOKENS_DRAWN, attention_figure, attention_table, figure_png,  # noqa: E402
                                      token_texts)
from inference.app_images import open_app_image  # noqa: E402
from inference.chat import GenerationSettings, StreamStats, VLMChat  # noqa: E402
from checkpoints.files import CheckpointError  # noqa: E402
from model.vision import DEFAULT_CLIP_PATH  # noqa: E402
from data_pipeline.image_decode import ImageError, open_image  # noqa: E402
from checkpoints.vision_pairing import stand_in_warning  # noqa: E402
from checkpoints.vision_pairing import add_encoder_mismatch_arg  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a *_vlm_sft.pth (its shape is read off the file)")
    p.add_argument("--image", required=True, help="one image file")
    p.add_argument("--prompt", required=True, help="the question about the image")
    p.add_argument("--out", default="attention.png",
                   help="the PNG to write; a directory (existing, or ending in /) gets <image name>_attention.png")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top_k", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--max_tokens_drawn", type=int, default=8,
                   help=f"per-token heat maps drawn, at most {MAX_TOKENS_DRAWN} (all are printed)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--clip_path", default=DEFAULT_CLIP_PATH)
    add_encoder_mismatch_arg(p)
    p.add_argument("--tokenizer_path", default=None,
                   help="default: the checkpoint's own (as 3-eval_chat.py resolves it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.max_tokens_drawn < 0:
        p.error(f"--max_tokens_drawn must be at least 0, got {args.max_tokens_drawn}")
    return args


def output_path(out: str, image: str) -> str:
    """The PNG to write: --out itself, or <image name>_attention.png inside it when it names a directory."""
    if os.path.isdir(out) or out.endswith(("/", os.sep)):
        return os.path.join(out, f"{os.path.splitext(os.path.basename(image))[0]}_attention.png")
    return out


def write_png(path: str, data: bytes) -> Optional[str]:
    """Write data to path (creating its folder); the one-line reason when that fails."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        return f"cannot write {path}: {e.strerror or e}"
    return None


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    out = output_path(args.out, args.image)
    try:
        image = open_image(args.image)
        chat = VLMChat.load(args.ckpt, args.clip_path, args.tokenizer_path, args.device,
                            allow_encoder_mismatch=args.allow_encoder_mismatch)
        if chat.generation == "3v":  # 3v drops the alpha channel, as upstream does (v1: over white)
            image = open_app_image(args.image, generation="3v")
    except (FileNotFoundError, CheckpointError, ValueError, ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    note = stand_in_warning(args.clip_path)
    if note:
        print(note)
    settings = GenerationSettings(temperature=args.temperature, top_k=args.top_k,
                                  max_new_tokens=args.max_new_tokens, seed=args.seed)
    stats = StreamStats()
    answer = "".join(chat.stream(args.prompt, image, (), settings, stats))
    print(f"[Q]: {args.prompt}\n[A]: {answer}")
    if not stats.completion_ids:
        print("error: the model gave an empty answer (it ended at once): nothing to inspect", file=sys.stderr)
        return 1
    maps = inspect_answer(chat.model, stats.prompt_ids, stats.completion_ids, chat.image_features(image))
    if maps.image_start is None:
        print("error: the prompt holds no image placeholder (the tokenizer's image ids do not match the model's)",
              file=sys.stderr)
        return 1
    tokens = token_texts(chat.tokenizer, stats.completion_ids)
    print(f"\nattention to the image (positions {maps.image_start}..{maps.image_start + maps.image_tokens - 1} of "
          f"{len(stats.prompt_ids)} prompt tokens), mean over heads and answer tokens:")
    print(attention_table(maps, tokens))
    if min(args.max_tokens_drawn, len(tokens)) > MAX_TOKENS_DRAWN:
        print(f"note: drawing the first {MAX_TOKENS_DRAWN} token maps, not {min(args.max_tokens_drawn, len(tokens))} "
              f"(the most one readable figure holds); the table above lists every token")
    failure = write_png(out, figure_png(attention_figure(image, maps, tokens, args.prompt, args.max_tokens_drawn)))
    if failure:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
