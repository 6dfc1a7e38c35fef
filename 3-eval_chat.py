"""Chat with a trained MiniMind-V about images, or score it. One job per run, chosen by the flags given:

  answer (default)  one question about each image of a folder or file (default dataset/eval_images), about
                    several --image files together, or a chat loop with --interactive
  held-out          --eval_data: exact-match accuracy on v1 question/answer records
  benchmark         --benchmark pope|mmstar: the standard benchmark from its parquet files

    python 3-eval_chat.py                      # newest SFT checkpoint or model directory; every image in
                                               # dataset/eval_images, default question, streamed
    python 3-eval_chat.py --ckpt minimind-v-v1-small          # a published Hugging Face directory
    python 3-eval_chat.py --image cat.png --prompt "What is in the picture?"
    python 3-eval_chat.py --image cat.png --interactive          # a chat loop with history
    python 3-eval_chat.py --image a.png --image b.png --prompt "Are they the same colour?"   # several images
    python 3-eval_chat.py --eval_data dataset/demo/test.json --eval_images_path dataset/demo/images/test
    python 3-eval_chat.py --benchmark pope [--bench_path FILE_OR_DIR] [--eval_limit 200]   # or --benchmark mmstar
    python 3-eval_chat.py --image cat.png --quantize int8        # int8 decoder weights on the CPU

A flag of another job's group is refused in one line. On a CPU the decoder's linear layers run on the fastest fp32
kernel path measured at load (--cpu_kernel auto, same greedy answers as default); --quantize int8 makes them int8
instead. A line after the model line says which. Reference: docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

from checkpoints.vision_pairing import add_encoder_mismatch_arg
from evaluation.jobs import (BenchmarkInputs, BenchmarkOptions, benchmark_job, check_benchmark, default_result_path,
                             held_out_job)
from inference.chat import DEFAULT_QUESTION, V3_ANSWER_DEFAULTS, GenerationSettings, VLMChat
from inference.console import answer_images, choose_checkpoint, load_chat
from inference.cpu.prepare import add_cpu_inference_args
from model.vision import DEFAULT_CLIP_PATH
from trainer.seed import seed_everything

ROOT = os.path.dirname(os.path.abspath(__file__))
MODEL, ANSWER, HELD_OUT, BENCHMARK = "model", "answer", "held-out", "benchmark"
# How each job is named in a refusal; the model group serves every job.
JOB_NAMES = {ANSWER: "answering questions about images (--image, --prompt, --interactive)",
             HELD_OUT: "held-out evaluation (--eval_data)", BENCHMARK: "a benchmark (--benchmark)"}
SHARED = {"eval_limit": {HELD_OUT, BENCHMARK}}  # flags that serve more than their own group's job


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_model_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--ckpt", default=None,
                       help="a .pth/.safetensors checkpoint or a Hugging Face model directory (default: with --dim "
                            "or --use_moe, out/{dim}{_moe}_vlm_sft.pth; otherwise the newest out/*_vlm_sft.pth or "
                            "model directory in out/ or the project root)")
    group.add_argument("--out_dir", default="out", help="where checkpoints are looked for and results written")
    group.add_argument("--dim", type=int, default=None, help="default 512; the model's size is read off the checkpoint")
    group.add_argument("--n_layers", type=int, default=None)
    group.add_argument("--use_moe", action="store_true")
    group.add_argument("--max_seq_len", type=int, default=1024, help="context kept for the prompt and history")
    group.add_argument("--seed", type=int, default=1337)
    group.add_argument("--clip_path", default=DEFAULT_CLIP_PATH,
                       help="the vision encoder; it must be the one the checkpoint records (its fingerprint)")
    add_encoder_mismatch_arg(group)
    group.add_argument("--tokenizer_path", default=None,
                       help="default: the checkpoint's own (inside a model directory, recorded beside a .pth, or "
                            "the official tokenizer of a published .pth: model/minimind_tokenizer_official for v1, "
                            "model/minimind_3v_tokenizer_official for minimind-3v)")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_cpu_inference_args(group)


def add_answer_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--image", action="append", default=None,
                       help="an image file or a folder of images (each asked about in turn; default "
                            "dataset/eval_images); repeat it to ask about several image files together, in order")
    group.add_argument("--prompt", default=DEFAULT_QUESTION)
    group.add_argument("--interactive", action="store_true", help="a chat loop with history about the image(s)")
    group.add_argument("--no_stream", action="store_true", help="print each answer whole")
    group.add_argument("--temperature", type=float, default=0.5)
    group.add_argument("--top_k", type=int, default=8)
    group.add_argument("--top_p", type=float, default=None)
    group.add_argument("--repetition_penalty", type=float, default=1.0)
    group.add_argument("--max_new_tokens", type=int, default=512)


def add_held_out_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--eval_data", default=None, help="score exact-match accuracy over v1 question/answer records")
    group.add_argument("--eval_images_path", default=None, help="image folder for --eval_data (default its folder)")
    group.add_argument("--image_prefix", default="", help="prefix of the image file names in --eval_data")
    group.add_argument("--eval_limit", type=positive_int, default=None,
                       help="read only the first N questions (records of --eval_data, rows of --benchmark's files; "
                            "a skipped one counts)")


def add_benchmark_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--benchmark", choices=("pope", "mmstar"), default=None,
                       help="score a standard benchmark from its parquet files (get them with `python "
                            "scripts/download.py --what bench`)")
    group.add_argument("--bench_path", default=None,
                       help="the benchmark's parquet file or a folder of them (default dataset/bench/<benchmark>)")
    group.add_argument("--bench_out", default=None,
                       help="the JSON file for the results (default <out_dir>/bench_<benchmark>_<model>.json)")
    group.add_argument("--bench_batch_size", type=positive_int, default=32, help="questions per batch")
    group.add_argument("--limit", dest="limit_alias", type=positive_int, default=None,
                       help=argparse.SUPPRESS)  # the old name of --eval_limit for benchmarks


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The parser, and the job each flag's group serves (by dest)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = [(MODEL, "model loading (every job)", add_model_args),
              (ANSWER, "answering and chat (the default job)", add_answer_args),
              (HELD_OUT, "held-out evaluation (--eval_data)", add_held_out_args),
              (BENCHMARK, "benchmarks (--benchmark)", add_benchmark_args)]
    job_of = {}
    for job, title, add in groups:
        group = parser.add_argument_group(title)
        add(group)
        job_of.update({action.dest: job for action in group._group_actions})
    return parser, job_of


class _NotGiven(list):
    """Marks a flag left off the command line (a list, so that an append flag's copy of it still works)."""


def given_flags(parser: argparse.ArgumentParser, argv: Optional[list[str]]) -> dict[str, str]:
    """{dest: the flag as written} for every flag on the command line (a default value given counts)."""
    marker = _NotGiven()
    parsed = parser.parse_args(argv, namespace=argparse.Namespace(
        **{a.dest: marker for a in parser._actions if a.dest != "help"}))
    return {a.dest: a.option_strings[0] for a in parser._actions
            if a.dest != "help" and getattr(parsed, a.dest) is not marker}


def choose_job(given: dict[str, str], job_of: dict[str, str]) -> tuple[Optional[str], str]:
    """(the job the flags ask for, ""), or (None, the one-line reason) when they ask for two."""
    job = BENCHMARK if "benchmark" in given else HELD_OUT if "eval_data" in given else ANSWER
    if job == BENCHMARK and "eval_data" in given:
        return None, "--benchmark and --eval_data are two jobs: run them one at a time"
    for dest, flag in given.items():
        serves = SHARED.get(dest, {job_of[dest]})
        if job_of[dest] != MODEL and job not in serves:
            wanted = " or ".join(JOB_NAMES[j] for j in sorted(serves))
            return None, f"{flag} is for {wanted}; this command runs {JOB_NAMES[job]}: drop {flag}"
    return job, ""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The flags, with args.job set (None with args.refusal when the flags ask for two jobs); the old --limit
    becomes --eval_limit with a one-line note."""
    parser, job_of = build_parser()
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    if "limit_alias" in given:
        print("note: --limit is the old name of --eval_limit; use --eval_limit", file=sys.stderr)
        if "eval_limit" in given:
            args.job, args.refusal = None, "--limit and --eval_limit are the same flag: give --eval_limit once"
            return args
        args.eval_limit = args.limit_alias
        given["eval_limit"] = given.pop("limit_alias")
    args.job, args.refusal = choose_job(given, job_of)
    args.given = set(given)  # the flags written out: a 3v model's own defaults fill the others (run_job)
    return args


def prepare_cpu(chat: VLMChat, args: argparse.Namespace) -> bool:
    """--quantize and --cpu_kernel applied to the loaded model, with the line saying what was done printed under
    the model line; False after a one-line error (e.g. int8 asked for on a GPU)."""
    try:
        print(chat.prepare_cpu(args.quantize, args.cpu_kernel), flush=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return False
    return True


def run_job(chat: VLMChat, args: argparse.Namespace, ckpt: str, bench: Optional[BenchmarkInputs],
            weights_sha256: Optional[str]) -> int:
    """The job args.job names, on the loaded model; its exit code."""
    if args.job == BENCHMARK:
        options = BenchmarkOptions(args.bench_out or default_result_path(args.out_dir, bench.spec, ckpt),
                                   args.eval_limit, args.bench_batch_size)
        return benchmark_job(chat, bench, options, ckpt, chat.encoder.path, weights_sha256)
    if args.job == HELD_OUT:
        return held_out_job(chat, args.eval_data, args.eval_images_path, args.image_prefix, args.eval_limit)
    if chat.generation == "3v":  # minimind-3v's own question and sampling, where the command line left them out
        for name, value in V3_ANSWER_DEFAULTS.items():
            if name not in getattr(args, "given", ()):
                setattr(args, name, value)
    settings = GenerationSettings(args.temperature, args.top_k, args.top_p, args.max_new_tokens,
                                  args.repetition_penalty, args.seed)
    return answer_images(chat, args.image, args.prompt, settings, args.interactive, not args.no_stream)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.job is None:
        print(f"error: {args.refusal}", file=sys.stderr)
        return 2
    seed_everything(args.seed)
    bench = check_benchmark(args.benchmark, args.bench_path) if args.job == BENCHMARK else None
    if args.job == BENCHMARK and bench is None:  # the files are checked before the model loads
        return 1
    ckpt, picked = choose_checkpoint(args, ROOT)
    chat = load_chat(args, ckpt, picked)
    if chat is None:
        return 1
    weights_sha256 = None
    if bench is not None:  # the fingerprint of the weights as loaded: the CPU kernels and int8 replace them
        from evaluation.benchmarks import state_dict_sha256

        weights_sha256 = state_dict_sha256(chat.model)
    if not prepare_cpu(chat, args):
        return 1
    return run_job(chat, args, ckpt, bench, weights_sha256)


if __name__ == "__main__":
    sys.exit(main())
