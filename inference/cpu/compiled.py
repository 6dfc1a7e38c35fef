"""The compiled decode step: the `compiled` CPU kernel path (inference.cpu.kernels), for long-running CPU inference.

Once the weights stream at a kernel's best rate, what is left of a decode step on a small model is the cost of
running it op by op: every eager op and module call, and oneDNN's per-call set-up (about 12 us a call, 33 calls
a token on the 512/8 model). torch.compile removes most of that for the single-token step:
  - inductor with frozen weights (freezing) packs each linear's weight once, and its C++ GEMM template
    (max_autotune, chosen against ATen's by timing each shape at compile time) runs the matrix-vector products;
  - the norms, rotary embedding, attention glue and residual adds fuse into a few generated C++ kernels;
  - dynamic shapes: the growing KV cache does not recompile.
Measured on an AMD EPYC (Zen 4), 2 threads, the 512/8 model, fp32, the two taking turns in one process: 3.1-3.5
ms per token against 4.1-4.5 ms for eager oneDNN (bench/generate.py --kernel auto_compile times the same at load;
bench/RESULTS.md). The products are the same dot products in
another summation order, so greedy answers match the plain model's (tests/test_cpu_compile.py).

Costs, which is why it is not part of auto (--cpu_kernel compiled asks for it; auto_compile times it against
auto's pick on decode steps and keeps the faster): compiling takes tens of seconds at load (about 20 s on those 2
cores; done at load, not at the first request), it needs a C++ compiler, and inductor keeps its own packed copy
of the decode weights beside the model's (prefill, longer chunks and padded batches run the plain model). The
compiled step serves one row without padding, the chat case; other steps run the plain forward.
"""
from __future__ import annotations

import copy
import os
import shutil
import time
import warnings
from typing import Optional

import torch
import torch._inductor.config as inductor_config
from torch import nn

from .kernels import MARGIN, KernelChoice, fuse_projections, measured_choice, release_freed_memory, use_kernel
from model.decoder import KVCache

# inductor settings of the compiled step: weights frozen as constants (so they can be packed once) and each
# GEMM shape timed between inductor's C++ template and ATen at compile time (its tables of those timings on
# stderr are silenced: the CPU kernel line says what was chosen)
INDUCTOR_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                    "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}


