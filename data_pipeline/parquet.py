"""Records of a parquet data file in the current MiniMind-V layout, read one row group at a time.

One row per sample:
  conversations : a list of {"role", "content"} turns, or a JSON string of that list
  image_bytes   : one encoded image (binary), a list of them, a {"bytes", "path"} struct as Hugging Face
                  datasets store images, or null for a text-only sample
The content holds one `<image>` per image, in order. The file is memory-mapped and read by row group, so a
multi-GB file is never held in RAM whole: building the dataset streams it once (to hash each image and read its
header), and an image is read back later from its row group (the last few row groups' image columns stay cached
per process). With --feature_cache the images are encoded once, in file order, and training reads features only.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from PIL import Image, UnidentifiedImageError

from checkpoints.files import first_line
from data_pipeline.image_decode import ImageError, ImageTooLargeError, check_pixel_count, decompression_bomb_guard

from .records import DataError, check_data_file

IMAGE_COLUMN = "image_bytes"
CONVERSATIONS_COLUMN = "conversations"
ROW_GROUPS_CACHED = 2  # per process: image columns of the last row groups read (random access stays bounded)


class ParquetDataError(DataError):
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
        """The encoded image bytes (empty bytes when the cell holds none); ImageError when the row group can no
        longer be read (the file changed or went away since the dataset was built)."""
        try:
            images = cell_image_bytes(_row_group_images(self.file, self.row_group)[self.row])
        except (OSError, ValueError, IndexError) as e:  # pyarrow's errors are OSError or ValueError subclasses
            raise ImageError(f"{self.name}: cannot be read back ({first_line(e)})") from None
        return images[self.index] if self.index < len(images) else b""


_cache: "OrderedDict[tuple[str, int], list]" = OrderedDict()


def is_parquet(path: str) -> bool:
    """Whether a data file is read as parquet (by its name; anything else is JSON or JSONL)."""
    return str(path).endswith(".parquet")


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


def cell_image_bytes(cell: Any) -> list[bytes]:
    """The encoded images held in one cell of the image column (a single image, a list, a struct or null);
    ValueError naming what is there instead of binary data."""
    if cell is None:
        return []
    if isinstance(cell, dict):  # {"bytes": ..., "path": ...}, as Hugging Face datasets store images
        data = cell.get("bytes")
        if data is None:
            return []
        if not isinstance(data, (bytes, bytearray)):  # bytes(10**12) would allocate a terabyte of zeros
            raise ValueError(f"bad {IMAGE_COLUMN}: the struct's 'bytes' is a {type(data).__name__}, not binary")
        return [bytes(data)]
    if isinstance(cell, (bytes, bytearray)):
        return [bytes(cell)]
    if isinstance(cell, list):
        return [data for item in cell for data in cell_image_bytes(item)]
    raise ValueError(f"bad {IMAGE_COLUMN}: a {type(cell).__name__}, not binary image data")


def image_key(data: bytes) -> str:
    return "blake2b:" + hashlib.blake2b(data, digest_size=16).hexdigest()


def image_header_problem(data: bytes) -> Optional[str]:
    """Why these bytes cannot be a usable image, from their header alone (Pillow decodes no pixels here), or
    None. A truncated body still passes; decoding finds that later, when the image is used."""
    if not data:
        return "empty image (0 bytes)"
    try:
        with decompression_bomb_guard(), Image.open(io.BytesIO(data)) as img:
            check_pixel_count(img)
    except ImageTooLargeError as e:
        return str(e)
    except UnidentifiedImageError:
        return "not an image (unrecognised format)"
    except Exception as e:  # noqa: BLE001 - whatever Pillow raises on a malformed header is a bad image
        return f"unreadable image header ({type(e).__name__}: {first_line(e)})"
    return None


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
            raise ValueError(f"malformed conversations JSON: {first_line(e)}") from None
    if not isinstance(cell, list):
        raise ValueError(f"conversations is a {type(cell).__name__}, not a list of turns")
    return cell


def read_parquet_records(path: str, max_chars: int) -> Iterator[tuple[str, Any, list[ParquetImage]]]:
    """(record id, record dict or ValueError, images) for each row, streamed one row group at a time.

    The record dict has the turns under "conversations"; a row whose cells cannot be read, or one holding an
    image whose header is not an image's, yields the ValueError instead, so the caller counts it as a bad
    record. A file that cannot be read as parquet data is a ParquetDataError naming it.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_data_file(path)
    try:
        pf = pq.ParquetFile(path, memory_map=True)
    except (pa.ArrowException, OSError) as e:
        raise ParquetDataError(f"{path}: not a readable parquet file ({first_line(e)})") from None
    with pf:
        names = pf.schema_arrow.names
        if CONVERSATIONS_COLUMN not in names:
            raise ParquetDataError(f"{path}: no '{CONVERSATIONS_COLUMN}' column (columns: {', '.join(names)})")
        columns = [c for c in (CONVERSATIONS_COLUMN, IMAGE_COLUMN, "id") if c in names]
        headers: dict[str, Optional[str]] = {}  # image key -> its header problem: a shared image is read once
        for rg in range(pf.num_row_groups):
            try:
                table = pf.read_row_group(rg, columns=columns).to_pydict()
            except (pa.ArrowException, OSError) as e:
                raise ParquetDataError(f"{path}: row group {rg} is unreadable ({first_line(e)})") from None
            yield from _row_group_records(path, rg, table, max_chars, headers)
            del table


def _row_group_records(path: str, rg: int, table: dict[str, list], max_chars: int,
                       headers: dict[str, Optional[str]]) -> Iterator[tuple[str, Any, list[ParquetImage]]]:
    """The records of one row group's columns (see read_parquet_records)."""
    conversations = table[CONVERSATIONS_COLUMN]
    images = table.get(IMAGE_COLUMN, [None] * len(conversations))
    ids = table.get("id")
    base = os.path.basename(path)
    for row, (turns, cell) in enumerate(zip(conversations, images)):
        rid = str(ids[row]) if ids is not None and ids[row] is not None else f"{base}:rg{rg}:{row}"
        try:
            refs = []
            for i, data in enumerate(cell_image_bytes(cell)):
                ref = ParquetImage(path, rg, row, i, image_key(data))
                if ref.key not in headers:
                    headers[ref.key] = image_header_problem(data)
                if headers[ref.key] is not None:
                    raise ValueError(f"unreadable image: {ref.name}: {headers[ref.key]}")
                refs.append(ref)
            record: Any = {"conversations": parse_conversations(turns, max_chars)}
        except ValueError as e:
            yield rid, e, []
            continue
        yield rid, record, refs
