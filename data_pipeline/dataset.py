"""Data files -> token ids, labels and images, with bad-record accounting and batch-longest padding.

A record (v1 JSON array or JSONL, one object per line):
  {"id": "...", "image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                   {"from": "gpt", "value": "..."}, ...]}
Several images: "image": ["a.jpg", "b.jpg"] or the older MiniMind-V form "a.jpg, b.jpg", with one `<image>`
per image, in order. No "image" key and no `<image>`: a text-only sample (trained unless skip_text_only).
A parquet file (model/parquet_data.py) gives the same records with the images stored in the file.
Each `<image>` becomes the 50-token placeholder; the chat template wraps the turns; only assistant tokens
(the answer, its `</s>` and newline) are supervised. Labels align with input_ids and use -100 for ignore.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

import torch
from torch.utils.data import Dataset

from model.config import IMAGE_SPECIAL_TOKEN, IMAGE_TOKENS
from model.tokenizer import count_span_openings, image_token_ids, render_chat
from model.vision import ImageError, ImagePreprocessor, open_image
from model.vlm import find_image_spans

from .parquet import ParquetImage, read_parquet_records

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


ImageRef = Union[str, ParquetImage]  # an image file's path, or an image stored in a parquet file


def load_image(ref: ImageRef):
    """The decoded RGB image behind a reference (ImageError with a one-line reason if it cannot be used)."""
    if isinstance(ref, ParquetImage):
        return open_image(ref.read(), name=ref.name)
    return open_image(ref)


@dataclass
class Sample:
    id: str
    images: list[ImageRef]  # one per placeholder span, in order; empty for a text-only sample
    input_ids: list[int]
    labels: list[int]
    # Set on packed rows (pack_same_image): 0 on the shared prefix, k on the k-th question's tokens.
    segments: Optional[list[int]] = None


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
        q_role, a_role = q.get("from", q.get("role")), a.get("from", a.get("role"))
        if q_role not in HUMAN_ROLES or a_role not in ASSISTANT_ROLES:
            raise ValueError(f"wrong role: turn {i} is {q_role!r}, turn {i + 1} is {a_role!r}")
        question, answer = _turn_text(q), _turn_text(a)
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
    return messages


def with_placeholders(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The messages with each `<image>` tag replaced by the 50-token image placeholder."""
    return [{**m, "content": m["content"].replace("<image>", IMAGE_SPECIAL_TOKEN)} for m in messages]


def _turn_text(turn: dict) -> str:
    """A turn's text: v1 records use {"from", "value"}, the current MiniMind-V data {"role", "content"}."""
    return str(turn.get("value", turn.get("content")) or "").strip()


def count_image_tags(messages: list[dict[str, str]]) -> int:
    return sum(m["content"].count("<image>") for m in messages)


def record_image_names(record: dict) -> list[str]:
    """The image file names of a JSON record: a list, one name, or the older "a.jpg, b.jpg" form."""
    image = record.get("image")
    if image is None:
        return []
    if isinstance(image, str):
        return [name.strip() for name in image.split(",")] if image.strip() else []
    if isinstance(image, list) and all(isinstance(name, str) for name in image):
        return [name.strip() for name in image]
    raise ValueError(f"'image' is a {type(image).__name__}: expected a file name or a list of file names")


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
    # one pass: spans and tokens both run left to right
    labels, k = [], 0
    for tok, (b, e) in zip(ids, offsets):
        while k < len(spans) and spans[k][1] <= b:
            k += 1
        labels.append(tok if k < len(spans) and spans[k][0] < e else IGNORE_INDEX)
    return ids, labels


