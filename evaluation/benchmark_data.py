"""Benchmark questions read from the benchmarks' own parquet files, one row group at a time.

A file that cannot be used at all (missing, not parquet, a required column missing or of the wrong type) is a
BenchmarkError with one line naming the file. A row that cannot be used (no question, an answer that is not one of
the benchmark's, no image bytes) is skipped and counted; undecodable image bytes are counted when the batch is
decoded (evaluation/benchmarks.py).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from data_pipeline.parquet import cell_image_bytes
from data_pipeline.records import DataError, SkipCounter, check_data_file

from .benchmark_scoring import LETTERS, NO, YES, parse_options
from .benchmark_specs import MANIFEST_NAME, BenchmarkSpec

MAX_QUESTION_CHARS = 20_000  # MMStar's longest prompt is about 2,000 characters; longer is not a benchmark row


class BenchmarkError(ValueError):
    """A benchmark file that cannot be read at all; the message is one line naming the file."""


@dataclass
class BenchItem:
    """One usable question: its id, text, true answer, category, image bytes and (MMStar) its options."""

    row_id: str
    question: str
    truth: str
    category: str
    l2_category: str
    image: bytes
    options: dict[str, str]


def benchmark_files(path: str, spec: BenchmarkSpec) -> list[str]:
    """The parquet files to read, each opened and its columns checked (only the footer is read): `path` itself,
    or every .parquet file under the folder `path`, sorted."""
    files = _find_files(path, spec)
    for file in files:
        try:
            check_data_file(file)  # the project's check: a readable regular file, never a FIFO or a device
        except (DataError, OSError) as e:
            raise BenchmarkError(str(e)) from None
        with _open(file) as pf:
            check_columns(file, pf.schema_arrow, spec)
    return files


def _find_files(path: str, spec: BenchmarkSpec) -> list[str]:
    if not os.path.exists(path):
        raise BenchmarkError(f"benchmark file not found: {path} (download {spec.name} with `python scripts/"
                             f"download.py --what bench`, or pass --bench_path)")
    if os.path.isdir(path):
        root = Path(path)
        files = sorted(str(p) for p in root.rglob("*.parquet")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not files:
            raise BenchmarkError(f"{path}: no .parquet file in this folder (download {spec.name} with `python "
                                 f"scripts/download.py --what bench`)")
        return files
    return [path]


def _open(path: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path, memory_map=True)
    except (pa.ArrowException, OSError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise BenchmarkError(f"{path}: not a readable parquet file ({reason})") from None


def _is_image_type(arrow_type) -> bool:
    import pyarrow as pa

    binary = (pa.types.is_binary, pa.types.is_large_binary)
    if any(is_binary(arrow_type) for is_binary in binary):
        return True
    if pa.types.is_struct(arrow_type):  # a Hugging Face Image: {"bytes": binary, "path": string}
        names = [arrow_type.field(i).name for i in range(arrow_type.num_fields)]
        return "bytes" in names and any(b(arrow_type.field("bytes").type) for b in binary)
    return False


def check_columns(path: str, schema, spec: BenchmarkSpec) -> list[str]:
    """The columns to read; a BenchmarkError when a required one is missing or of the wrong type."""
    import pyarrow as pa

    names = schema.names
    missing = [c for c in spec.text_columns + (spec.image_column,) if c not in names]
    if missing:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise BenchmarkError(f"{path}: no '{missing[0]}' column, which {spec.name} needs (columns: {shown}); is "
                             f"this the {spec.name} file?")
    for column in spec.text_columns:
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise BenchmarkError(f"{path}: column '{column}' holds {kind}, not text")
    kind = schema.field(spec.image_column).type
    if not _is_image_type(kind):
        raise BenchmarkError(f"{path}: column '{spec.image_column}' holds {kind}, not image bytes (binary, or a "
                             f"struct with a binary 'bytes' field)")
    return list(spec.text_columns) + [spec.image_column] + [c for c in spec.optional_columns if c in names]


def _truth(spec: BenchmarkSpec, answer: str, options: dict[str, str]) -> str:
    if spec.name == "pope":
        truth = answer.strip().lower()
        if truth not in (YES, NO):
            raise ValueError(f"unusable answer: {answer[:40]!r} is not yes or no")
        return truth
    truth = answer.strip().upper()
    if truth not in (options or LETTERS):
        raise ValueError(f"unusable answer: {answer[:40]!r} is not one of the options "
                         f"{''.join(options) or LETTERS}")
    return truth


def row_item(spec: BenchmarkSpec, row: dict[str, Any], row_id: str) -> BenchItem:
    """The question of one row; ValueError with the reason when the row cannot be used."""
    question, answer, category = (row.get(c) for c in ("question", "answer", "category"))
    if not isinstance(question, str) or not question.strip():
        raise ValueError("no question")
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(f"question too long: {len(question):,} characters (limit {MAX_QUESTION_CHARS:,})")
    if not isinstance(answer, str):
        raise ValueError("unusable answer: none given")
    if not isinstance(category, str) or not category.strip():
        raise ValueError("no category")
    options = parse_options(question) if spec.name == "mmstar" else {}
    truth = _truth(spec, answer, options)
    try:
        images = cell_image_bytes(row.get(spec.image_column))
    except ValueError as e:  # its message names the training data's column; this one is the benchmark's
        raise ValueError(f"not image bytes: {str(e).split(': ', 1)[-1]}") from None
    if len(images) != 1:
        raise ValueError(f"not one image: the image cell holds {len(images)}")
    if not images[0]:
        raise ValueError("no image bytes: the image cell is empty")
    l2 = row.get("l2_category")
    return BenchItem(row_id, question, truth, category.strip(), l2.strip() if isinstance(l2, str) else "",
                     images[0], options)


def count_rows(files: list[str]) -> int:
    total = 0
    for path in files:
        with _open(path) as pf:
            total += pf.metadata.num_rows
    return total


def read_items(spec: BenchmarkSpec, files: list[str], skips: SkipCounter,
               limit: Optional[int] = None) -> Iterator[Optional[BenchItem]]:
    """One entry per row read, in file order (None for a row skipped and counted in `skips`), up to `limit` rows.

    Only the needed columns of one row group are in memory at a time."""
    import pyarrow as pa

    seen = 0
    for path in files:
        with _open(path) as pf:
            columns = check_columns(path, pf.schema_arrow, spec)
            base = os.path.basename(path)
            for rg in range(pf.num_row_groups):
                if limit is not None and seen >= limit:
                    return
                try:
                    rows = pf.read_row_group(rg, columns=columns).to_pylist()
                except (pa.ArrowException, OSError) as e:
                    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                    raise BenchmarkError(f"{path}: row group {rg} cannot be read ({reason})") from None
                for i, row in enumerate(rows):
                    if limit is not None and seen >= limit:
                        return
                    seen += 1
                    named = [f" ({c} {str(row[c])[:80]})" for c in spec.id_columns if row.get(c) is not None][:1]
                    row_id = f"{base} row group {rg} row {i}" + "".join(named)
                    try:
                        yield row_item(spec, row, row_id)
                    except ValueError as e:
                        skips.skip(row_id, str(e))
                        yield None
                del rows


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recorded_revision(path: str) -> Optional[dict[str, str]]:
    """{"repo", "revision"} from the manifest scripts/download.py wrote beside the benchmark files (in the file's
    folder or up to two above it, since the Hub paths keep their folders), when it lists this file."""
    here = Path(path).resolve()
    for folder in list(here.parents)[:3]:
        manifest = folder / MANIFEST_NAME
        if not manifest.is_file():
            continue
        try:
            record = json.loads(manifest.read_text())
        except (OSError, ValueError):
            return None
        if isinstance(record, dict) and here.relative_to(folder).as_posix() in record.get("files", []):
            return {"repo": str(record.get("repo")), "revision": str(record.get("revision"))}
        return None
    return None
