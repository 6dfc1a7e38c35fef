"""inference.cpu.kernels, stacked and prepare: each eager fp32 path gives the default path's greedy tokens, auto keeps
a path only when the model's own decode steps measured it faster than the plain model in most rounds (never bf16,
never a slower path), the projections are stacked from the outside (the network has no hooks), the --cpu_kernel
names old and new, and the capability checks and bad inputs fail clearly. runtime.cpu's timing rule too."""
from __future__ import annotations

import argparse
import copy
import itertools

import pytest
import torch
from conftest import tiny_config

from inference.cpu import kernels as cpu_kernels
from inference.cpu.kernels import current_kernel, unavailable_reason
from inference.cpu.prepare import CHOICES, add_cpu_inference_args, choose_cpu_kernel, kernel_name
from inference.cpu.stacked import StackedQKVAttention, StackedSwiGLU, stack_projections
from model.decoder import Attention
from model.feed_forward import FeedForward
from model.vlm import MiniMindVLM, pad_rows
from runtime import cpu as runtime_cpu
from runtime.cpu import faster_in_turns

PROMPT = [[5, 17, 99, 240, 3, 77, 1000, 12]]
ROWS = [[5, 17, 99, 240, 3, 77, 1000, 12], [64, 2, 800, 31]]  # different lengths: left padding in a batch


@pytest.fixture(scope="module")
def base() -> MiniMindVLM:
    torch.manual_seed(0)
    return MiniMindVLM(tiny_config()).eval()


def greedy(model: MiniMindVLM, rows: list[list[int]], n: int = 16) -> torch.Tensor:
    ids, mask = pad_rows(rows, pad_id=0)
    return model.generate(ids, max_new_tokens=n, temperature=0.0, attention_mask=mask)