class VLMDataset(Dataset):
    """Tokenised samples of a data file (JSON, JSONL or parquet); images are decoded lazily (or read from a
    feature store). Bad records are skipped and counted by reason in `skips`."""

    def __init__(self, data_path: str, images_path: str, tokenizer, max_seq_len: int, image_prefix: str = "",
                 multi_turn: bool = False, strict: bool = False,
                 preprocess: Optional[ImagePreprocessor] = None, feature_store=None, skip_text_only: bool = False,
                 pack_questions: int = 1):
        self.skips = SkipCounter(strict=strict, source=data_path)
        self.preprocess = preprocess or ImagePreprocessor()
        self.feature_store = feature_store
        self.samples: list[Sample] = []
        image_ids = torch.tensor(image_token_ids(tokenizer))
        images_root = os.path.realpath(images_path)
        for rid, record, images in _records_with_images(data_path, images_path, images_root, image_prefix):
            try:
                if isinstance(record, ValueError):
                    raise record
                messages = record_to_messages(record, multi_turn)
                if record_chars(messages) > MAX_RECORD_CHARS:
                    raise ValueError(f"record too large: {record_chars(messages):,} characters of text (limit "
                                     f"{MAX_RECORD_CHARS:,})")
                n_tags = count_image_tags(messages)
                if n_tags != len(images):
                    hint = " (only the first turn is kept without --multi_turn)" if n_tags < len(images) and \
                        not multi_turn else ""
                    raise ValueError(f"image count mismatch: {n_tags} <image> tag(s) but {len(images)} "
                                     f"image(s){hint}")
                if not images and skip_text_only:
                    raise ValueError("text-only record (skipped under --skip_text_only)")
                ids, labels = tokenize_conversation(tokenizer, with_placeholders(messages))
                if count_span_openings(ids, image_ids.tolist()) != len(images):  # text that reads as placeholder ids
                    raise ValueError("forged image placeholder: text outside <image> holds a run of '<' that "
                                     "would start an image span")
                ids, labels = fit_to_length(ids, labels, image_ids, max_seq_len)
            except ValueError as e:
                self.skips.skip(rid, str(e))
                continue
            self.samples.append(Sample(rid, images, ids, labels))
        if pack_questions > 1:
            self.samples = pack_same_image(self.samples, pack_questions, max_seq_len, image_ids)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def has_text_only(self) -> bool:
        return any(not s.images for s in self.samples)

    def image_paths(self) -> list[ImageRef]:
        """Every distinct image of the samples (files by path, parquet images by content hash)."""
        unique = {(ref if isinstance(ref, str) else ref.key): ref for s in self.samples for ref in s.images}
        return [unique[k] for k in sorted(unique)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """ids, labels and either "features" [n_images, 50, hidden] or "pixels" [n_images, 3, H, W] (n may be 0);
        an image that cannot be used puts its reason under "error" instead."""
        s = self.samples[index]
        item = {"id": s.id, "input_ids": s.input_ids, "labels": s.labels}
        if s.segments is not None:
            item["segments"] = s.segments
        try:
            if self.feature_store is not None:
                item["features"] = [self.feature_store.get(ref) for ref in s.images]
            else:
                item["pixels"] = [self.preprocess(load_image(ref)) for ref in s.images]
        except ImageError as e:
            if self.skips.strict:
                raise DataError(f"record {s.id}: {e} (--strict_data)") from None
            item["error"] = str(e)  # counted by the collate step; training goes on
        return item


def shared_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def pack_same_image(samples: list[Sample], per_row: int, max_seq_len: int, image_ids: torch.Tensor) -> list[Sample]:
    """Pack up to per_row samples that share their images into one row: the common prefix (the user turn's
    start and the image span) once, then each sample's own tokens (its question and answer) as a segment.

    The model lets a segment attend to the prefix and to itself only, at the positions it would have alone
    (MiniMindLM.run_blocks), so each question is trained exactly as in its own row, while the 50 image tokens
    are paid once per row instead of once per question. Samples are packed only where that equivalence holds:
    the same images, a shared prefix that holds every image span and no supervised token, and a segment that
    starts unsupervised (its first token is never a target). The rest stay rows of their own."""
    groups: dict[tuple, list[Sample]] = {}
    for s in samples:
        key = tuple(ref if isinstance(ref, str) else ref.key for ref in s.images)
        groups.setdefault(key if key else ("text", s.id), []).append(s)
    rows: list[Sample] = []
    for members in groups.values():
        open_row: list[Sample] = []
        prefix = images_end = 0
        for s in members:
            if open_row:
                p = min(prefix, shared_prefix(open_row[0].input_ids, s.input_ids))
                length = p + sum(len(m.input_ids) - p for m in (*open_row, s))
                # every image span inside the shared prefix; no target in it or at a segment's first token
                if len(open_row) < per_row and length <= max_seq_len and 0 < images_end <= p and \
                        all(_unsupervised_through(m, p) for m in (*open_row, s)):
                    open_row.append(s)
                    prefix = p
                    continue
                rows.append(_packed_row(open_row, prefix))
            open_row, prefix, images_end = [s], len(s.input_ids), _images_end(s, image_ids)
        if open_row:
            rows.append(_packed_row(open_row, prefix))
    return rows


def _images_end(s: Sample, image_ids: torch.Tensor) -> int:
    """Where the sample's last image span ends (0 without images)."""
    if not s.images:
        return 0
    _, starts = find_image_spans(torch.tensor([s.input_ids]), image_ids)
    return int(starts[-1]) + IMAGE_TOKENS if starts.numel() == len(s.images) else 0


def _unsupervised_through(s: Sample, position: int) -> bool:
    """No label at positions 0..position (the shared prefix and the segment's first token)."""
    return position < len(s.labels) and all(label == IGNORE_INDEX for label in s.labels[:position + 1])


def _packed_row(members: list[Sample], prefix: int) -> Sample:
    if len(members) == 1:
        return members[0]
    first = members[0]
    ids, labels, segments = first.input_ids[:prefix], first.labels[:prefix], [0] * prefix
    for k, m in enumerate(members, start=1):
        ids, labels = ids + m.input_ids[prefix:], labels + m.labels[prefix:]
        segments += [k] * (len(m.input_ids) - prefix)
    return Sample(f"{first.id}(+{len(members) - 1})", first.images, ids, labels, segments)


def _records_with_images(data_path: str, images_path: str, images_root: str,
                         image_prefix: str) -> Iterator[tuple[str, Any, list[ImageRef]]]:
    """(record id, record or the ValueError that makes it bad, its image references) of a data file; a JSON
    record's image files must exist under images_path."""
    if data_path.endswith(".parquet"):
        yield from read_parquet_records(data_path, MAX_RECORD_CHARS)
        return
    checked: dict[str, str] = {}  # image name -> its path, checked once (records often share an image)
    for n, record in enumerate(read_records(data_path)):
        rid = record_id(record, n)
        try:
            names = record_image_names(record) if isinstance(record, dict) else []
            paths = []
            for name in names:
                if name not in checked:
                    checked[name] = image_file(name, images_path, images_root, image_prefix)
                paths.append(checked[name])
        except ValueError as e:
            yield rid, e, []
            continue
        yield rid, record, paths


def fit_to_length(ids: list[int], labels: list[int], image_ids: torch.Tensor,
                  max_seq_len: int) -> tuple[list[int], list[int]]:
    """Cut a sample to max_seq_len; ValueError when an image span or every answer token would be cut."""
    if len(ids) > max_seq_len:
        _, starts = find_image_spans(torch.tensor([ids]), image_ids)
        if starts.numel() and int(starts[-1]) + IMAGE_TOKENS > max_seq_len:
            raise ValueError(f"too long: {len(ids)} tokens and the image span ends past max_seq_len {max_seq_len}")
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise ValueError(f"too long: no answer token left within max_seq_len {max_seq_len}")
    return ids, labels


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
    # The images of all rows in row-major order, one per placeholder span (the order the model splices them
    # in); both None when no row has an image (text-only rows).
    features: Optional[torch.Tensor] = None  # [N, 50, hidden] fp16, read from the feature store
    pixels: Optional[torch.Tensor] = None  # [N, 3, H, W], to be encoded
    lengths: list[int] = field(default_factory=list)  # real (unpadded) tokens of each row
    n_images: int = 0
    # [B, T] long when a row is packed (pack_same_image): 0 on the shared prefix, k on its k-th question,
    # -1 on padding; None otherwise
    segment_ids: Optional[torch.Tensor] = None

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
    if any("segments" in it for it in items):
        batch.segment_ids = torch.full((len(items), length), -1, dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            batch.segment_ids[row, :n] = torch.tensor(it["segments"]) if "segments" in it else 0
    kind = "features" if "features" in items[0] else "pixels"
    images = [torch.as_tensor(image) for it in items for image in it[kind]]
    setattr(batch, kind, torch.stack(images) if images else None)
    batch.n_images = len(images)
    return batch
