"""The eager kernel paths of the decoder's linear layers on a CPU, and auto's measured choice among them.

Decoding one token multiplies one activation row by every weight matrix once, so decode speed is set by how fast a
kernel streams the weights from memory, and PyTorch's routes for that product differ from one CPU to another. The
paths (inference only; each converted linear drops its fp32 weight, except the output head, which is tied to the
token embedding and so gets a copy; all but default first stack wq/wk/wv and w1/w3: inference.cpu.stacked):
  default      F.linear on the weight as stored (MKL); nothing is swapped
  transposed   x @ Wt with Wt = W^T kept as a contiguous [in, out] copy (MKL's GEMM without a transpose)
  onednn       oneDNN's linear on a weight reordered once into its blocked layout (torch.ops.mkldnn)
  onednn_bf16  the same with bf16 weights and products, the result cast back to fp32 (the bf16 CPU kernel): only
               on a CPU with native bf16 dot products, and only when asked for, since bf16 weights change answers
The fp32 paths compute the same products as default in another summation order (within ~1e-6 relative), so
greedy answers match default's (tests/test_cpu_kernels.py).

auto_choice (the `auto` CPU kernel) picks between them in two steps, each decided by runtime.cpu.faster_in_turns
(the two sides timed in turns; the candidate kept only when faster by MIN_SPEEDUP in a majority of rounds):
  1. screen: the fp32 candidates (transposed, onednn) against each other on passes of one row through the model's
     first decode linears (at most MEASURE_BYTES of them, enough to stream from memory as decoding does);
  2. validate: the screened candidate against the plain model on real decode steps of the model itself, its
     converted modules swapped in and out; default is kept unless the candidate wins. So auto never keeps a path
     that measured slower than the plain one in the same process.
While it validates it holds the converted decode weights beside the plain ones (released before it returns).
Both steps run once per process for a given set of shapes and thread count.
"""
from __future__ import annotations

import ctypes
import gc
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from model.decoder import KVCache
from runtime.cpu import faster_in_turns, native_bf16

from .stacked import Swap, is_stacked, stack_projections, stacked_swaps

FP32_KERNELS = ("default", "transposed", "onednn")
KERNELS = FP32_KERNELS + ("onednn_bf16",)
# a candidate replaces the plain path only when this much faster in most rounds: closer timings are within the
# noise of a shared machine, and default keeps the model unchanged
MIN_SPEEDUP = 1.05
# The screened weights are the model's first decode linears up to this many bytes: enough to overflow a server's
# last-level cache, so the timing streams from memory as decoding does, without timing a big model whole.
MEASURE_BYTES = 128 << 20
_MEASURED: dict[tuple, "KernelChoice"] = {}  # (shapes, threads, candidates) -> auto's verdict


def onednn_available() -> bool:
    """Whether this torch build has oneDNN with its packed-weight linear ops."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return callable(torch.ops.mkldnn._reorder_linear_weight) and callable(torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):
        return False


def unavailable_reason(kernel: str) -> Optional[str]:
    """Why the eager path `kernel` (one of KERNELS) cannot run on this machine, or None when it can."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown eager CPU kernel {kernel!r}; choose from {', '.join(KERNELS)}")
    if kernel.startswith("onednn") and not onednn_available():
        return "this torch build has no oneDNN linear ops"
    if kernel == "onednn_bf16" and not native_bf16():
        return "this CPU has no native bf16 dot products (AVX512-BF16 or AMX)"
    return None


class _PackedLinear(nn.Module):
    """A linear layer whose weight was converted once for a CPU kernel: inference only, and it cannot be moved
    or cast (load the model again instead)."""

    def __init__(self, linear: nn.Linear, kernel: str):
        super().__init__()
        self.kernel = kernel
        if linear.bias is not None:
            raise ValueError(f"the {self.kernel} CPU kernel takes linear layers without a bias")
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def _check_inference(self, x: torch.Tensor) -> None:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"the {self.kernel} CPU kernel is for inference only; train the unconverted model")

    def _apply(self, fn, recurse: bool = True):
        raise RuntimeError(f"a model converted to the {self.kernel} CPU kernel cannot be moved or cast; "
                           "load it again and convert after moving it")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class TransposedLinear(_PackedLinear):
    """x @ Wt on a contiguous transposed copy Wt [in, out] of the weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear, "transposed")
        self.weight_t = linear.weight.detach().t().contiguous()  # [in, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_inference(x)
        return torch.matmul(x, self.weight_t)

    def nbytes(self) -> int:
        return self.weight_t.numel() * self.weight_t.element_size()


class OneDNNLinear(_PackedLinear):
    """oneDNN's linear on a weight reordered into its blocked layout (fp32, or bf16 with the result cast back)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.float32):
        super().__init__(linear, "onednn" if dtype == torch.float32 else "onednn_bf16")
        self.compute_dtype = dtype
        # 1: the batch size oneDNN lays the weight out for (one row per decode step)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype), 1)
        self._nbytes = linear.weight.numel() * torch.finfo(dtype).bits // 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_inference(x)
        out = torch.ops.mkldnn._linear_pointwise(x.to(self.compute_dtype), self.packed, None, "none", [], "")
        return out.to(x.dtype)

    def nbytes(self) -> int:
        return self._nbytes


