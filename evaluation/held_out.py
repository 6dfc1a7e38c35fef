"""Exact-match answer accuracy over v1-format question/answer records, beside the majority baseline."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

from data_pipeline.records import SkipCounter, count_image_tags, read_records, record_id, record_to_messages
from evaluation.exact_match import exact_match, greedy_answers, greedy_answers_sharing_prefix, normalise_answer
from data_pipeline.image_decode import ImageError
from evaluation.images import decode_for_encoder

from inference.chat import VLMChat


def normalise(answer: str) -> str:
    """The form answers are compared in (evaluation.exact_match.normalise_answer, shared with validation)."""
    return normalise_answer(answer)


def question_type(question: str, answer: str) -> str:
    """A coarse type for the per-type breakdown: yes/no (by the answer), colour, shape (by the question)."""
    if normalise(answer) in ("yes", "no"):
        return "yes/no"
    q = question.lower()
    if "color" in q or "colour" in q:
        return "colour"
    if "shape" in q:
        return "shape"
    return "other"


@dataclass
class TypeAccuracy:
    """Accuracy on the questions of one type beside that type's own majority baseline (its commonest answer)."""

    accuracy: float
    n: int
    majority: float
    majority_answer: str

    def line(self, name: str) -> str:
        return (f"  {name}: accuracy {self.accuracy:.3f} (n={self.n}, majority baseline {self.majority:.3f}, "
                f"'{self.majority_answer}')")


@dataclass
class Accuracy:
    accuracy: float
    n: int
    majority: float
    majority_answer: str
    skipped: int
    predictions: list[str] = field(default_factory=list)  # the model's answers, in the order scored
    questions: list[tuple[str, str]] = field(default_factory=list)  # (question, true answer), same order
    hits: list[bool] = field(default_factory=list)  # exact matches, same order
    per_type: dict[str, TypeAccuracy] = field(default_factory=dict)

    def line(self) -> str:
        return f"accuracy: {self.accuracy:.3f} (n={self.n}, majority baseline {self.majority:.3f})"

    def lines(self) -> list[str]:
        """The overall line, then one line per question type."""
        return [self.line()] + [t.line(name) for name, t in sorted(self.per_type.items())]


def per_type_accuracy(questions: list[str], answers: list[str], hits: list[bool]) -> dict[str, TypeAccuracy]:
    groups: dict[str, list[int]] = {}
    for i, (q, a) in enumerate(zip(questions, answers)):
        groups.setdefault(question_type(q, a), []).append(i)
    out = {}
    for name, rows in groups.items():
        top, top_n = Counter(normalise(answers[i]) for i in rows).most_common(1)[0]
        out[name] = TypeAccuracy(sum(hits[i] for i in rows) / len(rows), len(rows), top_n / len(rows), top)
    return out


def load_qa(path: str, images_path: str, image_prefix: str = "", limit: Optional[int] = None,
            ) -> tuple[list[tuple[str, str, str]], SkipCounter]:
    """(image path, question, answer) of each record's first turn, from the first `limit` records (a skipped one
    counts toward the limit, as a benchmark's skipped rows do); bad records are skipped and counted."""
    skips = SkipCounter(source=path)
    items = []
    for n, record in enumerate(read_records(path)):
        if limit is not None and n >= limit:
            break
        rid = record_id(record, n)
        try:
            messages = record_to_messages(record, multi_turn=False)
            if count_image_tags(messages) != 1 or not isinstance(record.get("image"), str):
                raise ValueError("not a one-image record (scored here: one <image> and one image file)")
        except ValueError as e:
            skips.skip(rid, str(e))
            continue
        question = messages[0]["content"].replace("<image>", "").strip()
        items.append((os.path.join(images_path, image_prefix + str(record.get("image", ""))), question,
                      messages[1]["content"]))
    return items, skips


