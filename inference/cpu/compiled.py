"""The compiled decode step (the `compiled` CPU kernel), for long-running CPU inference such as a server.

Once the weights stream at a kernel's best rate, what is left of a decode step on a small model is the cost of
running it op by op: every eager op and module call. torch.compile removes most of that for the one-row step:
  - inductor with frozen weights (freezing) packs each linear's weight once, and its C++ GEMM template
    (max_autotune, chosen against ATen's by timing each shape at compile time) runs the matrix-vector products;
  - the norms, rotary embedding, attention glue and residual adds fuse into a few generated C++ kernels;
  - dynamic shapes: the growing KV cache, and caches of other sizes, do not recompile.
The products are the same dot products in another summation order, so greedy answers match the plain model's
(tests/test_cpu_compile.py). Figures: bench/RESULTS.md.

It is installed from the outside: the model's projections are stacked (inference.cpu.stacked) and an instance
attribute `next_token_logits` (CompiledDecodeStep) takes over the model's decode step, which generate_stream and
the batcher call; MiniMindVLM.next_token_logits itself stays the plain forward. The compiled step serves one row
without padding, with a free cache slot left after its token; every other step (prefill, padded batches, a cache's
last slot) runs the plain forward. Its rotary rows are inputs, cut from the model's table outside the graph, so an
answer running past the model's context (which grows the table) compiles nothing. Each model's step is compiled
from its own copy of the step's code, so its compiled state is its own: dropping it frees it without touching
any other model's.

Costs: compiling takes tens of seconds at load (done at load, not at the first request), it needs a working C++
compiler, and inductor keeps its own packed copy of the decode weights beside the model's. Where it cannot be
built (no compiler, a compiler that fails, an MoE model) the caller falls back in one line (inference.cpu.prepare).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import types
import warnings
from typing import Callable, Optional

import torch
import torch._inductor.config as inductor_config
from torch import nn

from model.decoder import KVCache

from .kernels import release_freed_memory
from .stacked import stack_projections

# inductor settings of the compiled step: weights frozen as constants (so they can be packed once) and each
# GEMM shape timed between inductor's C++ template and ATen at compile time (its tables of those timings on
# stderr are silenced: the CPU kernel line says what was chosen)
INDUCTOR_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                    "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
PROBE_PROGRAM = "int main() { return 0; }\n"


def compiler_missing() -> Optional[str]:
    """Why inductor cannot build its C++ kernels here (None when it can): the C++ compiler it uses ($CXX, else
    g++) must exist and build a trivial program."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH: inductor builds the compiled step with one (set CXX)"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run([compiler, "-x", "c++", "-", "-o", os.path.join(tmp, "probe")], input=PROBE_PROGRAM,
                                  capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"the C++ compiler {compiler} could not be run: {e}"
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0]
        return f"the C++ compiler {compiler} fails on a trivial program ({first}): inductor needs a working one (set CXX)"
    return None


def refusal(model: nn.Module) -> Optional[str]:
    """Why the compiled step cannot be built for this model here (None when it can)."""
    if model.config.use_moe:
        return "this model routes each token to experts (use_moe), which does not compile into one graph"
    return compiler_missing()


def _one_row_step(model: nn.Module) -> Callable:
    """The decode step of one token after a filled, unpadded cache, as a function of its own code object: dynamo
    keeps compiled code per code object, so this model's compiled state lives and dies with this function."""
    def step(ids: torch.Tensor, cache: KVCache, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = model.embed(ids)
        rope = (cos, sin, None)  # no complex table under compile (model.decoder.apply_rope)
        for block in model.layers:
            h = block(h, rope, cache, None)  # one query after an unpadded cache: every key, no mask
        return model.output(model.norm(h))[:, -1]

    code = step.__code__.replace()  # a new code object: compiled entries are not shared with other models
    return types.FunctionType(code, step.__globals__, step.__name__, step.__defaults__, step.__closure__)


class CompiledDecodeStep:
    """The model's decode step with the compiled one-row step where it applies; set as the model's instance
    attribute `next_token_logits` (same call: ids [B, 1] and the cache -> logits [B, vocab])."""

    cpu_kernel = "compiled"

    def __init__(self, model: nn.Module):
        self.model = model
        self._compiled = torch.compile(_one_row_step(model), dynamic=True, fullgraph=True)

    def applies(self, ids: torch.Tensor, cache: KVCache) -> bool:
        """One row, no padding in the cache, and a free slot left after this token (filling the last slot makes
        the cached keys one contiguous block: another graph, which would be compiled mid-answer)."""
        return ids.shape[0] == 1 and cache.key_mask is None and cache.length + 1 < cache.k.shape[3]

    def __call__(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        model = self.model
        if not self.applies(ids, cache):
            return type(model).next_token_logits(model, ids, cache)
        start = cache.length
        if start + 1 > model._rope_len:  # past the context: grow the table (eager); the graph takes rows as inputs
            model._extend_rope(max(start + 1, 2 * model._rope_len), ids.device)
        # copies: rows of a table that may be replaced later must not tie the graph to its storage
        cos, sin = model.rope_cos[start:start + 1].clone(), model.rope_sin[start:start + 1].clone()
        # the options apply when inductor compiles, which is on a call; torch.compile(options=...) does not
        # reach the freezing pass
        with torch.inference_mode(), inductor_config.patch(INDUCTOR_OPTIONS):
            logits = self._compiled(ids, cache, cos, sin)
        cache.length = start + 1
        return logits


def compile_decode(model: nn.Module) -> float:
    """Stack the model's projections, install its compiled decode step and compile it now on a warm-up (so a
    server pays the compile at load, not at its first request); returns the seconds it took. On any failure the
    model is left without the compiled step (its projections stacked, the same logits) and the error raised."""
    for p in model.parameters():
        p.requires_grad_(False)  # freezing folds the weights into the compiled step as constants
    stack_projections(model)
    step = CompiledDecodeStep(model)
    start = time.perf_counter()
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            # inductor's autotuner calls a deprecated storage API inside torch: not this project's to act on
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
            weight = model.tok_embeddings.weight
            cache = KVCache(model.config, 1, 4, weight.device, weight.dtype)
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
            for _ in range(2):  # two cache lengths: the step is compiled for a growing cache, once
                step(torch.zeros(1, 1, dtype=torch.long), cache)
    except BaseException:
        del step  # its code object, and with it everything dynamo compiled for this model
        release_freed_memory()
        raise
    model.next_token_logits = step
    return time.perf_counter() - start


def drop_compiled(model: nn.Module) -> None:
    """Remove the model's compiled step and free what it holds (inductor's frozen copy of the weights lives with
    the step's own code object); other models' compiled steps are untouched."""
    vars(model).pop("next_token_logits", None)
    release_freed_memory()