def convert_linear(linear: nn.Linear, kernel: str) -> nn.Module:
    """`linear` for `kernel`: itself for default, else a new inference-only module holding the converted weight."""
    if kernel == "default":
        return linear
    if kernel == "transposed":
        return TransposedLinear(linear)
    if kernel in ("onednn", "onednn_bf16"):
        return OneDNNLinear(linear, torch.float32 if kernel == "onednn" else torch.bfloat16)
    raise ValueError(f"unknown eager CPU kernel {kernel!r}; choose from {', '.join(KERNELS)}")


_LINEARS = (nn.Linear, _PackedLinear, torch.ao.nn.quantized.dynamic.Linear)


def decode_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every linear layer one decode step runs: the blocks' and the output head."""
    found = [(parent, name, child) for parent in model.layers.modules() for name, child in parent.named_children()
             if isinstance(child, _LINEARS)]
    return found + [(model, "output", model.output)]


def kernel_of(linear: nn.Module) -> str:
    """The kernel one decode linear runs on."""
    if isinstance(linear, _PackedLinear):
        return linear.kernel
    return "int8" if isinstance(linear, torch.ao.nn.quantized.dynamic.Linear) else "default"


def linear_nbytes(linear: nn.Module) -> int:
    """Bytes of weights a decode linear reads per token (int8: one byte per weight plus a scale and a zero point
    per output row)."""
    if isinstance(linear, _PackedLinear):
        return linear.nbytes()
    if isinstance(linear, torch.ao.nn.quantized.dynamic.Linear):
        return linear.in_features * linear.out_features + 8 * linear.out_features
    return linear.weight.numel() * linear.weight.element_size()


def current_kernel(model: nn.Module) -> str:
    """The kernel the model's decode steps run on now: 'default' for the model as loaded, 'int8' once quantised
    (inference.cpu.quantize), 'compiled' once a compiled decode step is installed (inference.cpu.compiled: an
    instance attribute next_token_logits that names its kernel), else one of KERNELS."""
    step = vars(model).get("next_token_logits")
    if step is not None:
        return getattr(step, "cpu_kernel", "custom decode step")
    kernels = {kernel_of(child) for _, _, child in decode_linears(model)}
    if len(kernels) != 1:
        raise ValueError(f"the model's decode linears mix CPU kernels: {sorted(kernels)}")
    return kernels.pop()


def is_converted(model: nn.Module) -> bool:
    """Whether the model was changed for CPU inference in any way (a kernel, int8, stacked projections)."""
    return current_kernel(model) != "default" or is_stacked(model)


def release_freed_memory() -> None:
    """Hand the pages of freed weights back to the OS after a conversion. glibc keeps freed blocks under 32 MB
    in its heap (its mmap threshold rises after the first large free), so without this the converted model's
    resident memory would still count the weights it dropped. Other C libraries reuse or return freed memory
    their own way: there is nothing to ask them."""
    gc.collect()  # replaced modules can sit in reference cycles: free their weights first
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def use_kernel(model: nn.Module, kernel: str) -> None:
    """Swap the model's decode linears for the eager path `kernel` in place, after stacking its projections
    (each swapped linear's weight is released); default leaves the model as it is."""
    if kernel == "default":
        return
    stack_projections(model)
    for parent, name, linear in decode_linears(model):
        setattr(parent, name, convert_linear(linear, kernel))
    release_freed_memory()


# ------------------------------------------------------------------------------------------ auto
@dataclass
class KernelChoice:
    """The kernel a model runs on and why; `times_ms` holds measured ms where it was measured."""

    kernel: str
    reason: str
    times_ms: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        return f"CPU kernel: {self.kernel} ({self.reason})"


def measured_linears(model: nn.Module, max_bytes: int = MEASURE_BYTES) -> list[nn.Linear]:
    """The model's decode linears in order, stopping before the total passes max_bytes (at least one layer)."""
    chosen, total = [], 0
    for _, _, linear in decode_linears(model):
        size = linear.weight.numel() * linear.weight.element_size()
        if chosen and total + size > max_bytes:
            break
        chosen.append(linear)
        total += size
    return chosen


