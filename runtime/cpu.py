"""The CPU facts and the timing rule that inference (inference.cpu) and training (trainer.cpu_dtype) both choose by.

`faster_in_turns` is the one way this project decides between a plain path and a candidate by timing them: the
two run in turns (ABAB..., then BA... in alternate rounds, so a shared machine's load and any drift weigh on both
alike), and the candidate is kept only when it beats the plain path by the asked speed-up in a majority of the
rounds, not on one lucky timing. A candidate measured slower than the plain path is therefore never kept.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch


def native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16) or AMX tiles; without them bf16 products
    are emulated, slower than fp32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


@dataclass
class Turns:
    """What faster_in_turns measured: seconds of each run, per round, and the verdict."""

    plain_s: list[float] = field(default_factory=list)
    candidate_s: list[float] = field(default_factory=list)
    min_speedup: float = 1.0
    keep_candidate: bool = False

    @property
    def wins(self) -> int:
        """Rounds in which the candidate beat the plain path by min_speedup."""
        return sum(p >= self.min_speedup * c for p, c in zip(self.plain_s, self.candidate_s))

    @property
    def best_plain_s(self) -> float:
        return min(self.plain_s)

    @property
    def best_candidate_s(self) -> float:
        return min(self.candidate_s)

    def describe(self, plain: str, candidate: str) -> str:
        """e.g. 'default 8.10 ms, transposed 6.02 ms (best of 5 rounds in turns; transposed 1.05x faster in 4/5)'."""
        return (f"{plain} {1000 * self.best_plain_s:.2f} ms, {candidate} {1000 * self.best_candidate_s:.2f} ms "
                f"(best of {len(self.plain_s)} rounds in turns; {candidate} {self.min_speedup:.2f}x faster in "
                f"{self.wins}/{len(self.plain_s)})")


def faster_in_turns(plain: Callable[[], object], candidate: Callable[[], object], rounds: int = 5,
                    min_speedup: float = 1.05, warmup: bool = True) -> Turns:
    """Time `plain` and `candidate` (each one call = one measured run) in turns for `rounds` rounds, after one
    untimed warm-up call each (first-call set-up is not what the work costs per run), and keep the candidate
    only when it was at least `min_speedup` times faster than the plain run of the same round in more than half
    of the rounds. The order inside a round alternates, so neither side always runs first. A run that returns a
    float gives the seconds it measured itself (e.g. the best of a few repetitions); else its wall time counts."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    turns = Turns(min_speedup=min_speedup)
    if warmup:
        plain()
        candidate()
    for round_index in range(rounds):
        order = ((turns.plain_s, plain), (turns.candidate_s, candidate))
        for times, run in (order if round_index % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            measured = run()
            times.append(measured if isinstance(measured, float) else time.perf_counter() - start)
    turns.keep_candidate = turns.wins > rounds / 2
    return turns
