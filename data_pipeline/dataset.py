"""Data files -> token ids, labels and images, with bad-record accounting and batch-longest padding.

VLMDataset reads a JSON, JSONL (records.py) or parquet (parquet.py) file, checks each record, tokenises it
(tokens.py) and, under --pack_same_image, packs questions about the same images into one row (packing.py).
A bad record is skipped and counted by reason; images are decoded when an item is fetched (or read from the
feature store), and collate pads the items of a batch into one typed Batch.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import Dataset

from checkpoints.tokenizer import count_span_openings, image_pad_id, image_token_ids
from model.vision import ImagePreprocessor
from model.vlm import find_image_spans
from data_pipeline.image_decode import ImageError

from .images import ImageRef, image_file, image_ref_key, open_image_ref
from .packing import pack_rows
from .parquet import is_parquet, read_parquet_records
from .records import (MAX_RECORD_CHARS, DataError, SkipCounter, check_record_size, count_image_tags,
                      read_records, record_id, record_image_names, record_to_messages)
from .tokens import IGNORE_INDEX, Sample, fit_to_length, tokenize_conversations, with_placeholders
from .v3_tokens import fit_v3, image_runs, keeps_empty_think, tokenize_v3, v3_messages


# records tokenised per batched tokenizer call: the speed of one call for all, memory bounded by the chunk
TOKENIZE_CHUNK = 4096


class VLMDataset(Dataset):
    """Tokenised samples of a data file (JSON, JSONL or parquet); images are decoded lazily (or read from a
    feature store). Bad records are skipped and counted by reason in `skips`."""

    def __init__(self, data_path: str, images_path: str, tokenizer, max_seq_len: int, *, image_prefix: str = "",
                 multi_turn: bool = False, strict: bool = False, preprocess: Optional[ImagePreprocessor] = None,
                 feature_store=None, skip_text_only: bool = False, pack_same_image: int = 1,
                 generation: str = "v1"):
        self.skips = SkipCounter(strict=strict, source=data_path)
        self.preprocess = preprocess or ImagePreprocessor()
        self.feature_store = feature_store
        self.samples: list[Sample] = []
        self.max_seq_len = max_seq_len
        self.multi_turn, self.skip_text_only = multi_turn, skip_text_only
        # 3v (v3_tokens.py): upstream's template, labels and 64-token runs of one id; every turn is kept
        self.generation = generation
        self.image_ids = torch.tensor(image_pad_id(tokenizer) if generation == "3v" else image_token_ids(tokenizer))
        images_root = os.path.realpath(images_path)
        records = _records_with_images(data_path, images_path, images_root, image_prefix)
        # v1 records are tokenised TOKENIZE_CHUNK at a time (one batched tokenizer call each); 3v one by one
        for chunk in iter(lambda: list(itertools.islice(records, TOKENIZE_CHUNK)), []):
            if generation == "3v":
                for rid, record, images in chunk:
                    self._add(rid, lambda: self._sample_v3(tokenizer, rid, _read(record), images))
            else:
                self._add_chunk(tokenizer, chunk)
        if pack_same_image > 1:
            self.samples = pack_rows(self.samples, pack_same_image, max_seq_len, self.image_ids, generation)

    def _add(self, rid: str, make_sample: Callable[[], Sample]) -> None:
        """Keep the sample make_sample returns, or count the record's ValueError as a skip."""
        try:
            self.samples.append(make_sample())
        except ValueError as e:
            self.skips.skip(rid, str(e))

    def _add_chunk(self, tokenizer, chunk: list[tuple[str, Any, list[ImageRef]]]) -> None:
        """The chunk's v1 records as samples, tokenised in one batch; bad records are skipped in their order."""
        read = []
        for rid, record, images in chunk:
            try:
                read.append(self._messages(rid, _read(record), images))
            except ValueError as e:
                read.append(e)
        tokenised = iter(tokenize_conversations(tokenizer, [m for m in read if not isinstance(m, ValueError)]))
        for (rid, _, images), messages in zip(chunk, read):
            if isinstance(messages, ValueError):
                self.skips.skip(rid, str(messages))
            else:
                self._add(rid, lambda: self._sample(rid, images, *next(tokenised)))

    def _messages(self, rid: str, record: Any, images: list[ImageRef]) -> list[dict[str, str]]:
        """A v1 record's messages with the image placeholders written in; ValueError when it cannot be a sample."""
        messages = record_to_messages(record, self.multi_turn)
        check_record_size(messages)  # before the placeholders are written in and tokenised
        n_tags = count_image_tags(messages)
        if n_tags != len(images):
            hint = " (only the first turn is kept without --multi_turn)" if n_tags < len(images) and \
                not self.multi_turn else ""
            raise ValueError(f"image count mismatch: {n_tags} <image> tag(s) but {len(images)} image(s){hint}")
        if not images and self.skip_text_only:
            raise ValueError("text-only record (skipped under --skip_text_only)")
        return with_placeholders(messages)

    def _sample(self, rid: str, images: list[ImageRef], ids: list[int], labels: list[int]) -> Sample:
        """A tokenised v1 record as a sample; ValueError with the reason it cannot be one."""
        if count_span_openings(ids, self.image_ids.tolist()) != len(images):  # text that reads as placeholder ids
            raise ValueError("forged image placeholder: text outside <image> holds a run of '<' that would start "
                             "an image span")
        ids, labels = fit_to_length(ids, labels, self.image_ids, self.max_seq_len)
        return Sample(rid, images, ids, labels)

    def _sample_v3(self, tokenizer, rid: str, record: Any, images: list[ImageRef]) -> Sample:
        """A 3v record as upstream tokenises it. Images beyond the `<image>` tags are not used (upstream's text-only
        rows carry an 8x8 black image), as are those whose runs max_seq_len cuts away."""
        messages = v3_messages(record)
        check_record_size(messages)
        n_tags = count_image_tags(messages)
        if n_tags > len(images):
            raise ValueError(f"image count mismatch: {n_tags} <image> tag(s) but {len(images)} image(s)")
        if n_tags == 0 and self.skip_text_only:
            raise ValueError("text-only record (skipped under --skip_text_only)")
        ids, labels = tokenize_v3(tokenizer, messages, keeps_empty_think(rid))
        ids, labels, used = fit_v3(ids, labels, int(self.image_ids[0]), n_tags, self.max_seq_len)
        return Sample(rid, images[:used], ids, labels)

    def __len__(self) -> int:
        return len(self.samples)

    def image_paths(self) -> list[ImageRef]:
        """Every distinct image of the samples (files by path, parquet images by content hash)."""
        unique = {image_ref_key(ref): ref for s in self.samples for ref in s.images}
        return [unique[k] for k in sorted(unique)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """ids, labels and either "features" [n_images, 50, hidden] or "pixels" [n_images, 3, H, W] (n may be 0);
        an image that cannot be used puts its reason under "error" instead."""
        s = self.samples[index]
        item = {"id": s.id, "input_ids": s.input_ids, "labels": s.labels, "image_starts": self._span_starts(s)}
        if s.segment_ids is not None:
            item["segment_ids"] = s.segment_ids
        try:
            if self.feature_store is not None:
                item["features"] = [self.feature_store.get(ref) for ref in s.images]
            else:
                item["pixels"] = [self.preprocess(open_image_ref(ref)) for ref in s.images]
        except ImageError as e:
            if self.skips.strict:
                raise DataError(f"record {s.id}: {e} (--strict_data)") from None
            item["error"] = str(e)  # counted by the collate step; training goes on
        return item

    def _span_starts(self, s: Sample) -> list[int]:
        """Where each of the sample's image spans starts: the splice takes them from the batch (no search, no
        host sync in a compiled step). A span cut short, or a span count unlike the image count, is an error
        naming the record (fit_to_length and the placeholder check already refuse both when reading)."""
        if self.generation == "3v":  # runs of one id; one cut short by max_seq_len is the row's last
            return [start for start, _ in image_runs(s.input_ids, int(self.image_ids[0]))]
        try:
            _, starts = find_image_spans(torch.tensor([s.input_ids]), self.image_ids)
        except ValueError as e:
            raise DataError(f"record {s.id}: {e}") from None
        if starts.numel() != len(s.images):
            raise DataError(f"record {s.id}: {starts.numel()} image placeholder span(s) but "
                            f"{len(s.images)} image(s)")
        return starts.tolist()


def _read(record: Any) -> Any:
    """The record, or the ValueError the reader put in its place raised."""
    if isinstance(record, ValueError):
        raise record
    return record


def _records_with_images(data_path: str, images_path: str, images_root: str,
                         image_prefix: str) -> Iterator[tuple[str, Any, list[ImageRef]]]:
    """(record id, record or the ValueError that makes it bad, its image references) of a data file; a JSON
    record's image files must exist under images_path."""
    if is_parquet(data_path):
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


@dataclass
class Batch:
    """What the model eats: padded token ids and labels, and the images as cached CLIP features or as pixels
    (the encoder turns those into features on the device; see feature_store.batch_features)."""

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
    # [B, T] long when a row is packed (--pack_same_image): 0 on the shared prefix, k on its k-th question,
    # -1 on padding; None otherwise
    segment_ids: Optional[torch.Tensor] = None
    # Where the images go, one entry per image (the order of features/pixels): row and first position of its
    # placeholder span ([N] long each); the model's splice takes them instead of searching the ids.
    image_rows: Optional[torch.Tensor] = None
    image_starts: Optional[torch.Tensor] = None
    # The positions with a next-token label, as flat indices into [B * (T-1)] (ascending): the model's
    # loss_positions, found here so that the training step has no data-dependent mask.
    loss_positions: Optional[torch.Tensor] = None

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


def collate(items: list[dict[str, Any]], pad_to: Optional[int] = None, segments: bool = False) -> Batch:
    """Pad to the longest row of the batch (or to pad_to); drop items whose image failed, reporting them.
    segments: segment_ids for every batch (unpacked rows: 0 on their tokens), not only for those holding a packed
    row: the attention layout is then the same in every batch (a compiled step compiles it once)."""
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
    if segments or any("segment_ids" in it for it in items):
        batch.segment_ids = torch.full((len(items), length), -1, dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            batch.segment_ids[row, :n] = torch.tensor(it["segment_ids"]) if "segment_ids" in it else 0
    kind = "features" if "features" in items[0] else "pixels"
    images = [torch.as_tensor(image) for it in items for image in it[kind]]
    setattr(batch, kind, torch.stack(images) if images else None)
    batch.n_images = len(images)
    if all("image_starts" in it for it in items):  # VLMDataset's items (it checked one start per image)
        spans = [(row, start) for row, it in enumerate(items) for start in it["image_starts"]]
        batch.image_rows = torch.tensor([r for r, _ in spans], dtype=torch.long)
        batch.image_starts = torch.tensor([t for _, t in spans], dtype=torch.long)
    batch.loss_positions = (batch.labels[:, 1:] != IGNORE_INDEX).flatten().nonzero().squeeze(1)
    return batch
