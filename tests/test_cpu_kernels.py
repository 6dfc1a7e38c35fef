"""inference.cpu.kernels: each fp32 kernel path gives the default path's greedy tokens, the automatic choice follows
the measured times (and never takes bf16 unasked), and the capability checks and bad inputs fail clearly."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config

from inference.cpu import kernels as cpu_kernels
from inference.cpu.kernels import choose_cpu_kernel, current_kernel, pick_fastest, unavailable_reason
from model.vlm import MiniMindVLM, pad_rows

PROMPT = [[5, 17, 99, 240, 3, 77, 1000, 12]]
ROWS = [[5, 17, 99, 240, 3, 77, 1000, 12], [64, 2, 800, 31]]  # different lengths: left padding in a batch


@pytest.fixture(scope="module")
def base() -> MiniMindVLM:
    torch.manual_seed(0)
    return MiniMindVLM(tiny_config()).eval()


def greedy(model: MiniMindVLM, rows: list[list[int]], n: int = 16) -> torch.Tensor:
    ids, mask = pad_rows(rows, pad_id=0)
    return model.generate(ids, max_new_tokens=n, temperature=0.0, attention_mask=mask)


def fixed_times(times: dict[str, float]):
    """A stand-in for time_kernels that returns these seconds per pass for whichever kernels are asked."""
    def timer(linears, kernels):
        return {k: times[k] for k in kernels}
    return timer


@pytest.fixture(autouse=True)
def fresh_measurements(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_MEASURED", {})


@pytest.mark.parametrize("kernel", ["transposed", "onednn"])
def test_fp32_kernels_give_the_default_greedy_tokens(base, kernel):
    if unavailable_reason(kernel):
        pytest.skip(unavailable_reason(kernel))
    model = copy.deepcopy(base)
    choice = choose_cpu_kernel(model, kernel)
    assert choice.kernel == kernel == current_kernel(model)
    with torch.inference_mode():
        ids = torch.tensor(PROMPT)
        assert torch.allclose(model(ids).logits, base(ids).logits, atol=1e-5, rtol=1e-4)
    assert torch.equal(greedy(model, PROMPT), greedy(base, PROMPT))
    assert torch.equal(greedy(model, ROWS), greedy(base, ROWS))  # batched, left-padded rows (the batcher's path)


def test_bf16_kernel_stays_close_to_fp32(base):
    if unavailable_reason("onednn_bf16"):
        pytest.skip(unavailable_reason("onednn_bf16"))
    model = copy.deepcopy(base)
    assert "answers may differ" in choose_cpu_kernel(model, "onednn_bf16").reason
    with torch.inference_mode():
        ids = torch.tensor(PROMPT)
        ref, out = base(ids).logits, model(ids).logits
    assert out.dtype == torch.float32
    # bf16 weights keep 8 bits of mantissa: logits move by a few percent of their spread, not more
    assert (out - ref).abs().max() < 0.05 * ref.std()


def test_auto_takes_the_measured_fastest_fp32_path_and_never_bf16(base, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "native_bf16", lambda: True)
    timer = fixed_times({"default": 1.0, "transposed": 0.6, "onednn": 0.7, "onednn_bf16": 0.1})
    monkeypatch.setattr(cpu_kernels, "time_kernels", timer)
    model = copy.deepcopy(base)
    choice = choose_cpu_kernel(model, "auto")
    assert choice.kernel == "transposed" == current_kernel(model)
    fp32_paths = {k for k in cpu_kernels.FP32_KERNELS if unavailable_reason(k) is None}
    assert set(choice.times_ms) == fp32_paths  # bf16 not even timed
    assert "transposed 600.00" in choice.describe() and "default 1000.00" in choice.describe()
    if unavailable_reason("onednn_bf16") is None:  # asked for (the capability patched on) and measured fastest
        choice = choose_cpu_kernel(copy.deepcopy(base), "auto_bf16")
        assert choice.kernel == "onednn_bf16" and "answers may differ from fp32" in choice.reason


def test_default_is_kept_unless_a_path_is_clearly_faster():
    assert pick_fastest({"default": 1.0, "transposed": 0.97, "onednn": 0.99}) == "default"
    assert pick_fastest({"default": 1.0, "transposed": 0.9, "onednn": 0.8}) == "onednn"
    assert pick_fastest({"default": 0.5, "transposed": 0.9}) == "default"


def test_without_native_bf16_auto_bf16_falls_back_to_fp32_and_says_why(base, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "native_bf16", lambda: False)
    monkeypatch.setattr(cpu_kernels, "time_kernels", fixed_times({"default": 1.0, "transposed": 0.5, "onednn": 0.9}))
    model = copy.deepcopy(base)
    choice = choose_cpu_kernel(model, "auto_bf16")
    assert choice.kernel == "transposed" and "onednn_bf16" not in choice.times_ms
    assert "onednn_bf16 not tried: this CPU has no native bf16" in choice.reason
    with pytest.raises(ValueError, match="onednn_bf16 CPU kernel cannot run here: this CPU has no native bf16"):
        choose_cpu_kernel(copy.deepcopy(base), "onednn_bf16")


def test_without_onednn_only_the_mkl_paths_are_tried(base, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "onednn_available", lambda: False)
    monkeypatch.setattr(cpu_kernels, "time_kernels", fixed_times({"default": 1.0, "transposed": 0.99}))
    choice = choose_cpu_kernel(copy.deepcopy(base), "auto")
    assert choice.kernel == "default" and set(choice.times_ms) == {"default", "transposed"}
    assert "onednn not tried" in choice.reason
    with pytest.raises(ValueError, match="no oneDNN"):
        choose_cpu_kernel(copy.deepcopy(base), "onednn")


def test_measurement_runs_once_per_process_for_the_same_shapes(base, monkeypatch):
    calls = []

    def timer(linears, kernels):
        calls.append(len(linears))
        return {k: 1.0 for k in kernels}

    monkeypatch.setattr(cpu_kernels, "time_kernels", timer)
    for _ in range(2):
        assert choose_cpu_kernel(copy.deepcopy(base), "auto").kernel == "default"
    assert calls == [2 * 7 + 1]  # 7 linears per block, 2 blocks, and the output head, measured once


def test_real_timing_returns_a_time_per_kernel(base):
    kernels = [k for k in cpu_kernels.FP32_KERNELS if unavailable_reason(k) is None]
    times = cpu_kernels.time_kernels(cpu_kernels.measured_linears(base), kernels, rounds=1)
    assert set(times) == set(kernels) and all(0 < t < float("inf") for t in times.values())


def test_measuring_at_load_leaves_the_random_generator_alone(base):
    """An app that seeds before loading the model gets the same samples whatever the kernel measurement did."""
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    choose_cpu_kernel(copy.deepcopy(base), "auto")
    assert torch.equal(torch.random.get_rng_state(), state)


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
    assert torch.equal(greedy(model, PROMPT, 8), greedy(moe, PROMPT, 8))
    with pytest.raises(ValueError, match="the transposed CPU kernel takes linear layers without a bias"):
        cpu_kernels.convert_linear(torch.nn.Linear(4, 4), "transposed")


def test_packed_kernels_run_on_stacked_projections_with_the_same_outputs(base):
    model = copy.deepcopy(base)
    cpu_kernels.fuse_projections(model)
    attention, ffn = model.layers[0].attention, model.layers[0].feed_forward
    assert attention.wq is attention.wk is attention.wv is ffn.w1 is ffn.w3 is None
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
