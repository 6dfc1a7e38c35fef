"""One call that readies a loaded model for fast CPU inference, the command-line flags that drive it, and the
choice among the paths (inference.cpu.kernels, compiled and quantize; docs/cpu_inference.md).

An app adds the flags with `add_cpu_inference_args(parser)` and, after loading the model,
`print(prepare_for_cpu_inference(model, args.quantize, args.cpu_kernel), file=sys.stderr)`. --cpu_kernel:
  auto      (default) measure the eager fp32 paths on the model's own decode steps against the plain model, in
            turns, and keep one only when it wins most rounds (inference.cpu.kernels); same greedy answers
  default   the model as loaded (the reference path)
  compiled  the one-row decode step compiled with inductor at load (tens of seconds; for servers); where it
            cannot be built (no working C++ compiler, an MoE model) auto runs instead, and the line says why
  bf16      bf16 weights and products on oneDNN, on CPUs with native bf16 only; answers may differ from fp32
  int8      int8 decoder linears (inference.cpu.quantize), as --quantize int8; answers may differ from fp32
Older names are accepted and mean: transposed, onednn the fixed eager fp32 path of that name (auto measures both);
onednn_bf16 and auto_bf16 bf16; auto_compile compiled.
On a GPU model auto and default leave it unchanged (and say so).
"""
from __future__ import annotations

import argparse
import logging
from typing import Optional

import torch
from torch import nn

from . import compiled
from .kernels import KernelChoice, auto_choice, current_kernel, is_converted, unavailable_reason, use_kernel
from .quantize import quantize_int8

CHOICES = ("auto", "default", "compiled", "bf16", "int8")
# older --cpu_kernel values, still accepted: what each means now
OLD_NAMES = {"transposed": "transposed", "onednn": "onednn", "onednn_bf16": "bf16", "auto_bf16": "bf16",
             "auto_compile": "compiled"}
ACCEPTED = CHOICES + ("transposed", "onednn")
QUANTIZE_CHOICES = ("none", "int8")
log = logging.getLogger("minimind")


def kernel_name(value: str) -> str:
    """--cpu_kernel as typed -> the kernel it means (an older name -> its current one; anything else unchanged,
    for argparse's choices to refuse)."""
    return OLD_NAMES.get(value, value)


def add_cpu_inference_args(parser: argparse.ArgumentParser, default_kernel: str = "auto") -> None:
    """Add --quantize and --cpu_kernel to an app's parser."""
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                        help="int8: quantise the decoder's linear layers for CPU inference (the same as "
                             "--cpu_kernel int8; faster, answers may differ slightly from fp32)")
    parser.add_argument("--cpu_kernel", default=default_kernel, type=kernel_name, choices=ACCEPTED,
                        metavar="{" + ",".join(CHOICES) + "}",
                        help="how the decoder runs on CPU: auto keeps an eager fp32 path only when the model's "
                             "own decode steps measure faster than default's; default as loaded; compiled "
                             "compiles the decode step (tens of seconds at load; for servers); bf16 (native bf16 "
                             "CPUs only) and int8 change answers slightly. Older names are accepted: see "
                             "docs/cpu_inference.md")


def prepare_for_cpu_inference(model: nn.Module, quantize: Optional[str] = "none", cpu_kernel: str = "auto") -> str:
    """Quantise and/or choose the CPU kernel of a loaded model, in place; returns (and logs at INFO on the
    "minimind" logger) one line saying what was done.

    quantize: "none"/None or "int8". cpu_kernel: one of CHOICES (or an older name); with int8 it must be auto,
    default or int8 (int8 replaces the fp32 linears the other kernels apply to)."""
    quantize = quantize or "none"
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantisation {quantize!r}; choose from {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "int8":
        if kernel_name(cpu_kernel) not in ("auto", "default", "int8"):
            raise ValueError(f"--cpu_kernel {cpu_kernel} applies to fp32 linear layers; --quantize int8 replaces "
                             "them (use --cpu_kernel auto, default or int8)")
        cpu_kernel = "int8"
    line = choose_cpu_kernel(model, cpu_kernel).describe()
    log.info(line)
    return line


def _not_applicable(model: nn.Module) -> Optional[str]:
    """Why the CPU paths cannot apply to this model (None when they can); raises if it was converted already."""
    if is_converted(model):
        raise ValueError(f"the model already runs on the {current_kernel(model)} CPU kernel; load it again to "
                         "choose another")
    weight = model.output.weight
    if weight.device.type != "cpu":
        return f"the model is on {weight.device}"
    if weight.dtype != torch.float32:
        return f"its weights are {str(weight.dtype).replace('torch.', '')}, the CPU paths convert fp32 weights"
    return None


def choose_cpu_kernel(model: nn.Module, kernel: str = "auto") -> KernelChoice:
    """Run the model on `kernel` (one of CHOICES, or an older name), converting it in place, and say which and why.

    auto and default on a model the CPU paths do not apply to (on a GPU, or already in bf16) keep it as loaded and
    say why; asking for another kernel there, or for one this machine lacks (bf16 without native bf16), is an
    error. compiled falls back to auto, saying why, where the step cannot be built. A model converted once (or
    quantised) is not converted again: that is an error too."""
    kernel = kernel_name(kernel)
    if kernel not in ACCEPTED:
        raise ValueError(f"unknown CPU kernel {kernel!r}; choose from {', '.join(CHOICES)}")
    if kernel == "int8":  # its own checks: on the CPU, fp32, not converted already
        quantize_int8(model)
        return KernelChoice("int8", "decoder linears quantised to int8; answers may differ slightly from fp32")
    not_applicable = _not_applicable(model)
    if not_applicable is not None:
        if kernel in ("auto", "default"):
            return KernelChoice("default", f"{not_applicable}: CPU kernels not used")
        raise ValueError(f"the {kernel} CPU kernel cannot run this model: {not_applicable}")
    if kernel == "default":
        return KernelChoice("default", "asked for")
    if kernel == "auto":
        return auto_choice(model)
    if kernel == "compiled":
        return compiled_choice(model)
    eager = "onednn_bf16" if kernel == "bf16" else kernel
    missing = unavailable_reason(eager)
    if missing is not None:
        raise ValueError(f"the {kernel} CPU kernel cannot run here: {missing} (use --cpu_kernel auto)")
    use_kernel(model, eager)
    if kernel == "bf16":
        return KernelChoice("bf16", "asked for: bf16 weights on oneDNN, answers may differ from fp32")
    return KernelChoice(kernel, "asked for")


def compiled_choice(model: nn.Module) -> KernelChoice:
    """The compiled decode step, compiled now; where it cannot be built, or building it fails, auto instead, the
    line saying why in one line (a failing compiler's own report runs to hundreds of lines)."""
    refused = compiled.refusal(model)
    if refused is None:
        try:
            seconds = compiled.compile_decode(model)
        except Exception as e:  # noqa: BLE001 - any failure of the compiler stack means: run eager
            text = str(e).strip().splitlines()
            refused = f"compiling it failed: {type(e).__name__}" + (f": {text[0][:200]}" if text else "")
        else:
            return KernelChoice("compiled", f"the one-row decode step compiled with inductor in {seconds:.0f} s, "
                                            f"{torch.get_num_threads()} thread(s); prefill and padded batches run "
                                            "eager")
    fallback = auto_choice(model)
    return KernelChoice(fallback.kernel, f"compiled not used: {refused}; auto: {fallback.reason}", fallback.times_ms)

