"""How the decoder's linear layers run on a CPU at inference: the kernel path, chosen by measurement.

Decoding one token multiplies one activation row by every weight matrix once, so decode speed is set by how
fast a kernel streams the weights from memory, and PyTorch's routes for that product differ a lot from one
CPU to another (AMD EPYC Zen 4, 2 cores: F.linear streamed the 512/8 model's weights at 16 GB/s, the transposed
and oneDNN layouts at 22-29 GB/s, a plain sum at 40-46 GB/s). So the path is not assumed:
`choose_cpu_kernel` times the candidates on the model's own weights (a few passes of one row through its
decode linears, candidates interleaved, best pass kept) once per process for a given set of shapes and thread
count, and swaps the linears of the blocks and the output head for the fastest. While it times them it holds
one converted copy of the timed weights per candidate (at most MEASURE_BYTES each; freed before it returns).

Paths (all inference only; each swapped linear drops its fp32 weight, except the output head, which is tied
to the token embedding and so gets a copy; the paths other than default, and int8, first stack the layers that
read the same input, wq/wk/wv and w1/w3, into one each: fuse_projections):
  default      F.linear on the weight as stored (MKL); nothing is swapped
  transposed   x @ Wt with Wt = W^T kept as a contiguous [in, out] copy (MKL's GEMM without a transpose)
  onednn       oneDNN's linear on a weight reordered once into its blocked layout (torch.ops.mkldnn)
  onednn_bf16  the same with bf16 weights and bf16 dot products, the result cast back to fp32: only on a CPU
               with native bf16 dot products (AVX512-BF16 or AMX), and only when asked for, because rounding
               the weights to bf16 can change answers
  compiled     not a linear layer's kernel: the whole one-row decode step compiled with inductor at load, on
               plain stacked linears (inference.cpu.compiled): no per-op cost left between the products; tens of
               seconds to compile and a C++ compiler needed, so only when asked for (compiled, or auto_compile below)
The fp32 paths compute the same products as default in another summation order (results within ~1e-6
relative), so greedy answers match default's (tests/test_cpu_kernels.py); `auto` chooses among them only.
`auto_bf16` adds onednn_bf16 to the candidates where the CPU supports it and takes it only when measured faster.
`auto_compile` compiles the decode step as well and keeps it when its decode steps are measured faster than
those of auto's pick (for a long-running server, where the compile at load pays off).
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

FP32_KERNELS = ("default", "transposed", "onednn")
KERNELS = FP32_KERNELS + ("onednn_bf16",)
# compiled: the whole single-token step compiled with inductor (inference.cpu.compiled), on plain stacked linears;
# auto_compile measures it against auto's pick
AUTO_CHOICES = ("auto", "auto_bf16", "auto_compile")
CHOICES = AUTO_CHOICES + KERNELS + ("compiled",)
# A candidate replaces default only when at least this much faster: closer timings are within the noise of a
# shared machine, and default keeps the model unchanged.
MARGIN = 0.05
# The timed weights are the model's first decode linears up to this many bytes: enough to overflow a
# server's last-level cache, so the timing streams from memory as decoding does, without timing a big model whole.
MEASURE_BYTES = 128 << 20
_MEASURED: dict[tuple, dict[str, float]] = {}  # (shapes, threads, candidates) -> best seconds per pass


def native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX tiles)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def onednn_available() -> bool:
    """Whether this torch build has oneDNN with its packed-weight linear ops."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return callable(torch.ops.mkldnn._reorder_linear_weight) and callable(torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):
        return False