@pytest.fixture(autouse=True)
def fresh_measurements(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_MEASURED", {})


def decode_times(plain: list[float], converted: list[float]):
    """A stand-in for decode_seconds: these seconds per run, in turn, for the model as loaded and converted (the
    output head tells which is in place)."""
    runs = {False: itertools.cycle(plain), True: itertools.cycle(converted)}

    def timer(model, ids, steps):
        return next(runs[not isinstance(model.output, torch.nn.Linear)])
    return timer


@pytest.mark.parametrize("kernel", ["transposed", "onednn"])
def test_fp32_kernels_give_the_default_greedy_tokens(base, kernel):
    if unavailable_reason(kernel):
        pytest.skip(unavailable_reason(kernel))
    model = copy.deepcopy(base)
    choice = choose_cpu_kernel(model, kernel)  # older names, still accepted: that fixed eager path
    assert choice.kernel == kernel == current_kernel(model)
    with torch.inference_mode():
        ids = torch.tensor(PROMPT)
        assert torch.allclose(model(ids).logits, base(ids).logits, atol=1e-5, rtol=1e-4)
    assert torch.equal(greedy(model, PROMPT), greedy(base, PROMPT))
    assert torch.equal(greedy(model, ROWS), greedy(base, ROWS))  # batched, left-padded rows (the batcher's path)


def test_bf16_kernel_stays_close_to_fp32(base):
    if unavailable_reason("onednn_bf16"):
        with pytest.raises(ValueError, match="bf16 CPU kernel cannot run here: this CPU has no native bf16"):
            choose_cpu_kernel(copy.deepcopy(base), "bf16")
        pytest.skip(unavailable_reason("onednn_bf16"))
    model = copy.deepcopy(base)
    choice = choose_cpu_kernel(model, "bf16")
    assert choice.kernel == "bf16" and "answers may differ" in choice.reason
    with torch.inference_mode():
        ids = torch.tensor(PROMPT)
        ref, out = base(ids).logits, model(ids).logits
    assert out.dtype == torch.float32
    # bf16 weights keep 8 bits of mantissa: logits move by a few percent of their spread, not more
    assert (out - ref).abs().max() < 0.05 * ref.std()


@pytest.mark.parametrize("plain, converted, kept", [
    ([1.0], [0.5], True),  # clearly faster every round
    ([1.0], [1.2], False),  # slower: never kept
    ([1.0], [0.98], False),  # faster by less than MIN_SPEEDUP: within a shared machine's noise
    ([1.0, 1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 1.5, 1.5, 1.5], False),  # one lucky best time, lost most rounds
    ([1.0, 1.0, 1.0, 1.0, 1.0], [0.5, 1.5, 0.5, 0.5, 1.5], True),  # won 3 of 5 rounds
])
def test_auto_keeps_a_path_only_when_the_decode_steps_win_most_rounds(base, monkeypatch, plain, converted, kept):
    monkeypatch.setattr(cpu_kernels, "decode_seconds", decode_times(plain, [converted[-1]] + converted))
    monkeypatch.setattr(cpu_kernels, "screen_kernels", lambda linears, first, second: "transposed")
    model = copy.deepcopy(base)
    choice = choose_cpu_kernel(model, "auto")
    assert choice.kernel == ("transposed" if kept else "default") == current_kernel(model)
    assert "in turns" in choice.reason and "transposed screened fastest" in choice.reason
    assert ("default kept" in choice.reason) != kept
    assert isinstance(model.layers[0].attention, StackedQKVAttention) == kept  # a refused path leaves no trace
    assert torch.equal(greedy(model, PROMPT), greedy(base, PROMPT))


def test_auto_never_tries_bf16(base, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "native_bf16", lambda: True)
    screened = []
    monkeypatch.setattr(cpu_kernels, "screen_kernels", lambda linears, *kernels: screened.append(kernels) or
                        kernels[0])
    monkeypatch.setattr(cpu_kernels, "decode_seconds", decode_times([1.0], [0.5]))
    choose_cpu_kernel(copy.deepcopy(base), "auto")
    assert all(k in cpu_kernels.FP32_KERNELS for kernels in screened for k in kernels)


def test_screening_takes_the_faster_of_two_eager_paths(base, monkeypatch):
    kernels = [k for k in ("transposed", "onednn") if unavailable_reason(k) is None]
    if len(kernels) < 2:
        pytest.skip("needs both fp32 paths")
    linears = cpu_kernels.measured_linears(base)
    assert cpu_kernels.screen_kernels(linears, *kernels, rounds=1) in kernels  # real timing: one of them
    fake = runtime_cpu.Turns([1.0] * 3, [0.5] * 3, 1.0, True)
    monkeypatch.setattr(cpu_kernels, "faster_in_turns", lambda *a, **k: fake)
    assert cpu_kernels.screen_kernels(linears, "transposed", "onednn") == "onednn"


def test_without_onednn_only_the_mkl_paths_are_tried(base, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "onednn_available", lambda: False)
    monkeypatch.setattr(cpu_kernels, "decode_seconds", decode_times([1.0], [1.0]))
    choice = choose_cpu_kernel(copy.deepcopy(base), "auto")
    assert choice.kernel == "default" and set(choice.times_ms) == {"default", "transposed"}
    assert "onednn not tried" in choice.reason
    with pytest.raises(ValueError, match="no oneDNN"):
        choose_cpu_kernel(copy.deepcopy(base), "onednn")


def test_measurement_runs_once_per_process_for_the_same_shapes(base, monkeypatch):
    calls = []
    timer = decode_times([1.0], [1.0])
    monkeypatch.setattr(cpu_kernels, "decode_seconds", lambda *a: calls.append(1) or timer(*a))
    for _ in range(2):
        assert choose_cpu_kernel(copy.deepcopy(base), "auto").kernel == "default"
    assert len(calls) == 2 * (5 + 1)  # 5 rounds and a warm-up, plain and converted, measured once


def test_measuring_at_load_leaves_the_random_generator_alone(base):
    """An app that seeds before loading the model gets the same samples whatever the measurement did (real
    timing: the screen and the decode steps)."""
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    choice = choose_cpu_kernel(copy.deepcopy(base), "auto")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert choice.kernel in cpu_kernels.FP32_KERNELS and "measured a prefill and 24 decode steps" in choice.reason


def test_models_the_kernels_do_not_apply_to(base):
    on_meta = copy.deepcopy(base).to("meta")  # stands in for a GPU model: not on the CPU
    choice = choose_cpu_kernel(on_meta, "auto")
    assert choice.kernel == "default" and "the model is on meta" in choice.reason
    with pytest.raises(ValueError, match="transposed CPU kernel cannot run this model: the model is on meta"):
        choose_cpu_kernel(on_meta, "transposed")
    in_bf16 = copy.deepcopy(base).to(torch.bfloat16)
    assert "weights are bfloat16" in choose_cpu_kernel(in_bf16, "auto").reason
    with pytest.raises(ValueError, match="unknown CPU kernel 'fast'"):
        choose_cpu_kernel(copy.deepcopy(base), "fast")


def test_a_converted_model_is_inference_only_and_converted_once(base):
    model = copy.deepcopy(base)
    choose_cpu_kernel(model, "transposed")
    with pytest.raises(ValueError, match="already runs on the transposed CPU kernel"):
        choose_cpu_kernel(model, "auto")
    with pytest.raises(RuntimeError, match="cannot be moved or cast"):
        model.to(torch.bfloat16)
    x = torch.randn(1, 1, base.config.dim, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference only"):
        model.layers[0].attention.wqkv(x)
    # the tied embedding keeps its weight: prompts are still embedded
    assert model.tok_embeddings.weight.shape == base.tok_embeddings.weight.shape


def test_moe_experts_and_bias_checks():
    torch.manual_seed(0)
    moe = MiniMindVLM(tiny_config(use_moe=True)).eval()
    model = copy.deepcopy(moe)
    choose_cpu_kernel(model, "transposed")  # every expert's linears too (routing picks them per token)
    assert all(isinstance(e, StackedSwiGLU) for e in model.layers[0].feed_forward.experts)
    assert torch.equal(greedy(model, PROMPT, 8), greedy(moe, PROMPT, 8))
    with pytest.raises(ValueError, match="the transposed CPU kernel takes linear layers without a bias"):
        cpu_kernels.convert_linear(torch.nn.Linear(4, 4), "transposed")


def test_stacked_projections_are_swapped_in_from_the_outside_with_the_same_outputs(base):
    plain = Attention(base.config), FeedForward(base.config)
    assert not any(hasattr(m, name) for m in plain for name in ("wqkv", "w13"))  # the network has no hooks
    model = copy.deepcopy(base)
    stack_projections(model)
    attention, ffn = model.layers[0].attention, model.layers[0].feed_forward
    assert isinstance(attention, StackedQKVAttention) and isinstance(ffn, StackedSwiGLU)
    assert not any(hasattr(attention, p) for p in ("wq", "wk", "wv")) and not hasattr(ffn, "w1")
    assert attention.wo is base.layers[0].attention.wo or torch.equal(attention.wo.weight,
                                                                      base.layers[0].attention.wo.weight)
    config = base.config
    assert attention.wqkv.out_features == (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
    assert ffn.w13.out_features == 2 * config.ffn_hidden_dim
    with torch.inference_mode():
        ids = torch.tensor(PROMPT)
        assert torch.allclose(model(ids).logits, base(ids).logits, atol=1e-6, rtol=1e-5)
    converted = copy.deepcopy(base)
    choose_cpu_kernel(converted, "transposed")
    linears = [name for parent in converted.layers[0].modules() for name, child in parent.named_children()
               if isinstance(child, cpu_kernels.TransposedLinear)]
    assert sorted(linears) == ["w13", "w2", "wo", "wqkv"]


def test_kernel_names_old_and_new():
    assert CHOICES == ("auto", "default", "compiled", "bf16", "int8")
    assert [kernel_name(k) for k in ("onednn_bf16", "auto_bf16", "auto_compile", "transposed", "auto")] == \
        ["bf16", "bf16", "compiled", "transposed", "auto"]
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_cpu_inference_args(parser)
    assert parser.parse_args(["--cpu_kernel", "auto_compile"]).cpu_kernel == "compiled"
    assert parser.parse_args([]).cpu_kernel == "auto"
    with pytest.raises(argparse.ArgumentError, match="invalid choice: 'fastest'"):
        parser.parse_args(["--cpu_kernel", "fastest"])


@pytest.mark.parametrize("plain, candidate, kept, wins", [
    ([1.0, 1.0, 1.0], [0.5, 0.5, 0.5], True, 3),
    ([1.0, 1.0, 1.0], [0.5, 1.5, 1.5], False, 1),  # its best time is the better one, its rounds are not
    ([1.0, 1.0, 1.0], [0.96, 0.96, 0.96], False, 0),  # under the asked speed-up
    ([1.0, 1.0, 1.0], [1.1, 1.1, 1.1], False, 0),
])
def test_faster_in_turns_needs_a_majority_of_rounds(plain, candidate, kept, wins):
    order: list[str] = []
    runs = {"plain": iter([9.0] + plain), "candidate": iter([9.0] + candidate)}  # a warm-up each first

    def run(name):
        return lambda: order.append(name) or runs[name].__next__()

    turns = faster_in_turns(run("plain"), run("candidate"), rounds=3, min_speedup=1.05)
    assert (turns.keep_candidate, turns.wins) == (kept, wins)
    assert order == ["plain", "candidate", "plain", "candidate", "candidate", "plain", "plain", "candidate"]
    assert turns.best_plain_s == 1.0 and "3 rounds in turns" in turns.describe("a", "b")


def test_stacked_and_converted_3v_model_gives_the_plain_logits():
    """minimind-3v's attention (per-head q/k norms, rotate-half RoPE) keeps them in its stacked form."""
    torch.manual_seed(0)
    plain = MiniMindVLM(tiny_config(generation="3v")).eval()
    ids = torch.tensor(PROMPT)
    for kernel in ("default", "transposed"):
        model = copy.deepcopy(plain)
        stack_projections(model)
        cpu_kernels.use_kernel(model, kernel)
        with torch.inference_mode():
            assert torch.allclose(model(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-4), kernel
    assert torch.equal(greedy(model, ROWS), greedy(plain, ROWS))
