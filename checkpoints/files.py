"""File helpers for the model's files: the checkpoint error types, one-line error text, the regular-file check,
strict JSON-object reading and atomic writes (the error text, the file check and atomic writes serve the data
pipeline, the servers and the feature store too).
"""
from __future__ import annotations

import glob
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional, Union

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (e.g. the disk is full); the file under the final name is left as it was."""


def first_line(e: BaseException) -> str:
    """The first line of an error message, cut at its first sentence (torch's messages run on)."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line.split(". ")[0][:160]


def regular_file_problem(path: PathLike, what: str) -> Optional[str]:
    """Why `path` cannot be read as `what` ("an image file", "a checkpoint file"), checked without opening it, or
    None: only a non-empty regular file is read (a FIFO would block the reader, /dev/urandom never ends)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "file not found"
    except OSError as e:
        return f"cannot read ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        return f"is a directory, not {what}"
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else
                "a character device" if stat.S_ISCHR(st.st_mode) else
                "a block device" if stat.S_ISBLK(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        return f"not a regular file ({kind})"
    if st.st_size == 0:
        return "empty file (0 bytes)"
    return None


def read_json_object(path: PathLike, what: str = "JSON", remedy: str = "") -> dict[str, Any]:
    """A JSON file holding an object, or CheckpointError with one line naming the file (malformed, nested too
    deeply, integers past Python's int-string limit, not an object, not UTF-8). `what` names the file's role
    in the message ("unreadable <what>"); `remedy`, when given, is appended as what the user can do."""
    suffix = f"; {remedy}" if remedy else ""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except RecursionError:
        raise CheckpointError(f"{path}: unreadable {what} (nested too deeply){suffix}") from None
    except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError and the int-string limit included
        raise CheckpointError(f"{path}: unreadable {what} ({first_line(e)}){suffix}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: not a JSON object{suffix}")
    return value


def refuse_special_target(path: PathLike) -> None:
    """CheckpointWriteError when `path` is there but is not a regular file: renaming over a directory fails (after
    the whole write), and renaming over a FIFO or a device replaces it (as root, /dev/null itself)."""
    try:
        mode = os.stat(path).st_mode  # follows a link: one to /dev/null is refused too
    except OSError:
        return  # nothing there yet (or unreachable: the write says why)
    if not stat.S_ISREG(mode):
        raise CheckpointWriteError(f"{path}: {regular_file_problem(path, 'a file')}; not replaced (give a file path)")


def atomic_write(path: PathLike, write_fn: Callable[[BinaryIO], Any]) -> None:
    """Write through a temp file in the same folder, fsync, then rename: a crash leaves the old file intact.

    Only a regular file (or nothing) is ever replaced (refuse_special_target). An OSError while writing (e.g.
    ENOSPC: disk full) becomes a one-line CheckpointWriteError naming the file."""
    path = Path(path)
    refuse_special_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, CheckpointWriteError):
            kept = "the previous file is unchanged" if path.exists() else "nothing was written"
            error = CheckpointWriteError(f"{path}: could not write ({e.strerror or e}); {kept}")
            error.errno = e.errno
            raise error from e
        raise


def remove_stale_temp_files(paths: list[PathLike]) -> list[str]:
    """Delete the temp files (`.<name>.<random>.tmp`, made by atomic_write) that a killed save of one of `paths`
    left behind; the files under the final names are never touched. Returns what was removed.

    Call it only from the one process that writes these paths (a concurrent writer's temp file looks the same)."""
    removed = []
    for path in paths:
        path = Path(path)
        if not path.parent.is_dir():
            continue
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink(missing_ok=True)
                removed.append(str(tmp))
    return removed