def unavailable_reason(kernel: str) -> Optional[str]:
    """Why `kernel` cannot run on this machine, or None when it can."""
    if kernel == "compiled":
        from .compiled import compiler_missing

        return compiler_missing()
    if kernel not in KERNELS:
        raise ValueError(f"unknown CPU kernel {kernel!r}; choose from {', '.join(CHOICES)}")
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
    raise ValueError(f"unknown CPU kernel {kernel!r}; choose from {', '.join(KERNELS)}")


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
    """The kernel the model's decode linears run on now: 'default' for plain nn.Linear, 'int8' once quantised
    (inference.cpu.quantize), 'compiled' once its decode step is compiled (inference.cpu.compiled), else one of KERNELS."""
    if getattr(model, "compiled_decode", None) is not None:
        return "compiled"
    kernels = {kernel_of(child) for _, _, child in decode_linears(model)}
    if len(kernels) != 1:
        raise ValueError(f"the model's decode linears mix CPU kernels: {sorted(kernels)}")
    return kernels.pop()


# ------------------------------------------------------------------------------------------ measure and choose
@dataclass
class KernelChoice:
    """The kernel a model runs on and why; `times_ms` holds the measured ms per pass when it was measured."""

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


def time_kernels(linears: Sequence[nn.Linear], kernels: Sequence[str], rounds: int = 5) -> dict[str, float]:
    """Best seconds per pass of one input row through all `linears` for each kernel, the kernels taking turns
    in every round (a shared machine's load then weighs on all of them alike)."""
    converted = {k: [convert_linear(linear, k) for linear in linears] for k in kernels}
    # fixed values, not torch's random generator (the timing does not depend on them): loading a model must not
    # move the seed an app may have set
    inputs = {n: torch.linspace(-1.0, 1.0, n).view(1, 1, n) for n in {linear.in_features for linear in linears}}
    best = {k: float("inf") for k in kernels}
    with torch.inference_mode():
        for k in kernels:  # warm-up: first-call setup (oneDNN primitives) is not what decoding pays per token
            for module in converted[k]:
                module(inputs[module.in_features])
        for _ in range(rounds):
            for k in kernels:
                start = time.perf_counter()
                for module in converted[k]:
                    module(inputs[module.in_features])
                best[k] = min(best[k], time.perf_counter() - start)
    return best


def measure_kernels(model: nn.Module, kernels: Sequence[str]) -> dict[str, float]:
    """time_kernels on the model's measured_linears, cached per process by shapes, thread count and kernels."""
    linears = measured_linears(model)
    key = (tuple(tuple(linear.weight.shape) for linear in linears), torch.get_num_threads(), tuple(kernels))
    if key not in _MEASURED:
        _MEASURED[key] = time_kernels(linears, kernels)
    return _MEASURED[key]


def pick_fastest(times: dict[str, float]) -> str:
    """The fastest kernel, unless it beats default by less than MARGIN."""
    fastest = min(times, key=times.get)
    if "default" in times and times[fastest] > (1 - MARGIN) * times["default"]:
        return "default"
    return fastest


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


# Layers that read the same input, stacked into one for the packed kernels: (fused attribute, its parts).
FUSED_PROJECTIONS = (("wqkv", ("wq", "wk", "wv")), ("w13", ("w1", "w3")))


def fuse_projections(model: nn.Module) -> None:
    """Stack each block's wq, wk, wv into one layer (wqkv) and each SwiGLU's w1, w3 into one (w13), in place, one
    module at a time: one matrix-vector product over the stacked weights streams them faster than two or three
    small ones (AMD EPYC Zen 4, 2 threads, the 512/8 shapes on oneDNN: 38 against 33 GB/s). Each output is the
    same dot product as before. The decoder and SwiGLU use the stacked layer when it is set."""
    for module in model.layers.modules():
        for fused, parts in FUSED_PROJECTIONS:
            if getattr(module, fused, "absent") is None and all(isinstance(getattr(module, p), nn.Linear)
                                                                   for p in parts):
                linears = [getattr(module, p) for p in parts]
                # built on the meta device: no weight is allocated and initialised only to be replaced
                stacked = nn.Linear(linears[0].in_features, sum(lin.out_features for lin in linears), bias=False,
                                    device="meta")
                with torch.no_grad():
                    stacked.weight = nn.Parameter(torch.cat([lin.weight for lin in linears]), requires_grad=False)
                for p in parts:
                    setattr(module, p, None)
                setattr(module, fused, stacked)


