"""The compiled CPU kernel (inference.cpu.compiled): the compiled one-row decode step gives the plain model's greedy
tokens, serves every later answer without compiling again, leaves padded batches to the plain forward, and
fails clearly without a C++ compiler or on a model converted already; auto_compile keeps whichever of it and
auto's eager pick runs decode steps faster."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config
from torch._dynamo.utils import counters

from inference.cpu import compiled as cpu_compile, kernels as cpu_kernels
from inference.cpu.compiled import compiler_missing, time_decode_steps
from inference.cpu.kernels import choose_cpu_kernel, current_kernel, unavailable_reason
from model.vlm import MiniMindVLM, pad_rows

PROMPT = [[5, 17, 99, 240, 3, 77, 1000, 12]]
ROWS = [[5, 17, 99, 240, 3, 77, 1000, 12], [64, 2, 800, 31]]  # different lengths: left padding, the eager path

pytestmark = pytest.mark.skipif(compiler_missing() is not None, reason=str(compiler_missing()))


@pytest.fixture(scope="module")
def base() -> MiniMindVLM:
    torch.manual_seed(0)
    return MiniMindVLM(tiny_config()).eval()


@pytest.fixture(autouse=True)
def fresh_measurements(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_MEASURED", {})


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


def test_timing_decode_steps_does_not_recompile(base, compiled):
    """auto_compile times the compiled step in turns with an eager copy: no compile during the measurement, and
    the compiled model is left as it was."""
    model, _ = compiled
    eager = copy.deepcopy(base)
    choose_cpu_kernel(eager, "transposed")
    greedy(model, PROMPT, n=3)
    graphs, rng = counters["stats"]["unique_graphs"], torch.random.get_rng_state()
    times = time_decode_steps(model, eager, prompt=8, steps=4, rounds=2)
    assert torch.equal(torch.random.get_rng_state(), rng)  # an app's seed set before loading still holds
    assert set(times) == {"compiled", "eager"} and all(t > 0 for t in times.values())
    assert counters["stats"]["unique_graphs"] == graphs and current_kernel(model) == "compiled"
    assert torch.equal(greedy(model, PROMPT), greedy(base, PROMPT))


@pytest.mark.parametrize("compiled_ms, expected", [(1.0, "compiled"), (9.5, "transposed")])
def test_auto_compile_keeps_the_faster_by_measured_decode_steps(base, monkeypatch, compiled_ms, expected):
    """Kept only when its decode steps beat the eager pick's by the margin; else the eager pick, compiled step
    dropped. Either way, the plain greedy tokens."""
    monkeypatch.setattr(cpu_kernels, "time_kernels", lambda linears, kernels: {k: {"transposed": 1.0}.get(k, 2.0)
                                                                             for k in kernels})
    monkeypatch.setattr(cpu_compile, "time_decode_steps", lambda model, eager: {"compiled": compiled_ms,
                                                                                "eager": 10.0})
    model = copy.deepcopy(base)
    choice = choose_cpu_kernel(model, "auto_compile")
    assert choice.kernel == expected == current_kernel(model)
    assert f"ms per decode step: compiled {compiled_ms:.2f}, eager transposed 10.00" in choice.reason
    assert (model.compiled_decode is None) == (expected != "compiled")
    assert torch.equal(greedy(model, PROMPT), greedy(base, PROMPT))


def test_auto_compile_without_a_compiler_keeps_the_auto_pick(base, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    model = copy.deepcopy(base)
    choice = choose_cpu_kernel(model, "auto_compile")
    assert choice.kernel in ("default", "transposed", "onednn") and choice.kernel == current_kernel(model)
    assert "compiled not tried: the compiled CPU kernel cannot run here: no C++ compiler" in choice.reason


def test_filling_the_cache_to_its_last_slot_does_not_compile_again(base, compiled):
    """The last slot makes the cached keys one contiguous block, which the compiled graph does not cover: that
    step runs the plain forward instead of compiling a second graph mid-answer, with the same logits."""
    from model.decoder import KVCache

    model, _ = compiled
    greedy(model, PROMPT, n=3)
    graphs = counters["stats"]["unique_graphs"]
    ids, steps = torch.tensor(PROMPT), 5
    logits = {}
    with torch.inference_mode():
        for name, m in (("compiled", model), ("plain", base)):
            cache = KVCache(m.config, 1, ids.shape[1] + steps, "cpu", torch.float32)
            m(ids, cache=cache)
            logits[name] = [m.next_token_logits(torch.tensor([[7 + i]]), cache) for i in range(steps)]
            assert cache.length == cache.k.shape[3]  # filled to the last slot
    assert counters["stats"]["unique_graphs"] == graphs
    for got, want in zip(logits["compiled"], logits["plain"]):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
