"""The compiled CPU kernel (inference.cpu.compiled): installed from the outside as the model's decode step, it gives
the plain model's greedy tokens, serves every later answer (longer ones than the model's context included) without
compiling again, leaves padded batches and a cache's last slot to the plain forward, keeps its compiled state to
itself (dropping or failing one model's never touches another's), and where it cannot be built (no compiler, a
failing one, an MoE model) the model runs on auto instead, in one line."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config
from torch._dynamo.utils import counters

from inference.cpu import compiled as cpu_compiled, kernels as cpu_kernels
from inference.cpu.compiled import compiler_missing, drop_compiled
from inference.cpu.kernels import current_kernel
from inference.cpu.prepare import choose_cpu_kernel
from inference.cpu.stacked import StackedQKVAttention
from model.decoder import KVCache
from model.vlm import MiniMindVLM, pad_rows

PROMPT = [[5, 17, 99, 240, 3, 77, 1000, 12]]
ROWS = [[5, 17, 99, 240, 3, 77, 1000, 12], [64, 2, 800, 31]]  # different lengths: left padding, the eager path

pytestmark = pytest.mark.skipif(compiler_missing() is not None, reason=str(compiler_missing()))


@pytest.fixture(scope="module")
def base() -> MiniMindVLM:
    torch.manual_seed(0)
    return MiniMindVLM(tiny_config()).eval()


@pytest.fixture(autouse=True)
def quick_auto(monkeypatch):
    """auto (the fallback) measured without timing: the decode steps of a converted model never win."""
    monkeypatch.setattr(cpu_kernels, "_MEASURED", {})
    monkeypatch.setattr(cpu_kernels, "decode_seconds", lambda model, ids, steps: 1.0)


@pytest.fixture(scope="module")
def compiled(base) -> tuple[MiniMindVLM, str]:
    model = copy.deepcopy(base)
    choice = choose_cpu_kernel(model, "compiled")
    return model, choice.reason


def greedy(model: MiniMindVLM, rows: list[list[int]], n: int = 16) -> torch.Tensor:
    ids, mask = pad_rows(rows, pad_id=0)
    return model.generate(ids, max_new_tokens=n, temperature=0.0, attention_mask=mask)


class Counting:
    """Wraps a model's compiled graph and counts the decode steps it serves."""

    def __init__(self, model: MiniMindVLM):
        self.step = model.next_token_logits
        self.inner, self.calls = self.step._compiled, 0

    def __call__(self, *args):
        self.calls += 1
        return self.inner(*args)

    def __enter__(self) -> "Counting":
        self.step._compiled = self
        return self

    def __exit__(self, *exc) -> None:
        self.step._compiled = self.inner


def test_compiled_step_gives_the_plain_greedy_tokens(base, compiled):
    model, reason = compiled
    assert current_kernel(model) == "compiled" and "compiled with inductor in" in reason
    assert "next_token_logits" not in vars(base) and isinstance(model.layers[0].attention, StackedQKVAttention)
    with Counting(model) as counting:
        assert torch.equal(greedy(model, PROMPT), greedy(base, PROMPT))
        assert counting.calls == 15  # every step after the prompt's: the compiled step served them
        assert torch.equal(greedy(model, ROWS), greedy(base, ROWS))  # padded batch: the plain forward
        assert counting.calls == 15


def test_later_answers_do_not_compile_again(base, compiled):
    """A server's answers have other prompt lengths and token budgets (other cache sizes): the step was compiled
    once at load, for a growing cache, so none of them stalls on a new compile."""
    model, _ = compiled
    greedy(model, PROMPT, n=4)
    graphs = counters["stats"]["unique_graphs"]
    for prompt, n in (([7, 8, 9], 30), (PROMPT[0] * 3, 5), ([11] * 40, 50)):
        assert torch.equal(greedy(model, [prompt], n=n), greedy(base, [prompt], n=n))
    assert counters["stats"]["unique_graphs"] == graphs


def test_an_answer_past_the_context_compiles_nothing(base, compiled):
    """Past max_seq_len (160 here) the rotary table grows; the compiled step takes its rows as inputs, so it keeps
    serving every step, compiles no graph, and gives the plain tokens."""
    model, _ = compiled
    prompt = [[(7 * i) % 6000 + 3 for i in range(120)]]
    greedy(model, PROMPT, n=3)
    graphs = counters["stats"]["unique_graphs"]
    with Counting(model) as counting:
        assert torch.equal(greedy(model, prompt, n=80), greedy(base, prompt, n=80))
        assert counting.calls == 79
    assert model._rope_len > model.config.max_seq_len
    assert torch.equal(greedy(model, PROMPT), greedy(base, PROMPT))  # and later answers still run compiled
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_model_is_not_converted_again(compiled):
    model, _ = compiled
    with pytest.raises(ValueError, match="already runs on the compiled CPU kernel"):
        choose_cpu_kernel(model, "onednn")


