"""The evaluation jobs of 3-eval_chat.py: exact match on held-out records (--eval_data) and a standard benchmark
(--benchmark pope|mmstar). Each prints its scores, or one error line on stderr, and returns the exit code.

A benchmark's inputs (its parquet files and the manifest beside them) are checked by check_benchmark before the
model loads, so that a bad file costs nothing and a run never fails after scoring every question.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from checkpoints.files import CheckpointWriteError
from inference.chat import VLMChat
from runtime.packages import missing_packages

from .benchmark_data import BenchmarkError, benchmark_files
from .benchmark_sources import Source, file_sources
from .benchmark_specs import BENCHMARKS, BenchmarkSpec
from .held_out import answer_accuracy


def held_out_job(chat: VLMChat, data: str, images_path: Optional[str], image_prefix: str = "",
                 limit: Optional[int] = None) -> int:
    """Exact-match accuracy over the v1 records of `data` (images under `images_path`, default the file's
    folder), printed with the per-type breakdown."""
    try:
        result = answer_accuracy(chat, data, images_path or os.path.dirname(data), image_prefix, limit)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(result.lines()))
    return 0


@dataclass
class BenchmarkInputs:
    """A benchmark's files, checked, with the repo and revision each one came from (None: not recorded)."""

    spec: BenchmarkSpec
    files: list[str]
    sources: dict[str, Source]


def check_benchmark(name: str, path: Optional[str]) -> Optional[BenchmarkInputs]:
    """The benchmark's parquet files (`path`, default dataset/bench/<name>) and their manifest, read and checked
    before the model is loaded; None after a one-line error."""
    spec = BENCHMARKS[name]
    problem = missing_packages(["pyarrow"], f"--benchmark {name} (parquet files)")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return None
    try:
        files = benchmark_files(path or spec.default_path, spec)
        return BenchmarkInputs(spec, files, file_sources(files))
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def default_result_path(out_dir: str, spec: BenchmarkSpec, ckpt: str) -> str:
    model_name = os.path.splitext(os.path.basename(os.path.normpath(ckpt)))[0]
    return os.path.join(out_dir, f"bench_{spec.name}_{model_name}.json")


@dataclass
class BenchmarkOptions:
    """How a benchmark runs and where its result goes (3-eval_chat.py's benchmark flags)."""

    out: str
    limit: Optional[int] = None
    batch_size: int = 32


def benchmark_job(chat: VLMChat, inputs: BenchmarkInputs, options: BenchmarkOptions, ckpt: str, clip_path: str,
                  weights_sha256: Optional[str]) -> int:
    """The standard metrics, printed and written to a JSON file with the model's fingerprint (weights_sha256: of
    the weights as loaded, before the CPU kernel or int8 replaced them). A run that scored no question reports no
    score: that is an error."""
    from checkpoints.vision_pairing import stand_in_warning

    from .benchmarks import model_record, result_record, run_benchmark, summary_lines, write_result

    try:
        run = run_benchmark(chat, inputs.spec, inputs.files, options.limit, options.batch_size)
        model = model_record(chat, ckpt, clip_path, stand_in_warning(clip_path) is not None, weights_sha256)
        record = result_record(run, model, inputs.sources)
    except (BenchmarkError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(run)))
    try:
        write_result(record, options.out)
    except CheckpointWriteError as e:  # already one line naming the file
        print(f"error: cannot write {options.out}: {str(e).removeprefix(f'{Path(options.out)}: ')}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot write {options.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"results: {options.out}")
    return 0
