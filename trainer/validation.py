"""Validation while training: the loss on a held-out data file and greedy exact-match accuracy on its answers.

Every rank evaluates its own slice of the validation samples (rank r takes samples r, r + world, ...); the sums
are all-reduced, so under DDP every rank takes part and each gets the same result (rank 0 reports it).
Accuracy is scored on the first answer of each record (question/answer records), on the first `max_scored`
samples: the prompt is everything before that answer (its images included), the model answers greedily, and
the text is compared after lower-casing and trimming trailing punctuation (evaluation/exact_match.py, which
evaluation/held_out.py scores with too). A validation in which no sample could be used (every image failed to
decode) reports "no samples scored" and has no score: it never counts as the best.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

import torch
import torch.distributed as torch_dist

from data_pipeline.dataset import VLMDataset, collate
from data_pipeline.tokens import IGNORE_INDEX, Sample
from data_pipeline.v3_tokens import EMPTY_THINK
from data_pipeline.feature_store import batch_features
from evaluation.exact_match import exact_match, greedy_answers
from model.vision import VisionEncoder

from .distributed import Distributed


NO_SAMPLES = "no samples scored"


@dataclass
class ValidationResult:
    loss: float  # mean over supervised tokens, as the training loss
    accuracy: Optional[float]  # None when nothing was scored
    n_samples: int  # samples the loss covers (those whose images decoded)
    n_scored: int  # answers scored for accuracy
    seconds: float
    ranked_by_accuracy: bool = False  # answers were asked for (--val_samples > 0): the accuracy is the score

    @property
    def empty(self) -> bool:
        """Nothing was evaluated (every sample's images failed, say): there is no loss and no accuracy."""
        return self.n_samples == 0 and self.n_scored == 0

    def metrics(self) -> dict[str, Any]:
        """The numbers for the JSONL log and wandb; an empty validation has no val_loss (plots skip it)."""
        if self.empty:
            return {"val_status": NO_SAMPLES, "val_samples": 0}
        out: dict[str, Any] = {"val_loss": self.loss}
        if self.accuracy is not None:
            out["val_accuracy"] = self.accuracy
        return out

    @property
    def score(self) -> Optional[float]:
        """Higher is better: the accuracy when answers are scored, else the negative loss. None when there is
        nothing to rank by (no answer or no sample could be scored): such a validation is never the best, and
        one kind of score is never compared with the other."""
        if self.ranked_by_accuracy:
            return self.accuracy
        return -self.loss if self.n_samples > 0 else None

    def line(self) -> str:
        if self.empty:
            return f"validation: {NO_SAMPLES} ({self.seconds:.1f}s)"
        acc = f" val_accuracy {self.accuracy:.3f} (n={self.n_scored})" if self.accuracy is not None else ""
        if self.ranked_by_accuracy and self.accuracy is None:
            acc = f" val_accuracy: {NO_SAMPLES}"
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
        self.batch_size, self.autocast, self.max_scored = batch_size, autocast, max_scored
        self.loss_indices = list(range(dist.rank, len(dataset), dist.world))
        self.scored_indices = list(range(dist.rank, min(max_scored, len(dataset)), dist.world))
        # 3v: an answer's empty think block belongs to the prompt (as in 3v's own eval prompt), not to the answer
        generation = getattr(dataset, "generation", "v1")
        self.think_ids = tokenizer(EMPTY_THINK, add_special_tokens=False)["input_ids"] if generation == "3v" else []

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
                                int(scored), time.perf_counter() - t0, ranked_by_accuracy=self.max_scored > 0)

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
        """Greedy answers to the first question of each scored sample (evaluation.exact_match: batched, left-padded and
        masked, the same tokens as one question at a time)."""
        device = self.dist.device
        correct = scored = 0
        for i in range(0, len(self.scored_indices), self.batch_size):
            good = [(j, it) for j in self.scored_indices[i:i + self.batch_size] for it in [self.dataset[j]]
                    if "error" not in it]
            if not good:
                continue
            prompts, answers = [], []
            for j, it in good:
                start, end = answer_span(self.dataset.samples[j])
                if self.think_ids and it["input_ids"][start:start + len(self.think_ids)] == self.think_ids:
                    start += len(self.think_ids)
                prompts.append(it["input_ids"][:start])
                answers.append(self.tokenizer.decode(it["input_ids"][start:end], skip_special_tokens=True))
                it["input_ids"], it["labels"] = prompts[-1], it["labels"][:start]
            features = batch_features(collate([it for _, it in good]), self.encoder, device)
            max_new = max(len(self.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers) + 2
            predicted = greedy_answers(model, prompts, features, self.tokenizer, max_new, device, self.autocast)
            correct += sum(exact_match(p, a) for p, a in zip(predicted, answers))
            scored += len(answers)
        return correct, scored