@torch.inference_mode()
def answer_accuracy(chat: VLMChat, path: str, images_path: str, image_prefix: str = "",
                    limit: Optional[int] = None, max_new_tokens: int = 8, batch_size: int = 256) -> Accuracy:
    """Greedy answers for every question, scored by exact match after lower-casing and trimming punctuation.

    Questions are decoded together in batches of up to batch_size. Where every prompt begins with the same
    tokens up to and including its image (one question template), an image's questions share that prefix's
    prefill (greedy_answers_sharing_prefix); otherwise batches run across prompt lengths (left padding with an
    attention mask). Either gives the answers of one question at a time, up to float rounding (on int8 weights
    two nearly tied tokens may swap: inference.cpu.quantize quantises activations over the whole batch).
    """
    items, skips = load_qa(path, images_path, image_prefix, limit)
    features = _image_features(chat, sorted({image_path for image_path, _, _ in items}), batch_size, skips)
    prompts = [(chat.build_prompt(question, (), 1), image_path, answer, question)
               for image_path, question, answer in items if features[image_path] is not None]
    width = shared_prefix([p[0] for p in prompts], set(chat.model.config.image_ids or ()))
    if width:  # grouped by image (a stable sort keeps the file's order within an image)
        ordered = sorted(prompts, key=lambda p: p[1])
        predictions = _answers_by_image(chat, ordered, features, width, max_new_tokens, batch_size)
    else:  # sorted by length, so that each batch needs little padding
        ordered = sorted(prompts, key=lambda p: len(p[0]))
        predictions = _answers_by_length(chat, ordered, features, max_new_tokens, batch_size)
    hits = [exact_match(predicted, p[2]) for predicted, p in zip(predictions, ordered)]
    n = len(prompts)
    if n == 0:  # an accuracy over no question would read as a score of 0
        raise ValueError(f"{path}: no question could be scored ({len(items)} question(s) read; {skips.summary()}); "
                         f"no accuracy to report")
    answers = Counter(normalise(p[2]) for p in prompts)
    top, top_n = answers.most_common(1)[0] if answers else ("", 0)
    per_type = per_type_accuracy([p[3] for p in ordered], [p[2] for p in ordered], hits)
    return Accuracy(sum(hits) / n, n, top_n / n, top, skips.total, predictions,
                    [(p[3], p[2]) for p in ordered], hits, per_type)


def _image_features(chat: VLMChat, unique: list[str], batch_size: int,
                    skips: SkipCounter) -> dict[str, Optional[torch.Tensor]]:
    """Each image encoded once, in batches; an unusable one is None and a counted skip."""
    features: dict[str, Optional[torch.Tensor]] = {}
    for i in range(0, len(unique), batch_size):
        good, images = [], []
        for image_path in unique[i:i + batch_size]:
            try:
                images.append(decode_for_encoder(chat.encoder, image_path))
                good.append(image_path)
            except ImageError as e:
                skips.skip(os.path.basename(image_path), f"unusable image: {str(e).removeprefix(image_path + ': ')}")
                features[image_path] = None
        if images:
            features.update(zip(good, chat.encoder.encode_images(images, batch_size)))
    return features


def shared_prefix(prompts: list[list[int]], placeholder_ids: set[int]) -> int:
    """How many leading tokens all prompts share, where that prefix holds every prompt's whole image placeholder
    (and each prompt has a token after it); else 0."""
    if not prompts or not placeholder_ids:
        return 0
    first, width = prompts[0], min(len(p) for p in prompts) - 1
    for prompt in prompts[1:]:
        width = next((i for i in range(width) if prompt[i] != first[i]), width)
    in_prefix = sum(token in placeholder_ids for token in first[:width])
    whole = in_prefix > 0 and all(sum(token in placeholder_ids for token in p) == in_prefix for p in prompts)
    return width if whole else 0


def _answers_by_length(chat: VLMChat, ordered: list, features: dict, max_new_tokens: int,
                       batch_size: int) -> list[str]:
    """Greedy answers of (prompt ids, image path, ...) rows, batch by batch."""
    predictions = []
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i:i + batch_size]
        feats = torch.stack([features[c[1]] for c in chunk]).to(chat.device)
        predictions += greedy_answers(chat.model, [c[0] for c in chunk], feats, chat.tokenizer, max_new_tokens,
                                      chat.device)
    return predictions


def _answers_by_image(chat: VLMChat, ordered: list, features: dict, width: int, max_new_tokens: int,
                      batch_size: int) -> list[str]:
    """Greedy answers of (prompt ids, image path, ...) rows grouped by image, each image's prefix run once."""
    predictions = []
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i:i + batch_size]
        paths = list(dict.fromkeys(c[1] for c in chunk))  # the chunk's images, in order
        index = {path: k for k, path in enumerate(paths)}
        feats = torch.stack([features[path] for path in paths]).to(chat.device)
        predictions += greedy_answers_sharing_prefix(
            chat.model, chunk[0][0][:width], [c[0][width:] for c in chunk], [index[c[1]] for c in chunk], feats,
            chat.tokenizer, max_new_tokens, chat.device)
    return predictions
