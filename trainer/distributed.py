"""Single process or DDP under torchrun (NCCL on GPU, gloo on CPU): setup, the few collectives the trainer needs,
and the end-of-run check that every replica holds the same weights."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger("minimind")


@dataclass(frozen=True)
class Distributed:
    enabled: bool
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, requested_device: str) -> "Distributed":
        """Join the process group when torchrun started this process; otherwise run on `requested_device`."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls(False, 0, 1, torch.device(requested_device))
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available() and str(requested_device).startswith("cuda"):
            device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
            torch.cuda.set_device(device)
            dist.init_process_group("nccl")
        else:
            device = torch.device("cpu")
            dist.init_process_group("gloo")
        return cls(True, rank, world, device)

    def close(self, finished: bool = False) -> None:
        """Leave the process group. After a finished run every rank first waits for the others: a rank that tore
        down gloo's connections while another was still in its last collective made that one abort ("terminate
        called without an active exception"). After an error there is no barrier, since another rank may be gone."""
        if self.enabled and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        """`obj` from every rank, in rank order (a one-item list in a single process)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank, so all ranks take the same branch."""
        if not self.enabled:
            return flag
        t = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def wrap(self, model: torch.nn.Module, find_unused_parameters: bool) -> torch.nn.Module:
        if not self.enabled:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       find_unused_parameters=find_unused_parameters)

    def check_replicas(self, model: torch.nn.Module) -> None:
        """DDP keeps replicas identical; verify it and say so (a mismatch is a bug worth stopping for)."""
        if not self.enabled:
            return
        checksum = torch.tensor([sum(float(p.double().sum()) for p in model.parameters())], dtype=torch.float64)
        gathered = [torch.zeros_like(checksum) for _ in range(self.world)]
        dist.all_gather(gathered, checksum)
        print(f"rank {self.rank} weights checksum {checksum.item():.10e}", flush=True)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"DDP replicas differ after training: {[g.item() for g in gathered]}")
        if self.is_main:
            log.info("replicas identical across %d ranks", len(gathered))
