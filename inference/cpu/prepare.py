"""One call that readies a loaded model for fast CPU inference, and the command-line flags that drive it.

An app adds the flags with `add_cpu_inference_args(parser)` and, after loading the model,
`print(prepare_for_cpu_inference(model, args.quantize, args.cpu_kernel), file=sys.stderr)`:
  --quantize int8      the decoder's linears become int8 (inference.cpu.quantize; about 4x faster decode of the 512/8
                       model on an AMD EPYC; answers may differ from fp32 where two tokens are nearly tied)
  --cpu_kernel auto    time the fp32 kernel paths on the model's own weights and use the fastest
                       (inference.cpu.kernels; same greedy answers as default). auto_bf16 also tries bf16 weights
                       where the CPU has native bf16 dot products; auto_compile also compiles the decode step
                       (inference.cpu.compiled: tens of seconds at load, for servers) and keeps it when faster;
                       compiled compiles it unmeasured; default leaves the model as loaded.
On a GPU model both flags at their defaults leave it unchanged (and say so).
"""
from __future__ import annotations

import argparse
import logging
from typing import Optional

from torch import nn

from .kernels import CHOICES, choose_cpu_kernel
from .quantize import quantize_int8

QUANTIZE_CHOICES = ("none", "int8")
log = logging.getLogger("minimind")


def add_cpu_inference_args(parser: argparse.ArgumentParser, default_kernel: str = "auto") -> None:
    """Add --quantize and --cpu_kernel to an app's parser."""
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                        help="int8: quantise the decoder's linear layers for CPU inference (faster; answers may "
                             "differ slightly from fp32)")
    parser.add_argument("--cpu_kernel", default=default_kernel, choices=CHOICES,
                        help="how the decoder's linear layers run on CPU: auto measures the fp32 paths at load "
                             "and keeps the fastest; auto_bf16 also tries bf16 weights (native bf16 CPUs only); "
                             "auto_compile also tries the decode step compiled (tens of seconds at load; for "
                             "servers); compiled compiles it without measuring")


def prepare_for_cpu_inference(model: nn.Module, quantize: Optional[str] = "none", cpu_kernel: str = "auto") -> str:
    """Quantise and/or choose the CPU kernel of a loaded model, in place; returns (and logs at INFO on the
    "minimind" logger) one line saying what was done.

    quantize: "none"/None or "int8". cpu_kernel: one of inference.cpu.kernels.CHOICES; with int8 it must be auto or
    default (int8 replaces the fp32 linears the kernels apply to)."""
    quantize = quantize or "none"
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantisation {quantize!r}; choose from {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "int8":
        if cpu_kernel not in ("auto", "default"):
            raise ValueError(f"--cpu_kernel {cpu_kernel} applies to fp32 linear layers; --quantize int8 replaces "
                             "them (use --cpu_kernel auto or default)")
        quantize_int8(model)
        line = "CPU kernel: int8 (decoder linears quantised to int8; answers may differ slightly from fp32)"
    else:
        line = choose_cpu_kernel(model, cpu_kernel).describe()
    log.info(line)
    return line
