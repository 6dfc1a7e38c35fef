"""Data records: the one check on a data file's path, reading JSON and JSONL, and the checks on each record.

A record (v1 JSON array or JSONL, one object per line):
  {"id": "...", "image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                   {"from": "gpt", "value": "..."}, ...]}
Several images: "image": ["a.jpg", "b.jpg"] or the older MiniMind-V form "a.jpg, b.jpg", with one `<image>`
per image, in order. No "image" key and no `<image>`: a text-only sample. A parquet file (parquet.py) gives the
same records with the images stored in the file. A bad record is a ValueError with its reason, which the
dataset counts in a SkipCounter (or turns into a DataError under --strict_data).
"""
from __future__ import annotations

import json
import logging
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from model.config import IMAGE_SPECIAL_TOKEN

log = logging.getLogger("minimind")
IMAGE_TAG = "<image>"
# A record larger than this is skipped before it is tokenised (v1 records are a few KB; tokenising holds ~200
# bytes per character of text at once, so one 50 MB answer would take ~10 GB). The limit applies to the text
# as the tokenizer sees it, with each `<image>` counted as the placeholder it becomes.
MAX_RECORD_CHARS = 1 << 20
HUMAN_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant"}


class DataError(ValueError):
    """A data file that cannot be read at all, or a bad record under --strict_data."""


def check_data_file(path: str) -> None:
    """Refuse a data path no reader should open: FileNotFoundError when it is missing, DataError when it is not
    a readable regular file (opening a FIFO would block forever, /dev/urandom would never end)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path} (see the README, 'Real training', for the v1 "
                                f"dataset, or run `make demo` for the offline demo data)") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{path}: a directory; give a JSON, JSONL or parquet data file")
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: not a regular file (a FIFO, device or socket); give a JSON, JSONL or parquet "
                        f"data file")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise DataError(f"{path}: not readable ({e.strerror})") from None


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
    check_data_file(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text (line {line}: {e.reason} at byte {e.start})") from None
    if not text.lstrip().startswith("["):
        return [_parse_jsonl_line(lineno, line) for lineno, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read") from None
    except ValueError as e:  # e.g. an integer longer than Python's int-string conversion limit
        raise DataError(f"{path}: unreadable JSON ({str(e).splitlines()[0][:120]})") from None


def _parse_jsonl_line(lineno: int, line: str) -> Any:
    """One JSONL line as its value, or a BrokenLine saying why it is not one."""
    if len(line) > MAX_RECORD_CHARS:  # bounded before parsing: one 50 MB line would cost gigabytes
        return BrokenLine(lineno, f"record too large: {len(line):,} characters (limit {MAX_RECORD_CHARS:,})")
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return BrokenLine(lineno, f"malformed JSON: {e.msg}")
    except RecursionError:
        return BrokenLine(lineno, "malformed JSON: nested too deeply")
    except ValueError as e:
        return BrokenLine(lineno, f"malformed JSON: {str(e).splitlines()[0][:120]}")


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


def _turn_text(turn: dict) -> str:
    """A turn's text: v1 records use {"from", "value"}, the current MiniMind-V data {"role", "content"}."""
    return str(turn.get("value", turn.get("content")) or "").strip()


def count_image_tags(messages: list[dict[str, str]]) -> int:
    return sum(m["content"].count(IMAGE_TAG) for m in messages)


def check_record_size(messages: list[dict[str, str]]) -> None:
    """ValueError when the messages are over MAX_RECORD_CHARS as the tokenizer would see them: each `<image>`
    counts as the placeholder it becomes, so 140,000 tags in a 1 MB record are not 7 MB of text to tokenise."""
    tags = count_image_tags(messages)
    expanded = sum(len(m["content"]) for m in messages) + tags * (len(IMAGE_SPECIAL_TOKEN) - len(IMAGE_TAG))
    if expanded > MAX_RECORD_CHARS:
        with_tags = f", with {tags:,} <image> tag(s) counted as placeholders" if tags else ""
        raise ValueError(f"record too large: {expanded:,} characters of text{with_tags} (limit "
                         f"{MAX_RECORD_CHARS:,})")


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
