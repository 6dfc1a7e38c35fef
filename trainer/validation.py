"""Validation while training: the loss on a held-out data file and greedy exact-match accuracy on its answers.

Every rank evaluates its own slice of the validation samples (rank r takes samples r, r + world, ...); the sums
are all-reduced, so under DDP every rank takes part and each gets the same result (rank 0 reports it).
Accuracy is scored on the first answer of each record (question/answer records), on the first `max_scored`
samples: the prompt is everything before that answer (its images included), the model answers greedily, and
the text is compared after lower-casing and trimming trailing punctuation, as model/evaluate.py scores.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
import torch.distributed as torch_dist

from data_pipeline.dataset import IGNORE_INDEX, Sample, VLMDataset, collate
from data_pipeline.feature_store import batch_features
from inference.evaluate import normalise
from model.vision import VisionEncoder
from model.vlm import pad_rows

from .distributed import Distributed


@dataclass
class ValidationResult:
    loss: float  # mean over supervised tokens, as the training loss
    accuracy: Optional[float]  # None when nothing was scored
    n_samples: int  # samples the loss covers (those whose images decoded)
    n_scored: int  # answers scored for accuracy
    seconds: float

    def metrics(self) -> dict[str, float]:
        out = {"val_loss": self.loss}
        if self.accuracy is not None:
            out["val_accuracy"] = self.accuracy
        return out

    @property
    def score(self) -> float:
        """Higher is better: the accuracy when answers were scored, else the negative loss."""
        return self.accuracy if self.accuracy is not None else -self.loss

    def line(self) -> str:
        acc = f" val_accuracy {self.accuracy:.3f} (n={self.n_scored})" if self.accuracy is not None else ""
        return f"validation: val_loss {self.loss:.4f}{acc} on {self.n_samples} samples ({self.seconds:.1f}s)"


def answer_span(sample: Sample) -> tuple[int, int]:
    """(start, end) of the first supervised run of tokens: the first answer with its `</s>` and newline."""
    start = next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)
    end = start
    while end < len(sample.labels) and sample.labels[end] != IGNORE_INDEX:
        end += 1
    return start, end


class Validator:
    """Evaluates a model on this rank's share of a validation dataset; `run` returns the all-ranks result."""

    def __init__(self, dataset: VLMDataset, tokenizer, encoder: VisionEncoder, dist: Distributed, batch_size: int,
                 max_scored: int, autocast: Callable[[], ContextManager]):
        self.dataset, self.tokenizer, self.encoder, self.dist = dataset, tokenizer, encoder, dist
        self.batch_size, self.autocast = batch_size, autocast
        self.loss_indices = list(range(dist.rank, len(dataset), dist.world))
        self.scored_indices = list(range(dist.rank, min(max_scored, len(dataset)), dist.world))

    @torch.no_grad()
    def run(self, model) -> ValidationResult:
        """Evaluate `model` (put back in training mode afterwards when it was); every rank must call this."""
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            loss_sum, n_tokens, n_samples = self._loss(model)
            correct, scored = self._exact_match(model)
        finally:
            model.train(was_training)
        totals = torch.tensor([loss_sum, n_tokens, n_samples, correct, scored], dtype=torch.float64)
        if self.dist.enabled:
            totals = totals.to(self.dist.device)
            torch_dist.all_reduce(totals)
        loss_sum, n_tokens, n_samples, correct, scored = totals.tolist()
        return ValidationResult(loss_sum / max(n_tokens, 1), correct / scored if scored else None, int(n_samples),
                                int(scored), time.perf_counter() - t0)

    def _loss(self, model) -> tuple[float, int, int]:
        device = self.dist.device
        loss_sum, n_tokens, n_samples = 0.0, 0, 0
        for i in range(0, len(self.loss_indices), self.batch_size):
            batch = collate([self.dataset[j] for j in self.loss_indices[i:i + self.batch_size]])
            if batch.empty or batch.supervised == 0:
                continue
            with self.autocast():
                loss = model(batch.input_ids.to(device), batch_features(batch, self.encoder, device),
                             labels=batch.labels.to(device), loss_only=True).loss
            loss_sum += float(loss) * batch.supervised
            n_tokens += batch.supervised
            n_samples += len(batch.lengths)
        return loss_sum, n_tokens, n_samples

    def _exact_match(self, model) -> tuple[int, int]:
        """Greedy answers to the first question of each scored sample; left-padded batches with a mask give
        the same tokens as one question at a time."""
        device, eos = self.dist.device, self.tokenizer.eos_token_id
        correct = scored = 0
        for i in range(0, len(self.scored_indices), self.batch_size):
            good = [(j, it) for j in self.scored_indices[i:i + self.batch_size] for it in [self.dataset[j]]
                    if "error" not in it]
            if not good:
                continue
            prompts, answers = [], []
            for j, it in good:
                start, end = answer_span(self.dataset.samples[j])
                prompts.append(it["input_ids"][:start])
                answers.append(self.tokenizer.decode(it["input_ids"][start:end], skip_special_tokens=True))
                it["input_ids"], it["labels"] = prompts[-1], it["labels"][:start]
            features = batch_features(collate([it for _, it in good]), self.encoder, device)
            ids, mask = pad_rows(prompts, eos, "left", device=device)
            max_new = max(len(self.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers) + 2
            with self.autocast():
                out = model.generate(ids, features, max_new_tokens=max_new, temperature=0.0, eos_token_id=eos,
                                     attention_mask=mask)
            for row, answer in zip(out.tolist(), answers):
                if eos in row:
                    row = row[:row.index(eos)]
                correct += normalise(self.tokenizer.decode(row, skip_special_tokens=True)) == normalise(answer)
                scored += 1
        return correct, scored
