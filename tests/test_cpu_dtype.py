"""trainer/cpu_dtype.py: the CPU training dtype is chosen by timing, falls back to fp32 without native bf16, and
leaves the run's random state and weights as they were."""
from __future__ import annotations

import torch
from conftest import tiny_config

import trainer.cpu_dtype as cpu_dtype
from model.vlm import MiniMindVLM


def _tiny_model(tokenizer) -> MiniMindVLM:
    torch.manual_seed(0)
    return MiniMindVLM(tiny_config(tokenizer))


def test_no_native_bf16_means_float32_without_timing(monkeypatch, tokenizer):
    monkeypatch.setattr(cpu_dtype, "native_bf16", lambda: False)

    def never(*_args, **_kwargs):
        raise AssertionError("timed a dtype on a CPU without native bf16")

    monkeypatch.setattr(cpu_dtype, "_step_seconds", never)
    choice = cpu_dtype.choose_cpu_train_dtype(_tiny_model(tokenizer), batch_size=2, seq_len=8)
    assert not choice.bf16 and "no native bf16" in choice.line


def test_the_faster_dtype_is_chosen_by_its_measured_time(monkeypatch, tokenizer):
    monkeypatch.setattr(cpu_dtype, "native_bf16", lambda: True)
    model = _tiny_model(tokenizer)
    for fp32_s, bf16_s, chosen in [(0.10, 0.05, True), (0.10, 0.095, False), (0.05, 0.10, False)]:
        monkeypatch.setattr(cpu_dtype, "_step_seconds", lambda _m, _ids, bf16, reps, a=fp32_s, b=bf16_s: b if bf16 else a)
        choice = cpu_dtype.choose_cpu_train_dtype(model, batch_size=2, seq_len=8)
        assert choice.bf16 is chosen, (fp32_s, bf16_s, choice.line)
        assert f"fp32 {1000 * fp32_s:.0f} ms" in choice.line and f"bf16 {1000 * bf16_s:.0f} ms" in choice.line


def test_bf16_must_win_most_rounds_not_one(monkeypatch, tokenizer):
    """One lucky bf16 round (the best time of all) does not choose it: fp32 won the other two (runtime.cpu)."""
    monkeypatch.setattr(cpu_dtype, "native_bf16", lambda: True)
    bf16_runs = iter([0.10, 0.05, 0.20, 0.20])  # warm-up, then three rounds
    monkeypatch.setattr(cpu_dtype, "_step_seconds", lambda _m, _ids, bf16, reps: next(bf16_runs) if bf16 else 0.10)
    choice = cpu_dtype.choose_cpu_train_dtype(_tiny_model(tokenizer), batch_size=2, seq_len=8, rounds=3)
    assert not choice.bf16 and "bf16 50 ms" in choice.line and "1.10x faster in 1/3 rounds" in choice.line


def test_measuring_leaves_the_random_state_and_the_weights_alone(tokenizer):
    model = _tiny_model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    choice = cpu_dtype.choose_cpu_train_dtype(model, batch_size=2, seq_len=8, rounds=1, reps=1)
    assert torch.equal(torch.rand(4), expected), "the measurement drew from the run's random numbers"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert choice.line.startswith("CPU training dtype: ")
