"""Finding the checkpoints the chat apps offer: the model directories in a folder, the newest SFT checkpoint,
and the file whose modification time dates a checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from checkpoints.files import CheckpointError, PathLike, read_json_object
from checkpoints.v3_layout import V3_MODEL_TYPE
from checkpoints.weights import HF_INDEX_FILES, HF_WEIGHT_FILES, is_model_dir


def is_sft_checkpoint(name: str) -> bool:
    """Whether a file name is an SFT checkpoint's: v1's {dim}[_moe]_vlm_sft.pth or minimind-3v's
    sft_vlm_{dim}[_moe].pth (not a resume file, ..._resume.pth)."""
    if name.endswith("_resume.pth"):
        return False
    return name.endswith("_vlm_sft.pth") or (name.startswith("sft_vlm_") and name.endswith(".pth"))


def find_model_dirs(folder: PathLike) -> list[Path]:
    """The MiniMind-V model directories directly inside `folder`: config.json with model_type "minimind" (v1, this
    project's export) or "minimind-v" (minimind-3v's transformers directory), and weights."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith(".") or not is_model_dir(child):
            continue
        try:
            model_type = read_json_object(child / "config.json").get("model_type")
        except CheckpointError:  # unreadable: not a model directory to offer (loading it would say why)
            continue
        if model_type in ("minimind", V3_MODEL_TYPE):
            found.append(child)
    return found


def weights_file(path: PathLike) -> Path:
    """The file holding a checkpoint's weights: the path itself, or the weight file of a model directory."""
    root = Path(path)
    if root.is_dir():
        for name in HF_INDEX_FILES + HF_WEIGHT_FILES:
            if (root / name).exists():
                return root / name
    return root


def newest_chat_checkpoint(out_dir: PathLike, root: PathLike = ".") -> Optional[Path]:
    """The most recently written SFT checkpoint (out_dir/*_vlm_sft.pth, or 3v's sft_vlm_*.pth) or model directory
    (in out_dir or root)."""
    out_dir = Path(out_dir)
    candidates = sorted(p for p in out_dir.glob("*.pth") if is_sft_checkpoint(p.name)) if out_dir.is_dir() else []
    candidates += find_model_dirs(out_dir) + find_model_dirs(root)
    if not candidates:
        return None
    return max(candidates, key=lambda p: weights_file(p).stat().st_mtime)
