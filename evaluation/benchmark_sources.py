"""Where a benchmark's files came from: the manifest scripts/download.py writes beside them (bench_source.json:
repo, revision, files), read and checked before any question is asked.

A manifest that cannot be used (unreadable, not JSON, nested too deeply, too large, a field of the wrong type) is a
BenchmarkError with one line naming the manifest and the field, so that a run never fails after scoring every
question. A file the manifest does not list (or that has no manifest) has no recorded revision.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Optional

from checkpoints.files import CheckpointError, read_json_object

from .benchmark_data import BenchmarkError
from .benchmark_specs import MANIFEST_NAME

MAX_MANIFEST_BYTES = 1 << 20  # download.py writes a few hundred bytes
MAX_FIELD_CHARS = 1000
REMEDY = "fix or delete it (`python scripts/download.py --what bench` writes it)"
Source = Optional[dict[str, str]]


def _text_field(manifest: Path, record: dict, name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or len(value) > MAX_FIELD_CHARS:
        what = type(value).__name__ if not isinstance(value, str) else f"text of {len(value):,} characters"
        raise BenchmarkError(f"{manifest}: field '{name}' must be text (at most {MAX_FIELD_CHARS} characters), "
                             f"not {what}; {REMEDY}")
    return value


def read_manifest(manifest: Path) -> tuple[str, str, set[str]]:
    """(repo, revision, listed files) of one manifest; BenchmarkError naming the manifest and the field."""
    try:
        st = os.stat(manifest)
    except OSError as e:
        raise BenchmarkError(f"{manifest}: cannot read ({e.strerror or e}); {REMEDY}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BenchmarkError(f"{manifest}: not a regular file; {REMEDY}")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise BenchmarkError(f"{manifest}: {st.st_size:,} bytes, more than a manifest holds "
                             f"({MAX_MANIFEST_BYTES:,}); {REMEDY}")
    try:
        record = read_json_object(manifest, "benchmark manifest", REMEDY)
    except CheckpointError as e:
        raise BenchmarkError(str(e)) from None
    files = record.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) and len(f) <= MAX_FIELD_CHARS for f in files):
        what = type(files).__name__ if not isinstance(files, list) else "a list holding something else"
        raise BenchmarkError(f"{manifest}: field 'files' must be a list of file paths, not {what}; {REMEDY}")
    return _text_field(manifest, record, "repo"), _text_field(manifest, record, "revision"), set(files)


def file_source(path: str) -> Source:
    """{"repo", "revision"} from the nearest manifest (in the file's folder or up to two above it, since the Hub
    paths keep their folders) when it lists this file; None when there is none or it does not list the file."""
    here = Path(path).resolve()
    for folder in list(here.parents)[:3]:
        manifest = folder / MANIFEST_NAME
        if not (manifest.exists() or manifest.is_symlink()):
            continue
        repo, revision, listed = read_manifest(manifest)
        return {"repo": repo, "revision": revision} if here.relative_to(folder).as_posix() in listed else None
    return None


def file_sources(files: list[str]) -> dict[str, Source]:
    """file_source of every file, each manifest checked: call it before the run."""
    return {path: file_source(path) for path in files}


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