@pytest.mark.parametrize("compiler, said", [("no-such-compiler-xyz", r"no C\+\+ compiler \(no-such-compiler-xyz\)"),
                                            ("/bin/false", "the C\\+\\+ compiler /bin/false fails on a trivial")])
def test_without_a_working_compiler_auto_runs_instead(base, monkeypatch, compiler, said):
    monkeypatch.setenv("CXX", compiler)
    model = copy.deepcopy(base)
    choice = choose_cpu_kernel(model, "compiled")
    assert choice.kernel == "default" == current_kernel(model)
    assert "\n" not in choice.describe()
    assert pytest.importorskip("re").search(f"^compiled not used: {said}.*; auto: measured", choice.reason)
    assert torch.equal(greedy(model, PROMPT), greedy(base, PROMPT))


def test_a_compile_that_fails_falls_back_in_one_line_and_spares_other_models(base, compiled, monkeypatch):
    """inductor failing mid-compile (here: its C++ compiler swapped for /bin/false, its caches off) is one line and
    auto; the other model's compiled step keeps serving without compiling again."""
    other, _ = compiled
    greedy(other, PROMPT, n=3)
    monkeypatch.setattr(cpu_compiled, "compiler_missing", lambda: None)
    monkeypatch.setattr(cpu_compiled, "INDUCTOR_OPTIONS", {**cpu_compiled.INDUCTOR_OPTIONS, "cpp.cxx": ("/bin/false",),
                                                           "fx_graph_cache": False, "autotune_local_cache": False})
    model = copy.deepcopy(base)
    choice = choose_cpu_kernel(model, "compiled")
    assert choice.kernel == "default" and "next_token_logits" not in vars(model)
    assert "compiled not used: compiling it failed: " in choice.reason and "\n" not in choice.describe()
    assert torch.equal(greedy(model, PROMPT), greedy(base, PROMPT))
    graphs = counters["stats"]["unique_graphs"]
    with Counting(other) as counting:
        assert torch.equal(greedy(other, PROMPT), greedy(base, PROMPT)) and counting.calls == 15
    assert counters["stats"]["unique_graphs"] == graphs


def test_dropping_one_compiled_step_leaves_the_others(base, compiled):
    """Two compiled models in one process (a web page holds two): dropping one frees its own state only."""
    other, _ = compiled
    model = copy.deepcopy(base)
    assert choose_cpu_kernel(model, "compiled").kernel == "compiled"
    greedy(other, PROMPT, n=3)
    drop_compiled(model)
    assert current_kernel(model) == "default"
    graphs = counters["stats"]["unique_graphs"]
    with Counting(other) as counting:
        assert torch.equal(greedy(other, PROMPT), greedy(base, PROMPT)) and counting.calls == 15
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(greedy(model, PROMPT), greedy(base, PROMPT))


def test_moe_model_runs_on_auto_and_says_why():
    """Routing tokens to experts depends on the data: no single graph."""
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config(use_moe=True)).eval()
    choice = choose_cpu_kernel(model, "compiled")
    assert choice.kernel == "default" and "next_token_logits" not in vars(model)
    assert choice.reason.startswith("compiled not used: this model routes each token to experts (use_moe)")


def test_filling_the_cache_to_its_last_slot_does_not_compile_again(base, compiled):
    """The last slot makes the cached keys one contiguous block, which the compiled graph does not cover: that
    step runs the plain forward instead of compiling a second graph mid-answer, with the same logits."""
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


def test_a_3v_model_compiles_to_its_plain_tokens():
    """minimind-3v's attention (per-head q/k norms, rotate-half RoPE) in the compiled step."""
    torch.manual_seed(0)
    plain = MiniMindVLM(tiny_config(generation="3v")).eval()
    model = copy.deepcopy(plain)
    assert choose_cpu_kernel(model, "compiled").kernel == "compiled"
    with Counting(model) as counting:
        assert torch.equal(greedy(model, PROMPT), greedy(plain, PROMPT)) and counting.calls == 15
