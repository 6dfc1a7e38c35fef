"""Validation while training: the loss on a held-out data file and greedy exact-match accuracy on its answers.

Every rank evaluates its own slice of the validation samples (rank r takes samples r, r + world, ...); the sums
are all-reduced, so under DDP every rank takes part and each gets the same result (rank 0 reports it).
Accuracy is scored on the first answer of each record (question/answer records), up to `max_samples` of them:
the prompt is everything before that answer (images included), the model answers greedily, and the text is
compared after lower-casing and trimming trailing punctuation, as model/evaluate.py scores the demo.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .dataset import IGNORE_INDEX, Sample, VLMDataset, collate
from .evaluate import normalise
from .model import MiniMindVLM


@dataclass
class ValidationResult:
    loss: float  # mean over supervised tokens, as the training loss
    accuracy: Optional[float]  # None when no record was scored
    n_samples: int  # samples the loss covers (those whose images decoded)
    n_scored: int  # answers scored for accuracy
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        out = {"val_loss": self.loss}
        if self.accuracy is not None:
            out["val_accuracy"] = self.accuracy
        return out

    def line(self) -> str:
        acc = f" val_acc {self.accuracy:.3f} (n={self.n_scored})" if self.accuracy is not None else ""
        return f"val_loss {self.loss:.4f}{acc} ({self.n_samples} samples, {self.seconds:.1f}s)"


def answer_span(sample: Sample) -> tuple[int, int]:
    """(start, end) of the first supervised run of tokens: the first answer with its `</s>` and newline."""
    start = next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)
    end = start
    while end < len(sample.labels) and sample.labels[end] != IGNORE_INDEX:
        end += 1
    return start, end


FeatureFn = Callable[[dict], Optional[torch.Tensor]]  # a collated batch -> image features on the device


@torch.no_grad()
def validation_loss(model: MiniMindVLM, dataset: VLMDataset, indices: list[int], batch_size: int,
                    features_of: FeatureFn, autocast=contextlib.nullcontext) -> tuple[float, int, int]:
    """(sum of token losses, supervised tokens, samples) over the given samples, in batches."""
    device = next(model.parameters()).device
    loss_sum, n_tokens, n_samples = 0.0, 0, 0
    for i in range(0, len(indices), batch_size):
        batch = collate([dataset[j] for j in indices[i:i + batch_size]])
        if "input_ids" not in batch:
            continue
        labels = batch["labels"].to(device)
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        if n == 0:
            continue
        with autocast():
            loss = model(batch["input_ids"].to(device), features_of(batch), labels=labels, loss_only=True).loss
        loss_sum += float(loss) * n
        n_tokens += n
        n_samples += batch["input_ids"].shape[0]
    return loss_sum, n_tokens, n_samples


@torch.no_grad()
def greedy_exact_match(model: MiniMindVLM, tokenizer, dataset: VLMDataset, indices: list[int], batch_size: int,
                       features_of: FeatureFn, autocast=contextlib.nullcontext) -> tuple[int, int]:
    """(correct, scored): greedy answers to the first question of each sample, exact match after normalising.
    Prompts of equal length are decoded together (no padding, so the same result as one by one)."""
    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = {}
    for j in indices:
        start, _ = answer_span(dataset.samples[j])
        by_length.setdefault(start, []).append(j)
    correct = scored = 0
    for start, group in by_length.items():
        for i in range(0, len(group), batch_size):
            good = [(j, it) for j in group[i:i + batch_size] for it in [dataset[j]] if "error" not in it]
            if not good:
                continue
            answers = []
            for j, it in good:
                a, b = answer_span(dataset.samples[j])
                answers.append(tokenizer.decode(it["input_ids"][a:b], skip_special_tokens=True))
                it["input_ids"], it["labels"] = it["input_ids"][:start], it["labels"][:start]
            batch = collate([it for _, it in good])
            max_new = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers) + 2
            with autocast():
                out = model.generate(batch["input_ids"].to(device), features_of(batch), max_new_tokens=max_new,
                                     temperature=0.0, eos_token_id=tokenizer.eos_token_id)
            for row, answer in zip(out.tolist(), answers):
                if tokenizer.eos_token_id in row:
                    row = row[:row.index(tokenizer.eos_token_id)]
                predicted = tokenizer.decode(row, skip_special_tokens=True)
                correct += normalise(predicted) == normalise(answer)
                scored += 1
    return correct, scored
