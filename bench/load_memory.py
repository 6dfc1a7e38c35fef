"""Resident memory of loading a checkpoint for CPU inference, as the apps do: load_model, then
prepare_for_cpu_inference with --quantize / --cpu_kernel. One process per measurement (peaks are per process).

  peak_rss_mb    this process's peak resident memory (loading included: the weights file read, the model built)
  rss_mb         resident memory at the end, after the conversion (what serving keeps)
  rss_loaded_mb  resident memory after loading, before the conversion
  kernel_line    what prepare_for_cpu_inference did
The last printed line is JSON with these keys. bench/generate.py --quantize int8 runs it for fp32 and int8.
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import emit  # noqa: E402
from checkpoints.checkpoint import load_model  # noqa: E402
from inference.cpu.prepare import add_cpu_inference_args, prepare_for_cpu_inference  # noqa: E402


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (Linux): VmRSS now, VmHWM its peak. The peak is
    read there rather than from getrusage, whose ru_maxrss keeps the parent's peak across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="a .pth/.safetensors checkpoint or a Hugging Face model directory")
    p.add_argument("--threads", type=int, default=None)
    add_cpu_inference_args(p, default_kernel="default")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.ckpt, device="cpu")
    gc.collect()
    loaded = status_mb("VmRSS")
    line = prepare_for_cpu_inference(model, args.quantize, args.cpu_kernel)
    gc.collect()
    result = {"peak_rss_mb": status_mb("VmHWM"), "rss_mb": status_mb("VmRSS"), "rss_loaded_mb": loaded,
              "kernel_line": line}
    emit(result)
    return result


if __name__ == "__main__":
    main()
