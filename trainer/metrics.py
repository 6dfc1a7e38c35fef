"""What the training log reports: throughput, MFU against the device's peak, peak memory, and the log line itself.

FLOPs come from `LMConfig.train_flops`, the one FLOP model shared with bench/train_throughput.py.
"""
from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

# Dense matmul peaks (FLOP/s, bf16/fp16; fp32 counts half) from the vendors' datasheets.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "4090": 165e12, "3090": 71e12, "L4": 121e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """The datasheet dense matmul peak of a known GPU; None elsewhere (a CPU's peak depends on the machine and its
    load: bench/train_throughput.py measures it and reports MFU against that)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in GPU_PEAK_FLOPS.items():
        if key in name:
            return value if dtype != torch.float32 else value / 2
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or this process's peak resident set on CPU (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class StepMetrics:
    """What one optimizer step trained on and its result."""

    loss: float  # mean loss of the step's micro-batches (NaN when none trained)
    micro_batches: int
    tokens: int = 0  # real tokens
    padded_tokens: int = 0  # positions the model ran on, padding included (rows x padded length)
    images: int = 0
    flops: float = 0.0  # LMConfig.train_flops of the step
    non_finite: bool = False  # a non-finite loss or gradient: the update was not applied


@dataclass
class ProgressWindow:
    """Sums over one log interval; `report` turns them into rates and starts the next interval."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    images: int = 0
    flops: float = 0.0
    data_wait: float = 0.0  # seconds spent waiting for the data loader
    losses: list[float] = field(default_factory=list)

    def add(self, m: StepMetrics) -> None:
        self.steps += 1
        self.tokens, self.images, self.flops = self.tokens + m.tokens, self.images + m.images, self.flops + m.flops
        self.padded_tokens += m.padded_tokens
        if math.isfinite(m.loss):  # a NaN step stays out of the curve
            self.losses.append(m.loss)

    def report(self, world: int, peak: Optional[float], steps_left: int) -> dict[str, Any]:
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        out = {"loss": sum(self.losses) / len(self.losses) if self.losses else float("nan"),
               "tokens_per_s": self.tokens * world / elapsed, "images_per_s": self.images * world / elapsed,
               "mfu": self.flops / elapsed / peak if peak else None,
               "data_wait_pct": 100 * self.data_wait / elapsed,
               "padding_pct": 100 * (1 - self.tokens / self.padded_tokens) if self.padded_tokens else 0.0,
               "eta_min": steps_left * elapsed / max(self.steps, 1) / 60,
               "tokens": self.tokens, "padded_tokens": self.padded_tokens}
        self.__init__(start=now)
        return out


def progress_line(epoch: str, step: int, max_steps: int, lr: float, r: dict[str, Any], memory_mb: float) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    return (f"epoch {epoch} step {step}/{max_steps} loss {r['loss']:.4f} lr {lr:.3e} | {r['tokens_per_s']:,.0f} tok/s "
            f"{r['images_per_s']:,.1f} img/s MFU {mfu} data-wait {r['data_wait_pct']:.1f}% pad {r['padding_pct']:.1f}% | "
            f"ETA {r['eta_min']:.1f} min | peak mem {memory_mb:,.0f} MB")


def drop_records_after(path: str, step: int) -> int:
    """Keep only the records of steps <= step in a metrics JSONL file (atomically); returns how many were dropped.

    A run killed after logging a step but before saving it redoes that step when resumed: without this its record
    would appear twice. Lines that do not parse (a write cut by the kill) are dropped too."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = isinstance(record, dict) and int(record.get("step", step + 1)) <= step
            except (ValueError, TypeError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


def append_jsonl(path: str, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
