"""The compiled CPU kernel (model.cpu_compile): the compiled one-row decode step gives the plain model's greedy
tokens, serves every later answer without compiling again, leaves padded batches to the plain forward, and
fails clearly without a C++ compiler or on a model converted already."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config
from torch._dynamo.utils import counters

from model.cpu_compile import compiler_missing
from model.cpu_kernels import choose_cpu_kernel, current_kernel, unavailable_reason
from model.vlm import MiniMindVLM, pad_rows

PROMPT = [[5, 17, 99, 240, 3, 77, 1000, 12]]
ROWS = [[5, 17, 99, 240, 3, 77, 1000, 12], [64, 2, 800, 31]]  # different lengths: left padding, the eager path

pytestmark = pytest.mark.skipif(compiler_missing() is not None, reason=str(compiler_missing()))


@pytest.fixture(scope="module")
def base() -> MiniMindVLM:
    torch.manual_seed(0)
    return MiniMindVLM(tiny_config()).eval()


@pytest.fixture(scope="module")
def compiled(base) -> tuple[MiniMindVLM, str]:
    model = copy.deepcopy(base)
    choice = choose_cpu_kernel(model, "compiled")
    return model, choice.reason


def greedy(model: MiniMindVLM, rows: list[list[int]], n: int = 16) -> torch.Tensor:
    ids, mask = pad_rows(rows, pad_id=0)
    return model.generate(ids, max_new_tokens=n, temperature=0.0, attention_mask=mask)


class CountingStep:
    """Wraps a compiled step and counts the decode steps it serves."""

    def __init__(self, step):
        self.step, self.calls = step, 0

    def __call__(self, ids, cache):
        self.calls += 1
        return self.step(ids, cache)


def test_compiled_step_gives_the_plain_greedy_tokens(base, compiled):
    model, reason = compiled
    assert current_kernel(model) == "compiled" and "compiled with inductor in" in reason
    counting = CountingStep(model.compiled_decode)
    model.compiled_decode = counting
    try:
        assert torch.equal(greedy(model, PROMPT), greedy(base, PROMPT))
        assert counting.calls == 15  # every step after the prompt's: the compiled step served them
        assert torch.equal(greedy(model, ROWS), greedy(base, ROWS))  # padded batch: the plain forward
        assert counting.calls == 15
    finally:
        model.compiled_decode = counting.step


def test_later_answers_do_not_compile_again(base, compiled):
    """A server's answers have other prompt lengths and token budgets (other cache sizes): the step was compiled
    once at load, for a growing cache, so none of them stalls on a new compile."""
    model, _ = compiled
    greedy(model, PROMPT, n=4)
    graphs = counters["stats"]["unique_graphs"]
    for prompt, n in (([7, 8, 9], 30), (PROMPT[0] * 3, 5), ([11] * 40, 50)):
        assert torch.equal(greedy(model, [prompt], n=n), greedy(base, [prompt], n=n))
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_model_is_not_converted_again(compiled):
    model, _ = compiled
    with pytest.raises(ValueError, match="already runs on the compiled CPU kernel"):
        choose_cpu_kernel(model, "onednn")


def test_missing_compiler_is_a_clear_error(base, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert "no C++ compiler (no-such-compiler-xyz)" in unavailable_reason("compiled")
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"the compiled CPU kernel cannot run here: no C\+\+ compiler"):
        choose_cpu_kernel(model, "compiled")
    assert current_kernel(model) == "default"  # nothing was changed


def test_moe_model_is_refused_unchanged():
    """Routing tokens to experts depends on the data: no single graph; the model is left as loaded."""
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config(use_moe=True)).eval()
    with pytest.raises(ValueError, match=r"runs dense models: .*use_moe.*use --cpu_kernel auto"):
        choose_cpu_kernel(model, "compiled")
    assert current_kernel(model) == "default" and model.layers[0].attention.wqkv is None
