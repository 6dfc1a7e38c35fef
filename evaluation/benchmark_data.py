"""Benchmark questions read from the benchmarks' own parquet files, one row group at a time.

A file that cannot be used at all (missing, not parquet, a required column missing or of the wrong type) is a
BenchmarkError with one line naming the file. A row that cannot be used (no question, text that is not UTF-8, an
answer that is not one of the benchmark's, no image bytes) is skipped and counted, and so is a row that repeats a
question already read (a second copy of a file); undecodable image bytes are counted when the batch is decoded
(evaluation/benchmarks.py).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from data_pipeline.parquet import cell_image_bytes
from data_pipeline.records import DataError, SkipCounter, check_data_file

from .benchmark_scoring import LETTERS, NO, YES, parse_options
from .benchmark_specs import BenchmarkSpec

DUPLICATE = "duplicate question id"  # the skip reason of a row that repeats a question already read
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
    key: tuple = ()  # what makes the question distinct: its category and ids (see question_key)


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
    if truth not in (tuple(options) or tuple(LETTERS)):  # one whole letter: '' or 'AB' is not an option
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
                     images[0], options, question_key(spec, row, category.strip(), images[0]))


def question_key(spec: BenchmarkSpec, row: dict[str, Any], category: str, image: bytes) -> tuple:
    """What tells two questions apart: the category and the row's ids (POPE's question_id restarts in each
    split), or, in a file without ids, the question's text and image."""
    ids = tuple(str(row[c]) for c in spec.id_columns if row.get(c) is not None)
    if ids:
        return ("ids", category) + ids
    return ("content", category, row.get("question"), hashlib.sha256(image).hexdigest())


def count_rows(files: list[str]) -> int:
    total = 0
    for path in files:
        with _open(path) as pf:
            total += pf.metadata.num_rows
    return total


def _bytes_type(kind):
    """The arrow type with every text field as bytes (the cast is free: no UTF-8 check, no copy)."""
    import pyarrow as pa

    if pa.types.is_string(kind):
        return pa.binary()
    if pa.types.is_large_string(kind):
        return pa.large_binary()
    if pa.types.is_struct(kind):
        return pa.struct([pa.field(f.name, _bytes_type(f.type), f.nullable) for f in kind])
    return kind


def _read_rows(pf, path: str, rg: int, columns: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of one row group with their text cells as bytes, and the names of the text columns: a cell that
    is not UTF-8 then costs its row (text_row), not the whole run."""
    import pyarrow as pa

    try:
        table = pf.read_row_group(rg, columns=columns)
        text = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        table = table.cast(pa.schema([pa.field(f.name, _bytes_type(f.type), f.nullable) for f in table.schema]))
        return table.to_pylist(), text
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise BenchmarkError(f"{path}: row group {rg} cannot be read ({reason})") from None


def text_row(row: dict[str, Any], text_columns: list[str]) -> dict[str, Any]:
    """The row with its text columns decoded; ValueError naming the first column that is not UTF-8."""
    out = dict(row)
    for column in text_columns:
        if isinstance(row.get(column), bytes):
            try:
                out[column] = row[column].decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"not UTF-8 text: column '{column}' holds bytes that are not UTF-8") from None
    return out


def _row_id(spec: BenchmarkSpec, base: str, rg: int, i: int, row: dict[str, Any]) -> str:
    """How a row is named in messages: its file, row group and row, and its first id (whatever its bytes)."""
    for column in spec.id_columns:
        value = row.get(column)
        if value is not None:
            shown = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            return f"{base} row group {rg} row {i} ({column} {shown[:80]})"
    return f"{base} row group {rg} row {i}"


def _file_items(spec: BenchmarkSpec, path: str, skips: SkipCounter, budget: Optional[int],
                first_seen: dict[tuple, str]) -> Iterator[Optional[BenchItem]]:
    """read_items for one file, reading at most `budget` rows; `first_seen` maps each question's key to the row
    that first asked it, across files."""
    with _open(path) as pf:
        columns = check_columns(path, pf.schema_arrow, spec)
        base = os.path.basename(path)
        for rg in range(pf.num_row_groups):
            if budget is not None and budget <= 0:
                return
            rows, text_columns = _read_rows(pf, path, rg, columns)
            for i, row in enumerate(rows[:budget]):
                row_id = _row_id(spec, base, rg, i, row)
                try:
                    item = row_item(spec, text_row(row, text_columns), row_id)
                except ValueError as e:
                    skips.skip(row_id, str(e))
                    yield None
                    continue
                if item.key in first_seen:
                    skips.skip(row_id, f"{DUPLICATE}: the same question as {first_seen[item.key]} (scored once)")
                    yield None
                    continue
                first_seen[item.key] = f"{row_id} of {path}"
                yield item
            budget = None if budget is None else budget - min(len(rows), budget)
            del rows


def read_items(spec: BenchmarkSpec, files: list[str], skips: SkipCounter,
               limit: Optional[int] = None) -> Iterator[Optional[BenchItem]]:
    """One entry per row read, in file order (None for a row skipped and counted in `skips`), up to `limit` rows.

    A row that repeats a question already read (the same category and ids: a second copy of a file) is a counted
    skip under DUPLICATE, so that no question counts twice. Only the needed columns of one row group are in
    memory at a time."""
    first_seen: dict[tuple, str] = {}
    seen = 0
    for path in files:
        if limit is not None and seen >= limit:
            return
        for item in _file_items(spec, path, skips, None if limit is None else limit - seen, first_seen):
            seen += 1
            yield item