def use_kernel(model: nn.Module, kernel: str) -> None:
    """Swap the model's decode linears for `kernel` in place (each swapped linear's weight is released); the packed
    kernels run on stacked projections (fuse_projections)."""
    if kernel != "default":
        fuse_projections(model)
    for parent, name, linear in decode_linears(model):
        setattr(parent, name, convert_linear(linear, kernel))
    release_freed_memory()  # the replaced weights, and the copies the measurement made


def _check_model(model: nn.Module) -> Optional[str]:
    """Why the CPU kernels cannot apply to this model (None when they can); raises if it was converted already."""
    kernel = current_kernel(model)
    if kernel != "default":
        raise ValueError(f"the model already runs on the {kernel} CPU kernel; load it again to choose another")
    weight = model.output.weight
    if weight.device.type != "cpu":
        return f"the model is on {weight.device}"
    if weight.dtype != torch.float32:
        return f"its weights are {str(weight.dtype).replace('torch.', '')}, the kernels convert fp32 weights"
    return None


def choose_cpu_kernel(model: nn.Module, kernel: str = "auto") -> KernelChoice:
    """Run the model's decode linears on `kernel` (one of CHOICES), converting them in place, and say which and why.

    auto measures the fp32 paths (FP32_KERNELS) and keeps the fastest; auto_bf16 also tries onednn_bf16 where
    the CPU has native bf16 dot products; auto_compile also compiles the decode step and keeps it when its
    decode steps are measured faster (inference.cpu.compiled). An auto choice on a model these kernels do not apply
    to (on a GPU, or already in bf16) keeps default and says why; asking for a named kernel there, or for one
    this machine lacks, is an error. A model converted once (or quantised) is not converted again: that is an
    error too."""
    if kernel not in CHOICES:
        raise ValueError(f"unknown CPU kernel {kernel!r}; choose from {', '.join(CHOICES)}")
    not_applicable = _check_model(model)
    if not_applicable is not None:
        if kernel in AUTO_CHOICES + ("default",):
            return KernelChoice("default", f"{not_applicable}: CPU kernels not used")
        raise ValueError(f"the {kernel} CPU kernel cannot run this model: {not_applicable}")
    if kernel in ("compiled", "auto_compile"):
        from .compiled import choose_compiled

        return choose_compiled(model, measure=kernel == "auto_compile")
    if kernel not in AUTO_CHOICES:
        missing = unavailable_reason(kernel)
        if missing is not None:
            raise ValueError(f"the {kernel} CPU kernel cannot run here: {missing}")
        use_kernel(model, kernel)
        return KernelChoice(kernel, "asked for" + (": bf16 weights, answers may differ from fp32"
                                                   if kernel == "onednn_bf16" else ""))
    choice = measured_choice(model, with_bf16=kernel == "auto_bf16")
    use_kernel(model, choice.kernel)
    return choice


def measured_choice(model: nn.Module, with_bf16: bool = False) -> KernelChoice:
    """The fastest of the fp32 kernel paths (and onednn_bf16 if with_bf16 and the CPU has it) on the model's
    own weights; the model is not converted."""
    tried = FP32_KERNELS + (("onednn_bf16",) if with_bf16 else ())
    candidates = [k for k in tried if unavailable_reason(k) is None]
    skipped = [f"{k} not tried: {unavailable_reason(k)}" for k in tried if k not in candidates]
    times = measure_kernels(model, candidates)
    mb = sum(linear.weight.numel() for linear in measured_linears(model)) * 4 / 1e6
    chosen = pick_fastest(times)
    reason = f"measured ms per pass over {mb:.0f} MB of its fp32 weights, {torch.get_num_threads()} thread(s): " + \
        ", ".join(f"{k} {1000 * t:.2f}" for k, t in times.items())
    if chosen == "onednn_bf16":
        reason += "; bf16 weights, answers may differ from fp32"
    return KernelChoice(chosen, "; ".join([reason] + skipped), {k: 1000 * t for k, t in times.items()})
