"""v1 data files -> token ids, labels and images, with bad-record accounting and batch-longest padding.

A record (v1 JSON array or JSONL, one object per line):
  {"id": "...", "image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                   {"from": "gpt", "value": "..."}, ...]}
`<image>` becomes the 50-token placeholder; the chat template wraps the turns; only assistant tokens
(the answer, its `</s>` and newline) are supervised. Labels align with input_ids and use -100 for ignore.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.utils.data import Dataset

from .LMConfig import IMAGE_SPECIAL_TOKEN, IMAGE_TOKENS
from .model import find_image_spans
from .tokenizer_utils import count_span_openings, image_token_ids, render_chat
from .vision_utils import ImageError, ImagePreprocessor, open_image

log = logging.getLogger("minimind")
IGNORE_INDEX = -100
# A record larger than this is skipped before it is tokenised (v1 records are a few KB; tokenising holds ~200
# bytes per character of text at once, so one 50 MB answer would take ~10 GB).
MAX_RECORD_CHARS = 1 << 20
HUMAN_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant"}


class DataError(ValueError):
    """A bad record under --strict_data, or a data file that cannot be read at all."""


@dataclass
class SkipCounter:
    """Counts skipped records by reason and keeps the first few ids of each for the log."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    strict: bool = False
    source: str = ""

    def skip(self, record_id: str, reason: str) -> None:
        if self.strict:
            raise DataError(f"{self.source}: record {record_id}: {reason} (--strict_data)")
        key = reason.split(":")[0]
        self.counts[key] += 1
        shown = self.examples.setdefault(key, [])
        if len(shown) < 5:
            shown.append(record_id)
            log.warning("skipping record %s: %s", record_id, reason)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no records skipped"
        parts = [f"{n} {reason} (e.g. {', '.join(self.examples[reason][:3])})" for reason, n in self.counts.items()]
        return f"{self.total} records skipped: " + "; ".join(parts)


@dataclass
class BrokenLine:
    """A JSONL line that is not valid JSON; it stays in file order so strict mode reports the first bad record."""

    lineno: int
    error: str


