"""Records of a parquet data file in the current MiniMind-V layout, read one row group at a time.

One row per sample:
  conversations : a list of {"role", "content"} turns, or a JSON string of that list
  image_bytes   : one encoded image (binary), a list of them, or null for a text-only sample
The content holds one `<image>` per image, in order. The file is memory-mapped and read by row group, so a
multi-GB file is never held in RAM whole: building the dataset streams it once (to count and hash the images),
and an image is read back later from its row group (the last few row groups' image columns stay cached per
process). With --feature_cache the images are encoded once, in file order, and training reads features only.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

IMAGE_COLUMN = "image_bytes"
CONVERSATIONS_COLUMN = "conversations"
ROW_GROUPS_CACHED = 2  # per process: image columns of the last row groups read (random access stays bounded)


class ParquetDataError(ValueError):
    """A parquet file that cannot be read as MiniMind-V data at all."""


@dataclass(frozen=True)
class ParquetImage:
    """Where one image of a parquet row lives, and its content hash (the feature cache key)."""

    file: str
    row_group: int
    row: int  # within the row group
    index: int  # within the row's list of images
    key: str  # "blake2b:<hex>" of the encoded bytes

    @property
    def name(self) -> str:
        return f"{os.path.basename(self.file)} row group {self.row_group} row {self.row} image {self.index}"

    def read(self) -> bytes:
        """The encoded image bytes (empty bytes when the cell holds none)."""
        images = as_image_list(_row_group_images(self.file, self.row_group)[self.row])
        return images[self.index] if self.index < len(images) else b""


_cache: "OrderedDict[tuple[str, int], list]" = OrderedDict()


def _row_group_images(file: str, row_group: int) -> list:
    """The image column of one row group as Python objects, through a small per-process LRU cache."""
    key = (file, row_group)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    import pyarrow.parquet as pq

    with pq.ParquetFile(file, memory_map=True) as pf:
        column = pf.read_row_group(row_group, columns=[IMAGE_COLUMN]).column(IMAGE_COLUMN).to_pylist()
    _cache[key] = column
    while len(_cache) > ROW_GROUPS_CACHED:
        _cache.popitem(last=False)
    return column


def as_image_list(cell: Any) -> list[bytes]:
    """One cell of the image column as a list of encoded images (a single image, a list, or null)."""
    if cell is None:
        return []
    if isinstance(cell, dict):  # {"bytes": ..., "path": ...}, as Hugging Face datasets store images
        cell = cell.get("bytes")
        return [] if cell is None else [bytes(cell)]
    if isinstance(cell, (bytes, bytearray)):
        return [bytes(cell)]
    if isinstance(cell, list):
        return [b for item in cell for b in as_image_list(item)]
    raise ValueError(f"unexpected {IMAGE_COLUMN} value of type {type(cell).__name__}")


def image_key(data: bytes) -> str:
    return "blake2b:" + hashlib.blake2b(data, digest_size=16).hexdigest()


def parse_conversations(cell: Any, max_chars: int) -> list:
    """The conversations cell as a list of turns (a JSON string is parsed, if not over max_chars); ValueError
    names what is wrong."""
    if isinstance(cell, str):
        if len(cell) > max_chars:  # bounded before parsing, as a JSONL line is
            raise ValueError(f"record too large: {len(cell):,} characters (limit {max_chars:,})")
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError as e:
            raise ValueError(f"malformed conversations JSON: {e.msg}") from None
        except RecursionError:
            raise ValueError("malformed conversations JSON: nested too deeply") from None
        except ValueError as e:  # e.g. an integer too long to convert
            raise ValueError(f"malformed conversations JSON: {str(e).splitlines()[0][:120]}") from None
    if not isinstance(cell, list):
        raise ValueError(f"conversations is a {type(cell).__name__}, not a list of turns")
    return cell


def read_parquet_records(path: str, max_chars: int) -> Iterator[tuple[str, Any, list[ParquetImage]]]:
    """(record id, record dict or ValueError, images) for each row, streamed one row group at a time.

    The record dict has the turns under "conversations"; a row whose cells cannot be read yields the
    ValueError instead, so the caller counts it as a bad record.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        pf = pq.ParquetFile(path, memory_map=True)
    except (pa.ArrowException, OSError) as e:
        raise ParquetDataError(f"{path}: not a readable parquet file ({e})") from None
    with pf:
        names = pf.schema_arrow.names
        if CONVERSATIONS_COLUMN not in names:
            raise ParquetDataError(f"{path}: no '{CONVERSATIONS_COLUMN}' column (columns: {', '.join(names)})")
        columns = [c for c in (CONVERSATIONS_COLUMN, IMAGE_COLUMN, "id") if c in names]
        base = os.path.basename(path)
        for rg in range(pf.num_row_groups):
            table = pf.read_row_group(rg, columns=columns)
            conversations = table.column(CONVERSATIONS_COLUMN).to_pylist()
            images = table.column(IMAGE_COLUMN).to_pylist() if IMAGE_COLUMN in names else [None] * len(conversations)
            ids = table.column("id").to_pylist() if "id" in names else None
            for row, (turns, cell) in enumerate(zip(conversations, images)):
                rid = str(ids[row]) if ids is not None and ids[row] is not None else f"{base}:rg{rg}:{row}"
                try:
                    refs = [ParquetImage(path, rg, row, i, image_key(data))
                            for i, data in enumerate(as_image_list(cell))]
                    record: Any = {"conversations": parse_conversations(turns, max_chars)}
                except ValueError as e:
                    yield rid, e, []
                    continue
                yield rid, record, refs
            del table, conversations, images
