"""Training-order samplers: shuffled (DistributedSampler) or grouped by length, both able to resume mid-epoch.

Grouping by length (--group_by_length) follows LLaVA's length-grouped sampler: shuffle all samples, cut the
order into mega-batches of several global batches, sort each mega-batch by length (longest first) and cut it
into batches, so a batch holds samples of similar length and needs little padding. The order of the batches
inside a mega-batch is shuffled too, so short and long batches alternate. Everything is drawn from a generator
seeded with seed + epoch, so an epoch's order is fixed and a resumed run continues exactly.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler

MEGA_BATCH_MULT = 50  # global batches per mega-batch (fewer for small datasets)


def length_grouped_order(lengths: Sequence[int], global_batch: int, generator: torch.Generator) -> list[int]:
    """All sample indices, shuffled, in runs of `global_batch` samples of similar length."""
    n = len(lengths)
    mult = max(1, min(n // (global_batch * 4), MEGA_BATCH_MULT))
    mega = global_batch * mult
    order = torch.randperm(n, generator=generator).tolist()
    out: list[int] = []
    for start in range(0, n, mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches = [chunk[i:i + global_batch] for i in range(0, len(chunk), global_batch)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            out.extend(batches[b])
    return out


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch; set_epoch each epoch) that can start `skip` samples in."""

    skip = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.skip:])


class LengthGroupedSampler(ResumableSampler):
    """This rank's share of a length-grouped order: rank r takes every world-th index, so each of its batches
    comes from one global batch of similar lengths. Padded to equal shares like DistributedSampler."""

    def __init__(self, dataset, lengths: Sequence[int], batch_size: int, num_replicas: int, rank: int,
                 seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.lengths, self.batch_size = list(lengths), batch_size

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = length_grouped_order(self.lengths, self.batch_size * self.num_replicas, g)
        while len(order) < self.total_size:  # equal shares for every rank, as DistributedSampler pads
            order += order[:self.total_size - len(order)]
        return iter(order[self.rank:self.total_size:self.num_replicas][self.skip:])