def read_records(path: str) -> list[Any]:
    """Records of a JSON array file or a JSONL file (a broken JSONL line becomes a BrokenLine)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path} (see the README, 'Real training', for the v1 "
                                f"dataset, or run `make demo` for the offline demo data)")
    if not os.path.isfile(path):  # a FIFO would block the read, /dev/urandom would never end
        kind = "a directory" if os.path.isdir(path) else "not a regular file (a FIFO, device or socket)"
        raise DataError(f"{path}: {kind}; give a JSON or JSONL data file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text (line {line}: {e.reason} at byte {e.start})") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply to read") from None
        except ValueError as e:  # e.g. an integer longer than Python's int-string conversion limit
            raise DataError(f"{path}: unreadable JSON ({str(e).splitlines()[0][:120]})") from None
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if len(line) > MAX_RECORD_CHARS:  # bounded before parsing: one 50 MB line would cost gigabytes
                records.append(BrokenLine(lineno, f"record too large: {len(line):,} characters (limit "
                                                  f"{MAX_RECORD_CHARS:,})"))
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                records.append(BrokenLine(lineno, f"malformed JSON: {e.msg}"))
            except RecursionError:
                records.append(BrokenLine(lineno, "malformed JSON: nested too deeply"))
            except ValueError as e:
                records.append(BrokenLine(lineno, f"malformed JSON: {str(e).splitlines()[0][:120]}"))
    return records


def record_chars(messages: list[dict[str, str]]) -> int:
    return sum(len(m["content"]) for m in messages)


@dataclass
class Sample:
    id: str
    image_path: str
    input_ids: list[int]
    labels: list[int]


def record_id(record: Any, index: int) -> str:
    if isinstance(record, BrokenLine):
        return f"line {record.lineno}"
    return str(record.get("id", f"#{index}")) if isinstance(record, dict) else f"#{index}"


def record_to_messages(record: Any, multi_turn: bool) -> list[dict[str, str]]:
    """Validate a record and return its chat messages (raises ValueError with the reason)."""
    if isinstance(record, BrokenLine):
        raise ValueError(record.error)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("no conversations")
    if len(turns) % 2:
        turns = turns[:-1]  # a trailing question with no answer teaches nothing
    messages: list[dict[str, str]] = []
    for i in range(0, len(turns), 2):
        q, a = turns[i], turns[i + 1]
        if not (isinstance(q, dict) and isinstance(a, dict)):
            raise ValueError("malformed turn")
        if q.get("from") not in HUMAN_ROLES or a.get("from") not in ASSISTANT_ROLES:
            raise ValueError(f"wrong role: turn {i} is {q.get('from')!r}, turn {i + 1} is {a.get('from')!r}")
        question, answer = str(q.get("value") or "").strip(), str(a.get("value") or "").strip()
        for j, text in ((i, question), (i + 1, answer)):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON allows a lone surrogate ("\ud800"); the tokenizer does not
                raise ValueError(f"invalid text: turn {j} holds {e.reason} at character {e.start}") from None
        if not answer:
            raise ValueError(f"empty answer: turn {i + 1}")
        if not question:
            raise ValueError(f"empty question: turn {i}")
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if not multi_turn:
            break  # v1 SFT keeps the first turn only
    if not messages:
        raise ValueError("no conversations")
    n_images = sum(m["content"].count("<image>") for m in messages)
    if n_images == 0:
        raise ValueError("no <image> tag")
    if n_images > 1:
        raise ValueError(f"two or more <image> tags ({n_images}); one image per record is supported")
    for m in messages:
        m["content"] = m["content"].replace("<image>", IMAGE_SPECIAL_TOKEN)
    return messages


def tokenize_conversation(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of the templated conversation and labels that keep only the assistant parts."""
    text = render_chat(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    # Character ranges to supervise: each answer with its "</s>\n".
    spans, cursor = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        start = text.index(m["content"] + tokenizer.eos_token, cursor)
        end = start + len(m["content"]) + len(tokenizer.eos_token) + 1
        spans.append((start, end))
        cursor = end
    labels = []
    for tok, (b, e) in zip(ids, offsets):
        labels.append(tok if any(b < end and start < e for start, end in spans) else IGNORE_INDEX)
    return ids, labels


class VLMDataset(Dataset):
    """Tokenised samples of a v1 data file; images are decoded lazily (or read from a feature store)."""

    def __init__(self, data_path: str, images_path: str, tokenizer, max_seq_len: int, image_prefix: str = "",
                 multi_turn: bool = False, strict: bool = False,
                 preprocess: Optional[ImagePreprocessor] = None, feature_store=None):
        self.skips = SkipCounter(strict=strict, source=data_path)
        self.preprocess = preprocess or ImagePreprocessor()
        self.feature_store = feature_store
        self.samples: list[Sample] = []
        image_ids = torch.tensor(image_token_ids(tokenizer))
        images_root = os.path.realpath(images_path)
        for n, record in enumerate(read_records(data_path)):
            rid = record_id(record, n)
            try:
                messages = record_to_messages(record, multi_turn)
                if record_chars(messages) > MAX_RECORD_CHARS:
                    raise ValueError(f"record too large: {record_chars(messages):,} characters of text (limit "
                                     f"{MAX_RECORD_CHARS:,})")
                path = image_file(record.get("image"), images_path, images_root, image_prefix)
                ids, labels = tokenize_conversation(tokenizer, messages)
                if count_span_openings(ids, image_ids.tolist()) != 1:  # text beside <image> that reads as placeholder ids
                    raise ValueError("forged image placeholder: text outside <image> holds a run of '<' that "
                                     "would start an image span")
                if len(ids) > max_seq_len:
                    span_end = image_span_end(ids, image_ids)
                    if span_end > max_seq_len:
                        raise ValueError(f"too long: {len(ids)} tokens and the image span ends past "
                                         f"max_seq_len {max_seq_len}")
                    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
                if all(label == IGNORE_INDEX for label in labels[1:]):
                    raise ValueError(f"too long: no answer token left within max_seq_len {max_seq_len}")
            except ValueError as e:
                self.skips.skip(rid, str(e))
                continue
            self.samples.append(Sample(rid, path, ids, labels))

    def __len__(self) -> int:
        return len(self.samples)

    def image_paths(self) -> list[str]:
        return sorted({s.image_path for s in self.samples})

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        item = {"id": s.id, "input_ids": s.input_ids, "labels": s.labels}
        try:
            if self.feature_store is not None:
                item["features"] = self.feature_store.get(s.image_path)
            else:
                item["pixels"] = self.preprocess(open_image(s.image_path))
        except ImageError as e:
            if self.skips.strict:
                raise DataError(f"record {s.id}: {e} (--strict_data)") from None
            item["error"] = str(e)  # counted by the collate step; training goes on
        return item


def image_span_end(ids: list[int], image_ids: torch.Tensor) -> int:
    """The position just past the record's image placeholder span."""
    _, starts = find_image_spans(torch.tensor([ids]), image_ids)
    return int(starts[0]) + IMAGE_TOKENS if starts.numel() else len(ids)


def image_file(image: Any, images_path: str, images_root: str, image_prefix: str = "") -> str:
    """The record's image path, which must exist and lie under images_path once `..` and symlinks are resolved."""
    if not isinstance(image, str) or not image:
        raise ValueError("no image file named")
    path = os.path.join(images_path, image_prefix + image)
    try:
        real = os.path.realpath(path)
    except ValueError as e:  # an embedded NUL byte
        raise ValueError(f"bad image path {image!r} ({e})") from None
    if os.path.commonpath([images_root, real]) != images_root:
        raise ValueError(f"image outside --images_path: {image!r} resolves to {real}")
    if not os.path.exists(real):
        raise ValueError(f"missing image: {path}")
    return path


@dataclass
class Batch:
    """What the model eats: padded token ids and labels, and the images as cached CLIP features or as pixels
    (the encoder turns those into features on the device; see feature_cache.batch_features)."""

    ids: list[str]  # record ids of the rows
    skipped: list[tuple[str, str]]  # (record id, reason) of items dropped because their image failed
    input_ids: Optional[torch.Tensor] = None  # [B, T] long; None when every image of the batch failed
    labels: Optional[torch.Tensor] = None  # [B, T] long, IGNORE_INDEX where not supervised
    features: Optional[torch.Tensor] = None  # [B, 50, hidden] fp16, read from the feature store
    pixels: Optional[torch.Tensor] = None  # [B, 3, H, W], to be encoded
    lengths: list[int] = field(default_factory=list)  # real (unpadded) tokens of each row

    @property
    def empty(self) -> bool:
        return self.input_ids is None

    @property
    def n_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def supervised(self) -> int:
        """Positions with a next-token label: where the output head runs in training."""
        return 0 if self.labels is None else int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def collate(items: list[dict[str, Any]], pad_to: Optional[int] = None) -> Batch:
    """Pad to the longest row of the batch (or to pad_to); drop items whose image failed, reporting them."""
    bad = [(it["id"], it["error"]) for it in items if "error" in it]
    items = [it for it in items if "error" not in it]
    batch = Batch(ids=[it["id"] for it in items], skipped=bad)
    if not items:
        return batch
    length = pad_to or max(len(it["input_ids"]) for it in items)
    batch.input_ids = torch.zeros(len(items), length, dtype=torch.long)
    batch.labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        batch.input_ids[row, :n] = torch.tensor(it["input_ids"])
        batch.labels[row, :n] = torch.tensor(it["labels"])
    batch.lengths = [len(it["input_ids"]) for it in items]
    if "features" in items[0]:
        batch.features = torch.stack([torch.as_tensor(it["features"]) for it in items])
    else:
        batch.pixels = torch.stack([it["pixels"] for it in items])
    return batch
