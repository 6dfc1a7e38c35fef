"""Which tokenizer goes with a checkpoint or a training run, checked before any token is encoded: a checkpoint
is only meaningful with the vocabulary it was trained with (see tokenizer.py for the resolution rule).
"""
from __future__ import annotations

from typing import Optional

from .checkpoint import Checkpoint
from .files import PathLike
from .tokenizer import (TokenizerError, check_tokenizer, default_tokenizer_path, resolve_tokenizer_path,
                        tokenizer_record)


def checkpoint_tokenizer(ckpt: Checkpoint, explicit: Optional[str] = None) -> tuple[str, str]:
    """(path, fingerprint) of the tokenizer for `ckpt` by the one resolution rule, checked against its record.

    Raises checkpoints.tokenizer.TokenizerError (one line) when none is found or the vocabularies differ."""
    generation = ckpt.stored.get("generation", "v1")  # read from the checkpoint, its sidecar or config.json
    path = resolve_tokenizer_path(explicit, ckpt.tokenizer_dir, ckpt.tokenizer_record, ckpt.path, generation)
    return path, check_tokenizer(path, ckpt.tokenizer_record, ckpt.path, generation)


def training_tokenizer(explicit: Optional[str], init: Optional[Checkpoint], generation: str = "v1") -> dict[str, str]:
    """The record ({"path", "fingerprint"}) of the tokenizer a training run uses, checked before any step.

    From scratch: `explicit` or the project's tokenizer of `generation` (v1's or the 3v-style one). From a
    checkpoint (a chained stage, --init, or the published *_llm.pth / llm_768.pth): its own tokenizer by the
    resolution rule (the official one of its generation when it records none), which must match its record."""
    if init is None:
        return tokenizer_record(explicit or default_tokenizer_path(generation))
    path, fingerprint = checkpoint_tokenizer(init, explicit)
    return {"path": path, "fingerprint": fingerprint}


def check_resume_tokenizer(saved: Optional[dict], record: dict[str, str], resume_path: PathLike) -> None:
    """A resumed run must use the vocabulary its resume checkpoint was trained with (older files record none)."""
    if saved and saved.get("fingerprint") != record["fingerprint"]:
        raise TokenizerError(f"tokenizer mismatch: {resume_path} was trained with the tokenizer at "
                             f"'{saved.get('path')}' (vocabulary {str(saved.get('fingerprint'))[:12]}), but this run "
                             f"uses '{record['path']}' (vocabulary {record['fingerprint'][:12]}); pass "
                             f"--tokenizer_path {saved.get('path')}")
