"""Chat with a trained MiniMind-V about images.

    python 3-eval_chat.py                      # newest SFT checkpoint or model directory; every image in
                                               # dataset/eval_images, default question, streamed
    python 3-eval_chat.py --ckpt minimind-v-v1-small          # a published Hugging Face directory
    python 3-eval_chat.py --image cat.png --prompt "What is in the picture?"
    python 3-eval_chat.py --image cat.png --interactive          # a chat loop with history
    python 3-eval_chat.py --image a.png --image b.png --prompt "Are they the same colour?"   # several images
    python 3-eval_chat.py --eval_data dataset/demo/test.json --eval_images_path dataset/demo/images/test
    python 3-eval_chat.py --benchmark pope [--bench_path FILE_OR_DIR] [--limit 200]   # or --benchmark mmstar
    python 3-eval_chat.py --image cat.png --quantize int8        # int8 decoder weights on the CPU

On a CPU the decoder's linear layers run on the fastest fp32 kernel path measured at load (--cpu_kernel auto, same
greedy answers as default); --quantize int8 makes them int8 instead. A line after the model line says which.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

from inference.chat import DEFAULT_QUESTION, GenerationSettings, VLMChat
from inference.model_files import newest_chat_checkpoint
from inference.cpu.prepare import add_cpu_inference_args
from checkpoints.files import CheckpointError
from trainer.seed import seed_everything
from model.vision import DEFAULT_CLIP_PATH
from data_pipeline.image_decode import ImageError, open_image
from checkpoints.vision_pairing import stand_in_warning
from checkpoints.vision_pairing import add_encoder_mismatch_arg

ROOT = os.path.dirname(os.path.abspath(__file__))
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None,
                   help="a .pth/.safetensors checkpoint or a Hugging Face model directory (default: with --dim or "
                        "--use_moe, out/{dim}{_moe}_vlm_sft.pth; otherwise the newest out/*_vlm_sft.pth or model "
                        "directory in out/ or the project root)")
    p.add_argument("--out_dir", default="out")
    p.add_argument("--dim", type=int, default=None, help="default 512; the model's size is read off the checkpoint")
    p.add_argument("--n_layers", type=int, default=None)
    p.add_argument("--use_moe", action="store_true")
    p.add_argument("--image", action="append", default=None,
                   help="an image file or a folder of images (each asked about in turn; default "
                        "dataset/eval_images); repeat it to ask about several image files together, in order")
    p.add_argument("--prompt", default=DEFAULT_QUESTION)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--top_k", type=int, default=8)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--max_seq_len", type=int, default=1024, help="context kept for the prompt and history")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--clip_path", default=DEFAULT_CLIP_PATH,
                   help="the vision encoder; it must be the one the checkpoint records (its fingerprint)")
    add_encoder_mismatch_arg(p)
    p.add_argument("--tokenizer_path", default=None,
                   help="default: the checkpoint's own (inside a model directory, recorded beside a .pth, or "
                        "model/minimind_tokenizer_official for a published v1 .pth)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no_stream", action="store_true", help="print each answer whole")
    add_cpu_inference_args(p)
    p.add_argument("--interactive", action="store_true", help="a chat loop with history about the image(s)")
    p.add_argument("--eval_data", default=None, help="score exact-match accuracy over v1 question/answer records")
    p.add_argument("--eval_images_path", default=None, help="image folder for --eval_data")
    p.add_argument("--image_prefix", default="")
    p.add_argument("--eval_limit", type=int, default=None, help="score only the first N questions")
    p.add_argument("--benchmark", choices=("pope", "mmstar"), default=None,
                   help="score a standard benchmark from its parquet files (get them with `python "
                        "scripts/download.py --what bench`)")
    p.add_argument("--bench_path", default=None,
                   help="the benchmark's parquet file or a folder of them (default dataset/bench/<benchmark>)")
    p.add_argument("--limit", type=positive_int, default=None, help="--benchmark: read only the first N rows")
    p.add_argument("--bench_out", default=None,
                   help="--benchmark: the JSON file for the results (default <out_dir>/bench_<benchmark>_<model>.json)")
    p.add_argument("--bench_batch_size", type=positive_int, default=32, help="--benchmark: questions per batch")
    return p.parse_args(argv)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def list_images(path: str) -> list[str]:
    if os.path.isdir(path):
        return [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.lower().endswith(IMAGE_EXTENSIONS)]
    return [path]


def ask(chat: VLMChat, question: str, image, history, settings: GenerationSettings, stream: bool) -> str:
    print("[A]: ", end="", flush=True)
    pieces = []
    for piece in chat.stream(question, image, history, settings):
        pieces.append(piece)
        if stream:
            print(piece, end="", flush=True)
    answer = "".join(pieces)
    print(answer if not stream else "", flush=True)
    return answer


def choose_checkpoint(args: argparse.Namespace) -> tuple[str | None, bool]:
    """(checkpoint path, whether it was picked automatically): --ckpt; with --dim/--use_moe the v1 default name;
    else the newest SFT checkpoint or model directory."""
    if args.ckpt:
        return args.ckpt, False
    if args.dim is not None or args.use_moe:
        return os.path.join(args.out_dir, f"{args.dim or 512}{'_moe' if args.use_moe else ''}_vlm_sft.pth"), False
    found = newest_chat_checkpoint(args.out_dir, ROOT)
    return (str(found), True) if found is not None else (None, True)


def load_chat(args: argparse.Namespace) -> Optional[VLMChat]:
    """The checkpoint picked by --ckpt (or the newest one found) with its encoder and tokenizer, as loaded (see
    prepare_cpu); None after printing a one-line error."""
    ckpt, picked = choose_checkpoint(args)
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
    note = stand_in_warning(args.clip_path)
    if note:
        print(note)
    print(f"model: {ckpt} ({chat.n_params / 1e6:.2f}M parameters) on {args.device}, tokenizer: {chat.tokenizer_path}")
    return chat


def prepare_cpu(chat: VLMChat, args: argparse.Namespace) -> bool:
    """--quantize and --cpu_kernel applied to the loaded model, with the line saying what was done printed under
    the model line; False after a one-line error (e.g. int8 asked for on a GPU)."""
    try:
        print(chat.prepare_cpu(args.quantize, args.cpu_kernel), flush=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return False
    return True


def score(chat: VLMChat, args: argparse.Namespace) -> int:
    """Exact-match accuracy over --eval_data, printed with the per-type breakdown."""
    from evaluation.held_out import answer_accuracy

    images_path = args.eval_images_path or os.path.dirname(args.eval_data)
    try:
        result = answer_accuracy(chat, args.eval_data, images_path, args.image_prefix, args.eval_limit)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(result.lines()))
    return 0


def benchmark_files(args: argparse.Namespace) -> Optional[list[str]]:
    """--benchmark's parquet files, checked before the model is loaded; None after a one-line error."""
    from evaluation.benchmark_data import BenchmarkError, benchmark_files as find_files
    from evaluation.benchmark_specs import BENCHMARKS

    spec = BENCHMARKS[args.benchmark]
    try:
        return find_files(args.bench_path or spec.default_path, spec)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def benchmark(chat: VLMChat, args: argparse.Namespace, files: list[str], weights_sha256: str) -> int:
    """--benchmark: the standard metrics, printed and written to a JSON file with the model's fingerprint
    (weights_sha256: of the weights as loaded, before prepare_cpu converted them)."""
    from evaluation.benchmark_data import BenchmarkError
    from evaluation.benchmark_specs import BENCHMARKS
    from evaluation.benchmarks import model_record, result_record, run_benchmark, summary_lines, write_result

    spec = BENCHMARKS[args.benchmark]
    ckpt, _ = choose_checkpoint(args)
    model_name = os.path.splitext(os.path.basename(os.path.normpath(ckpt)))[0]
    out = args.bench_out or os.path.join(args.out_dir, f"bench_{spec.name}_{model_name}.json")
    try:
        run = run_benchmark(chat, spec, files, args.limit, args.bench_batch_size)
        record = result_record(run, model_record(chat, ckpt, args.clip_path,
                                                 stand_in_warning(args.clip_path) is not None, weights_sha256))
    except (BenchmarkError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(run)))
    try:
        write_result(record, out)
    except OSError as e:
        print(f"error: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"results: {out}")
    return 0


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


def answer_images(chat: VLMChat, args: argparse.Namespace, settings: GenerationSettings) -> int:
    """One question about each image of a folder (or about all --image files together); a bad image is
    reported in one line and the rest are still answered."""
    image_args = args.image or ["dataset/eval_images"]
    if len(image_args) == 1:
        image_sets = [[path] for path in list_images(image_args[0])]  # each image of a folder on its own
    else:
        image_sets = [image_args]  # several --image: one question about all of them
    if not image_sets:
        print(f"error: no images found in {image_args[0]}", file=sys.stderr)
        return 1
    failures = 0
    for paths in image_sets:
        try:
            images = [open_image(path) for path in paths]
        except ImageError as e:
            print(f"error: {e}", file=sys.stderr)
            failures += 1
            continue
        print(f"[Image]: {', '.join(os.path.basename(path) for path in paths)}")
        if args.interactive:
            chat_loop(chat, images, settings, not args.no_stream)
        else:
            print(f"[Q]: {args.prompt}")
            ask(chat, args.prompt, images, (), settings, not args.no_stream)
        print()
    return 1 if failures else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    seed_everything(args.seed)
    files = benchmark_files(args) if args.benchmark else None
    if args.benchmark and files is None:
        return 1
    chat = load_chat(args)
    if chat is None:
        return 1
    weights_sha256 = None
    if files is not None:  # the fingerprint of the weights as loaded: the CPU kernels and int8 replace them
        from evaluation.benchmarks import state_dict_sha256

        weights_sha256 = state_dict_sha256(chat.model)
    if not prepare_cpu(chat, args):
        return 1
    if files is not None:
        return benchmark(chat, args, files, weights_sha256)
    if args.eval_data:
        return score(chat, args)
    settings = GenerationSettings(args.temperature, args.top_k, args.top_p, args.max_new_tokens,
                                  args.repetition_penalty, args.seed)
    return answer_images(chat, args, settings)


if __name__ == "__main__":
    sys.exit(main())
