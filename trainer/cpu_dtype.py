"""Which dtype trains faster on this CPU, measured: fp32, or bf16 autocast (the trainer's --cpu_bf16).

bf16 autocast pays off only where the CPU multiplies bf16 natively (AVX512-BF16, AMX), and by how much depends on
the CPU and the model's size (bench/RESULTS.md), with a slowdown where bf16 is emulated. So the choice is timed, not
assumed: forward/backward passes of the run's own model on a synthetic batch of its shape, fp32 and bf16 taking
turns (runtime.cpu.faster_in_turns: bf16 is taken only when it wins most rounds by MIN_SPEEDUP). The caller's
random number generators are left as they were, so a run that measures trains exactly as one that does not.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from model.vlm import MiniMindVLM
from runtime.cpu import faster_in_turns, native_bf16

# bf16 must beat fp32 by this much: below it, the run keeps fp32's precision for a gain within timing noise.
MIN_SPEEDUP = 1.10


@dataclass(frozen=True)
class DtypeChoice:
    bf16: bool  # train under CPU bf16 autocast
    line: str  # one line saying what was chosen and why


def _step_seconds(model: MiniMindVLM, input_ids: torch.Tensor, bf16: bool, reps: int) -> float:
    """Best-of-reps seconds of one forward (loss on every position) and backward of model on input_ids."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids, labels=input_ids, loss_only=True).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        best = min(best, time.perf_counter() - t0)
    return best


def choose_cpu_train_dtype(model: MiniMindVLM, batch_size: int, seq_len: int, rounds: int = 3,
                           reps: int = 2) -> DtypeChoice:
    """Time a training pass of a copy of `model` on a [batch_size, seq_len] batch in fp32 and in bf16 autocast
    (in turns, `rounds` times after one warm-up each, each turn the best of `reps` passes) and choose bf16 when it
    is MIN_SPEEDUP faster in most rounds."""
    if not native_bf16():
        return DtypeChoice(False, "CPU training dtype: float32 (this CPU has no native bf16: neither AVX512-BF16 "
                                  "nor AMX, so bf16 autocast would be emulated)")
    rng = torch.get_rng_state()
    try:
        probe = copy.deepcopy(model).float().train()
        ids = torch.randint(0, probe.config.vocab_size, (batch_size, seq_len))
        turns = faster_in_turns(lambda: _step_seconds(probe, ids, False, reps),
                                lambda: _step_seconds(probe, ids, True, reps), rounds=rounds, min_speedup=MIN_SPEEDUP)
    finally:
        torch.set_rng_state(rng)
    fp32_s, bf16_s = turns.best_plain_s, turns.best_candidate_s
    chosen = turns.keep_candidate
    return DtypeChoice(chosen, f"CPU training dtype: {'bfloat16 autocast' if chosen else 'float32'}, measured on "
                               f"this model at batch {batch_size} x {seq_len} tokens: fp32 {1000 * fp32_s:.0f} ms, "
                               f"bf16 {1000 * bf16_s:.0f} ms per forward and backward, best of each ("
                               f"{fp32_s / bf16_s:.2f}x); bf16 {MIN_SPEEDUP:.2f}x faster in {turns.wins}/{rounds} "
                               f"rounds in turns, chosen when that is a majority")
