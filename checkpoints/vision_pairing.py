"""Which vision encoder goes with a checkpoint, checked before any image is encoded: a checkpoint's projection was
fitted to the features of the encoder it was trained with, so with another encoder (the untrained stand-in for
OpenAI's CLIP, a stand-in of another depth) it answers noise about images, without any error.

The sidecar records that encoder as {"path", "fingerprint"} (VisionEncoder.fingerprint: its weight and config files
and its preprocessing, also what keys the feature cache). The fingerprint decides, not the path: a copy of the same
encoder elsewhere is accepted, another encoder at the recorded path is not.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Optional

from .files import CheckpointError, PathLike
from .schema import recorded_candidates
from model.vision import DEFAULT_CLIP_PATH, STAND_IN_CLIP_PATH, V3_TOWER_PATH, VisionEncoder, tower_family

log = logging.getLogger("minimind")

OVERRIDE_FLAG = "--allow_encoder_mismatch"


class VisionEncoderMismatch(CheckpointError):
    """The vision encoder loaded is not the one the checkpoint was trained with; one line naming both."""


def add_encoder_mismatch_arg(parser: argparse.ArgumentParser) -> None:
    """The chat tools' --allow_encoder_mismatch (the trainer has its own, with its own help)."""
    parser.add_argument(OVERRIDE_FLAG, action="store_true",
                        help="load a checkpoint with another vision encoder (--clip_path) than the one it records "
                             "(a warning instead of an error; its answers about images are then likely noise)")


def encoder_record(encoder: VisionEncoder) -> dict[str, str]:
    """What a checkpoint's sidecar stores about its vision encoder: the path it was loaded from and its fingerprint."""
    return {"path": str(encoder.path), "fingerprint": encoder.fingerprint}


def check_vision_encoder(record: Optional[dict], encoder: dict[str, str], source: PathLike,
                         allow_mismatch: bool = False) -> bool:
    """Whether the encoder loaded (`encoder`, its encoder_record) is the one `source` records (True), or `source`
    records none (False, said once in the log at info level: an older or published v1 file cannot be checked).

    Another fingerprint is a one-line VisionEncoderMismatch naming both encoders and the fix; with
    `allow_mismatch` (the tools' --allow_encoder_mismatch) it is a warning instead, and False is returned."""
    if not record:
        log.info("%s records no vision encoder (an older or published v1 file): not checked against %s", source,
                 encoder["path"])
        return False
    if record.get("fingerprint") == encoder["fingerprint"]:
        return True
    recorded, loaded = _recorded_location(str(record.get("path")), source), encoder["path"]
    both = (f"{source} was trained with the vision encoder at '{recorded}' (fingerprint {record.get('fingerprint')}), "
            f"but the one loaded from '{loaded}' has fingerprint {encoder['fingerprint']}")
    if not allow_mismatch:
        raise VisionEncoderMismatch(
            f"vision encoder mismatch: {both}; its image projection was fitted to the other encoder's features, so "
            f"its answers about images would be noise: pass --clip_path {recorded} (or a copy of that encoder), or "
            f"{OVERRIDE_FLAG} to use this one anyway")
    log.warning("vision encoder mismatch allowed by %s: %s", OVERRIDE_FLAG, both)
    return False


def tower_for(generation: str, clip_path: str) -> str:
    """The tower to load for a checkpoint of `generation`: `clip_path`, except that v1's CLIP default (the apps'
    --clip_path left alone) means the checkpoint's own kind of tower, V3_TOWER_PATH for a 3v checkpoint."""
    if generation == "3v" and os.path.normpath(clip_path) == os.path.normpath(DEFAULT_CLIP_PATH):
        return V3_TOWER_PATH
    return clip_path


def check_encoder_family(generation: str, encoder: VisionEncoder, source: PathLike) -> None:
    """A v1 checkpoint goes with a CLIP tower (50 features per image), a 3v one with a SigLIP tower (64, after the
    post-layernorm): any other pairing is a one-line VisionEncoderMismatch, whatever --allow_encoder_mismatch says
    (the feature counts differ, so nothing could run)."""
    want = "siglip" if generation == "3v" else "clip"
    if encoder.kind != want:
        raise VisionEncoderMismatch(
            f"vision encoder mismatch: {source} is a {'minimind-3v' if generation == '3v' else 'v1'} checkpoint, "
            f"which needs a {'SigLIP2' if want == 'siglip' else 'CLIP'} vision tower, but the one loaded from "
            f"'{encoder.path}' is {'SigLIP' if encoder.kind == 'siglip' else 'CLIP'}: pass --clip_path with the "
            f"tower it was trained with")


def _recorded_location(recorded: str, source: PathLike) -> str:
    """Where the recorded encoder is from here: a relative record (from the project root, or from the working
    directory of an older run) named by the first place it exists, so the --clip_path hint works from any folder."""
    return next((c for c in recorded_candidates(recorded, str(source)) if os.path.isdir(c)), recorded)


def is_stand_in(path: str) -> bool:
    """True when `path` holds the untrained stand-in encoder: scripts/build_stand_in_clip.py marks it with
    STAND_IN.md. The one test every entry point uses."""
    return os.path.exists(os.path.join(path, "STAND_IN.md"))


def clip_or_stand_in(path: str, root: str = ".") -> str:
    """`path`, except that the default CLIP path, when it is missing and the stand-in was built, gives the stand-in
    (entry points that offer it say so loudly, with stand_in_warning)."""
    default, stand_in = os.path.join(root, DEFAULT_CLIP_PATH), os.path.join(root, STAND_IN_CLIP_PATH)
    if (os.path.realpath(path) == os.path.realpath(default) and not os.path.exists(os.path.join(default, "config.json"))
            and os.path.exists(os.path.join(stand_in, "config.json"))):
        return stand_in
    return path


def stand_in_warning(path: str) -> Optional[str]:
    """A loud line when `path` holds an untrained stand-in encoder (scripts/build_stand_in_clip.py, or
    scripts/build_stand_in_siglip.py for 3v's SigLIP2 shape)."""
    if is_stand_in(path) and tower_family(path) == "siglip":
        return (f"[stand-in] {path} is a randomly initialised, untrained SigLIP2-shaped vision tower, "
                f"not minimind-3v's SigLIP2 tower (no pretrained weights can be downloaded here)")
    if is_stand_in(path):
        return (f"[stand-in] {path} is a randomly initialised, untrained CLIP-shaped vision tower, "
                f"not OpenAI's CLIP (no pretrained weights can be downloaded here)")
    return None