def screen_kernels(linears: Sequence[nn.Linear], first: str, second: str, rounds: int = 5) -> str:
    """The faster of two eager paths on passes of one row through `linears` (faster_in_turns: `second` must win
    most rounds to be taken). Inputs are fixed values, not torch's random generator: loading a model must not
    move the seed an app may have set."""
    converted = {k: [convert_linear(linear, k) for linear in linears] for k in (first, second)}
    inputs = {n: torch.linspace(-1.0, 1.0, n).view(1, 1, n) for n in {linear.in_features for linear in linears}}

    def one_pass(kernel: str):
        return lambda: [module(inputs[module.in_features]) for module in converted[kernel]]

    with torch.inference_mode():
        turns = faster_in_turns(one_pass(first), one_pass(second), rounds=rounds, min_speedup=1.0)
    return second if turns.keep_candidate else first


def converted_swaps(model: nn.Module, kernel: str) -> list[Swap]:
    """(parent, attribute, module as loaded, its form for `kernel`) for the blocks' attentions and SwiGLUs and
    the output head; the model is not changed (swap them in with apply_swaps)."""
    swaps = stacked_swaps(model)
    for _, _, _, stacked in swaps:
        for name, child in list(stacked.named_children()):
            if isinstance(child, nn.Linear):
                setattr(stacked, name, convert_linear(child, kernel))
    return swaps + [(model, "output", model.output, convert_linear(model.output, kernel))]


def apply_swaps(swaps: Sequence[Swap], converted: bool) -> None:
    """Put the converted modules of `swaps` in place (converted True) or the modules as loaded back."""
    for parent, name, plain, new in swaps:
        setattr(parent, name, new if converted else plain)


@torch.inference_mode()
def decode_seconds(model: nn.Module, ids: torch.Tensor, steps: int) -> float:
    """Seconds for a prefill of ids [1, T] (no image) and `steps` greedy decode steps through the model's own
    next_token_logits."""
    weight = model.tok_embeddings.weight  # the output head may be a converted copy here
    start = time.perf_counter()
    # one slot to spare: a compiled step leaves a cache's last slot to the plain forward
    cache = KVCache(model.config, 1, ids.shape[1] + steps + 1, weight.device, weight.dtype)
    logits = model(ids, cache=cache, last_only=True).logits[:, -1]
    for _ in range(steps):
        logits = model.next_token_logits(logits.argmax(-1, keepdim=True), cache)
    return time.perf_counter() - start


def timing_prompt(model: nn.Module, length: int = 8) -> torch.Tensor:
    """Fixed ids [1, length] to time decode steps after (not torch's random generator: an app's seed holds)."""
    return (torch.arange(length) * 7 + 5).remainder(model.config.vocab_size)[None]


def auto_choice(model: nn.Module, steps: int = 24, rounds: int = 5) -> KernelChoice:
    """auto: screen the fp32 paths on the model's linears, validate the faster against the plain model on its
    own decode steps, and convert the model to it only when it won there (else it stays as loaded)."""
    candidates = [k for k in FP32_KERNELS[1:] if unavailable_reason(k) is None]
    skipped = [f"{k} not tried: {unavailable_reason(k)}" for k in FP32_KERNELS[1:] if k not in candidates]
    if not candidates:
        return KernelChoice("default", "; ".join(["no other fp32 path to measure"] + skipped))
    linears = measured_linears(model)
    key = (tuple(tuple(linear.weight.shape) for linear in linears), model.config.n_layers, torch.get_num_threads(),
           tuple(candidates))
    if key not in _MEASURED:
        screened = candidates[0] if len(candidates) == 1 else screen_kernels(linears, *candidates)
        _MEASURED[key] = validate_on_decode_steps(model, screened, steps, rounds)
    choice = _MEASURED[key]
    use_kernel(model, choice.kernel)
    return KernelChoice(choice.kernel, "; ".join([choice.reason] + skipped), choice.times_ms)


def validate_on_decode_steps(model: nn.Module, kernel: str, steps: int, rounds: int) -> KernelChoice:
    """The plain model against its `kernel` form on a prefill and `steps` decode steps, in turns; the model is
    left as loaded."""
    swaps = converted_swaps(model, kernel)
    ids = timing_prompt(model)

    def run(converted: bool):
        def one() -> float:
            apply_swaps(swaps, converted)
            return decode_seconds(model, ids, steps)  # the swap itself is not timed
        return one

    try:
        turns = faster_in_turns(run(False), run(True), rounds=rounds, min_speedup=MIN_SPEEDUP)
    finally:
        apply_swaps(swaps, False)
        del swaps
        release_freed_memory()
    per_run = {"default": 1000 * turns.best_plain_s, kernel: 1000 * turns.best_candidate_s}
    chosen = kernel if turns.keep_candidate else "default"
    reason = (f"measured a prefill and {steps} decode steps of this model, {torch.get_num_threads()} thread(s), "
              f"in turns: {turns.describe('default', kernel)}; {kernel} screened fastest of the fp32 paths")
    return KernelChoice(chosen, reason + ("" if turns.keep_candidate else "; default kept"), per_run)
