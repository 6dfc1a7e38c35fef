"""How scripts/download.py moves bytes: a deadline around each hub call, and a single-file download that resumes.

huggingface_hub's own single-file download deletes its partial file when it fails (its temporary name is unique
to the process), so hf_hub_download here keeps ``<file>.<etag>.part`` beside the destination and continues it
with an HTTP range request on the next run. A deadline is needed because huggingface_hub's per-read timeout does
not bound a transfer: a server sending a byte every few seconds never trips it.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

from huggingface_hub import get_hf_file_metadata, hf_hub_url
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers


class DownloadError(RuntimeError):
    """A hub call failed; the message is a single line meant for the user."""


class DownloadDeadlineError(DownloadError):
    """A hub call ran past its deadline; its thread may still be blocked on the network (download.main ends the
    process)."""


def within_deadline(description: str, seconds: float, call: Callable[[], str]) -> str:
    """call() in a daemon thread, waited for at most `seconds`; a DownloadDeadlineError past that. The thread cannot
    be stopped while a read blocks, so it is left behind (main then exits the process)."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread as it is
            outcome["error"] = err

    worker = threading.Thread(target=run, name=f"download {description}", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise DownloadDeadlineError(
            f"download stopped: {description} took longer than the deadline of {seconds:g} s (--deadline); what "
            "arrived is kept, and running the same command again resumes from it")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


def hf_hub_download(*, repo_id: str, filename: str, local_dir: str, repo_type: str = "model",
                    revision: str | None = None, endpoint: str | None = None) -> str:
    """Download one file of a hub repo to ``local_dir/filename`` and return that path, resuming a partial
    ``.part`` file left by an earlier run (the file's etag is in its name, so a changed file starts afresh).
    A destination already of the hub's size is kept as it is."""
    target = Path(local_dir) / filename
    url = hf_hub_url(repo_id, filename, repo_type=repo_type, revision=revision, endpoint=endpoint)
    meta = get_hf_file_metadata(url, endpoint=endpoint)
    if target.is_file() and meta.size is not None and target.stat().st_size == meta.size:
        return str(target)
    etag = "".join(c for c in (meta.etag or "unknown") if c.isalnum())[:16]
    part = target.with_name(f"{target.name}.{etag}.part")
    part.parent.mkdir(parents=True, exist_ok=True)
    # unbuffered: every chunk huggingface_hub hands over is on disk even if the process is ended at the deadline
    with open(part, "r+b" if part.exists() else "wb", buffering=0) as f:
        resume = f.seek(0, os.SEEK_END)
        if meta.size is not None and resume > meta.size:  # not a prefix of this file: start again
            f.truncate(0)
            resume = f.seek(0)
        if meta.size is None or resume < meta.size:
            http_get(meta.location, f, resume_size=resume, headers=build_hf_headers(), expected_size=meta.size,
                     displayed_filename=filename)
    os.replace(part, target)
    return str(target)
