"""int8 weights for CPU inference: the decoder's linear layers become torch's dynamically quantised Linear.

Each weight matrix of the blocks and the output head is stored as int8 with one scale per output row; at run
time the activations are quantised to int8 as well, with one scale per call over all of its rows (the whole batch
and every position), and the product runs on int8 dot products (fbgemm / oneDNN through torch.ao). So a row's
logits move slightly with the rows run beside it: batched greedy answers can differ from one at a time where two
tokens nearly tie, as int8's can differ from fp32's. A decode step then reads a quarter of the fp32 bytes
(bench/generate.py --quantize int8 measures the speed and the agreement with fp32; figures in bench/RESULTS.md).
wq/wk/wv and w1/w3 are stacked first (inference.cpu.stacked): fewer, larger products, the same int8 values.

The conversion is in place and layer by layer, so each fp32 weight is released as its int8 copy is made: the
fp32 model is never held twice. The token embedding stays fp32 (the output head, tied to it, gets its own int8
copy); the vision projection, run once per image, stays fp32.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .kernels import current_kernel, release_freed_memory
from .stacked import stack_projections

# Weight rows are quantised each with its own scale: rows of one matrix can differ in range by 10x.
_QCONFIG = torch.ao.quantization.per_channel_dynamic_qconfig


def is_int8(model: nn.Module) -> bool:
    """Whether quantize_int8 has converted this model."""
    return current_kernel(model) == "int8"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantise the decode linears (blocks and output head) of a CPU fp32 model to int8, in place; returns it.

    Raises ValueError for a model on another device, with non-fp32 weights, already quantised, or already
    converted to another CPU kernel (inference.cpu.kernels), and when this torch has no quantised engine."""
    kernel = current_kernel(model)
    if kernel == "int8":
        raise ValueError("the model is already quantised to int8")
    if kernel != "default":
        raise ValueError(f"the model already runs on the {kernel} CPU kernel; quantise an unconverted model")
    weight = model.output.weight
    if weight.device.type != "cpu":
        raise ValueError(f"int8 quantisation runs on CPU; the model is on {weight.device} (load it with device='cpu')")
    if weight.dtype != torch.float32:
        raise ValueError(f"int8 quantisation takes fp32 weights; the model's are "
                         f"{str(weight.dtype).replace('torch.', '')} (load it without a dtype change)")
    if torch.backends.quantized.engine == "none":
        raise ValueError("this torch build has no quantised engine for int8 linear layers")
    stack_projections(model)  # same int8 values (one scale per weight row, per call over the same input), fewer calls
    spec = {"layers": _QCONFIG, "output": _QCONFIG}
    with warnings.catch_warnings():
        # torch 2.13 marks torch.ao.quantization deprecated in favour of torchao, whose int8 linears ran these
        # shapes 4-7x slower than fp32 in eager mode here; the deprecated path is the fast one for the pinned
        # torch, so its warnings (repeated per call and per layer) are kept from the user's console.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*deprecated")
        torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    release_freed_memory()
    return model
