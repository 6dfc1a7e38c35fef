"""--compile: the training model under torch.compile (inductor), and what compiling cost.

The forward and backward of a training step compile whole for the dense model: the image splice takes its span
positions and the loss its supervised positions from the batch (the collate step finds both), and training passes
no attention mask, so nothing in the step reads a tensor's value on the host. The MoE feed-forward still breaks
the graph: each expert runs on the tokens routed to it, a data-dependent count.

Recompiles stay bounded: the sizes that vary from batch to batch (rows, the batch-longest padded length, the
image count, the supervised positions) are marked dynamic before the first step, so one graph serves them all
(no padding beyond batch-longest); a stage compiles once, plus one graph for a batch of text-only rows.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import torch

def compiler_problem() -> Optional[str]:
    """Why inductor cannot build its C++ kernels here (None when it can): a C++ compiler must exist and work."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH: inductor needs one for CPU kernels (set CXX)"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            done = subprocess.run([compiler, src, "-o", os.path.join(tmp, "probe")], capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"the C++ compiler {compiler} does not run ({e})"
        if done.returncode != 0:
            first = (done.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[0]
            return f"the C++ compiler {compiler} fails on a one-line program ({first})"
    return None


def compile_for_training(model: torch.nn.Module, device: torch.device) -> tuple[torch.nn.Module, Optional[str]]:
    """(the model under torch.compile, None), or (the model itself, why not) where inductor cannot compile for
    this device (on CPU: no working C++ compiler)."""
    if device.type == "cpu":
        problem = compiler_problem()
        if problem is not None:
            return model, problem
    return torch.compile(model), None


def mark_dynamic_dims(inputs: dict[str, Any]) -> None:
    """Mark the sizes that differ from batch to batch (rows, padded length, images, supervised positions) as
    dynamic on the forward's inputs before the compiled model sees them: one graph serves every batch, where
    each new value would otherwise compile again (and batch-longest padding gives a new length almost every
    step). maybe_mark_dynamic: a size that turns out fixed (or 1) is specialised instead of refused."""
    for name, dims in (("input_ids", (0, 1)), ("labels", (0, 1)), ("segment_ids", (0, 1)),
                       ("image_features", (0,)), ("loss_positions", (0,))):
        if inputs.get(name) is not None:
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(inputs[name], dim)
    for t in inputs.get("image_spans") or ():
        torch._dynamo.maybe_mark_dynamic(t, 0)


@dataclass(frozen=True)
class CompileCounts:
    """What torch.compile did in this process so far (torch._dynamo's counters)."""

    graphs: int  # graphs compiled (each recompile is one more)
    graph_breaks: int
    break_reasons: tuple[str, ...]

    @classmethod
    def now(cls) -> "CompileCounts":
        from torch._dynamo.utils import counters

        breaks = counters["graph_break"]
        return cls(graphs=int(counters["stats"]["unique_graphs"]), graph_breaks=int(sum(breaks.values())),
                   break_reasons=tuple(sorted(breaks)))

    def since(self, start: "CompileCounts") -> "CompileCounts":
        """What happened after `start` (the counters are the process's)."""
        return CompileCounts(self.graphs - start.graphs, self.graph_breaks - start.graph_breaks,
                             tuple(r for r in self.break_reasons if r not in start.break_reasons))

    def line(self) -> str:
        reasons = f" ({'; '.join(r.splitlines()[0][:120] for r in self.break_reasons[:3])})" if self.break_reasons \
            else ""
        return f"torch.compile: {self.graphs} graph(s) compiled, {self.graph_breaks} graph break(s){reasons}"