def compiler_missing() -> Optional[str]:
    """Why inductor cannot build its C++ kernels here (None when it can): it needs a C++ compiler."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH: inductor builds the compiled step with one (set CXX)"
    return None


class CompiledDecode:
    """The model's single-token step with a KV cache, compiled: logits [1, vocab] of the token after ids [1, 1]."""

    def __init__(self, model: nn.Module):
        # the bound forward, so that inductor sees the weights as the module's parameters and can freeze them
        self._forward = torch.compile(model.forward, dynamic=True, fullgraph=True)

    def __call__(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        # the options apply when inductor compiles, which is on a call; torch.compile(options=...) does not
        # reach the freezing pass
        with torch.inference_mode(), inductor_config.patch(INDUCTOR_OPTIONS):
            return self._forward(ids, cache=cache).logits[:, -1]


def check_compilable(model: nn.Module) -> None:
    """Raise a one-line ValueError when the compiled step cannot be built here or for this model."""
    missing = compiler_missing()
    if missing is not None:
        raise ValueError(f"the compiled CPU kernel cannot run here: {missing}")
    if model.config.use_moe:
        raise ValueError("the compiled CPU kernel runs dense models: this one routes each token to experts "
                         "(use_moe), which does not compile into one graph; use --cpu_kernel auto")


def compile_decode(model: nn.Module) -> float:
    """Set model.compiled_decode and compile it now on a two-token warm-up (so a server pays the compile at load,
    not at its first request); returns the seconds it took. The model's linears must be plain nn.Linear."""
    check_compilable(model)
    for p in model.parameters():
        p.requires_grad_(False)  # freezing folds the weights into the compiled step as constants
    compiled = CompiledDecode(model)
    start = time.perf_counter()
    with torch.inference_mode(), warnings.catch_warnings():
        # inductor's autotuner calls a deprecated storage API inside torch: not this project's to act on
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
        cache = KVCache(model.config, 1, 4, model.output.weight.device, model.output.weight.dtype)
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        for _ in range(2):  # two cache lengths: the step is compiled for a growing cache, once
            compiled(torch.zeros(1, 1, dtype=torch.long), cache)
    model.compiled_decode = compiled
    return time.perf_counter() - start


def choose_compiled(model: nn.Module, measure: bool) -> KernelChoice:
    """The compiled kernel (measure False: asked for), or auto_compile (measure True): auto's measured eager pick
    against the compiled step, on timed decode steps of the model itself, keeping the faster. Where the compiled
    step cannot be built, auto_compile keeps auto's pick and says why; compiled is an error."""
    threads = torch.get_num_threads()
    eager = measured_choice(model) if measure else None
    try:
        check_compilable(model)  # before the projections are stacked: a refused model stays as loaded
    except ValueError as e:
        if eager is None:
            raise
        use_kernel(model, eager.kernel)
        return KernelChoice(eager.kernel, f"{eager.reason}; compiled not tried: {e}", eager.times_ms)
    fuse_projections(model)
    eager_model = None
    if eager is not None:  # an eager copy to time against, made before compiling (no compiled step to copy)
        eager_model = copy.deepcopy(model)
        use_kernel(eager_model, eager.kernel)
    seconds = compile_decode(model)
    line = f"the one-row decode step compiled with inductor in {seconds:.0f} s, {threads} thread(s)"
    if eager is None:
        return KernelChoice("compiled", f"asked for: {line}; prefill and padded batches run eager")
    step_ms = time_decode_steps(model, eager_model)
    del eager_model
    release_freed_memory()
    verdict = f"{line}; ms per decode step: compiled {step_ms['compiled']:.2f}, eager {eager.kernel} " \
              f"{step_ms['eager']:.2f}"
    if step_ms["compiled"] < (1 - MARGIN) * step_ms["eager"]:
        return KernelChoice("compiled", f"{verdict}; eager linears: {eager.reason}", eager.times_ms)
    drop_compiled(model)
    use_kernel(model, eager.kernel)
    return KernelChoice(eager.kernel, f"{eager.reason}; {verdict}: compiled not kept", eager.times_ms)


def time_decode_steps(compiled: nn.Module, eager: nn.Module, prompt: int = 32, steps: int = 16,
                      rounds: int = 3) -> dict[str, float]:
    """Best ms per decode step of a model with its compiled step and of an eager copy, taking turns (a shared
    machine's load then weighs on both alike); one row, a fresh cache per turn. The eager side is a separate
    model because swapping modules in and out of the compiled one would fail its guards and compile it again."""
    best = {"compiled": float("inf"), "eager": float("inf")}
    # fixed ids, not torch's random generator: loading a model must not move the seed an app may have set
    ids = (torch.arange(prompt) * 7 + 5).remainder(compiled.config.vocab_size)[None]
    for _ in range(rounds):
        for turn, model in (("compiled", compiled), ("eager", eager)):
            best[turn] = min(best[turn], _decode_seconds(model, ids, steps) * 1000)
    return best


@torch.inference_mode()
def _decode_seconds(model: nn.Module, ids: torch.Tensor, steps: int) -> float:
    """Seconds per step of `steps` greedy decode steps after a prefill of ids [1, T] (no image)."""
    weight = model.tok_embeddings.weight  # the output head may be a converted copy here
    # one slot to spare: the compiled step leaves a cache's last slot to the plain forward (MiniMindVLM)
    cache = KVCache(model.config, 1, ids.shape[1] + steps + 1, weight.device, weight.dtype)
    logits = model(ids, cache=cache, last_only=True).logits[:, -1]
    start = time.perf_counter()
    for _ in range(steps):
        logits = model.next_token_logits(logits.argmax(-1, keepdim=True), cache)
    return (time.perf_counter() - start) / steps


def drop_compiled(model: nn.Module) -> None:
    """Remove the compiled step and free what it holds (inductor's frozen copy of the weights lives in
    torch.compile's cache until it is reset)."""
    model.compiled_decode = None
    torch._dynamo.reset()
    release_freed_memory()
