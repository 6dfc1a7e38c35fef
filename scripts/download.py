"""Download the real MiniMind-V assets from the Hugging Face hub.

For users with internet access. Pieces (``--what``):

* ``clip``      openai/clip-vit-base-patch32        -> model/clip_model/clip-vit-base-patch32
* ``dataset``   jingyaogong/minimind-v_dataset      -> dataset/ (JSON + image zips, unzipped
                into dataset/pretrain_images and dataset/sft_images)
* ``llm``       out/{dim}_llm.pth from the same dataset repo -> out/{dim}_llm.pth
* ``tokenizer`` jingyaogong/minimind-v-v1-small tokenizer files -> model/minimind_tokenizer_official/

The endpoint is whatever ``huggingface_hub`` uses, i.e. the ``HF_ENDPOINT``
environment variable when set (e.g. ``HF_ENDPOINT=https://hf-mirror.com``).

Usage::

    python scripts/download.py [--what clip dataset llm tokenizer | all] [--dim 512|768] [--root .]
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from pathlib import Path
from typing import Callable

import huggingface_hub
from huggingface_hub import hf_hub_download, snapshot_download

DEFAULT_ENDPOINT = "https://huggingface.co"
MIRROR_HINT = "HF_ENDPOINT=https://hf-mirror.com"

CLIP_REPO = "openai/clip-vit-base-patch32"
CLIP_DIR = "model/clip_model/clip-vit-base-patch32"

DATASET_REPO = "jingyaogong/minimind-v_dataset"
DATASET_DIR = "dataset"
# Globs rather than exact paths because the repo layout cannot be checked from
# here; "*" also matches "/" in huggingface_hub's filter, so sub-folders match.
DATASET_PATTERNS = [
    "*chat-translated*.json",
    "*llava_instruct_230k*.json",
    "*pretrain_images*.zip",
    "*sft_images*.zip",
]

LLM_DIMS = (512, 768)

TOKENIZER_REPO = "jingyaogong/minimind-v-v1-small"
TOKENIZER_DIR = "model/minimind_tokenizer_official"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

PIECES = ("clip", "dataset", "llm", "tokenizer")


class DownloadError(RuntimeError):
    """A hub call failed; the message is a single line meant for the user."""


def hub_endpoint() -> str:
    """The endpoint huggingface_hub talks to (``HF_ENDPOINT`` if set)."""
    # huggingface_hub reads HF_ENDPOINT once at import; the environment is
    # checked first so a value set later in this process is still reported
    # (and passed on explicitly, see _call_hub).
    env = os.environ.get("HF_ENDPOINT", "").strip()
    if env:
        return env.rstrip("/")
    return str(getattr(huggingface_hub.constants, "ENDPOINT", DEFAULT_ENDPOINT)).rstrip("/")


def _call_hub(description: str, fn: Callable, **kwargs) -> str:
    """Run one hub call, turning any failure into a one-line DownloadError."""
    endpoint = hub_endpoint()
    try:
        return fn(endpoint=endpoint, **kwargs)
    except Exception as err:  # noqa: BLE001 - network/auth/HTTP errors come in many types
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        hint = f"check your connection, or try a mirror: {MIRROR_HINT} python scripts/download.py ..."
        if endpoint != DEFAULT_ENDPOINT:
            hint = f"check your connection and that {endpoint} serves this repo"
        raise DownloadError(
            f"download failed: {description} from {endpoint}: {type(err).__name__}: {first_line} -- {hint}"
        ) from err


def download_clip(root: Path) -> Path:
    """Download CLIP ViT-B/32 (weights, configs, tokenizer files) to ``root/CLIP_DIR``."""
    target = root / CLIP_DIR
    _call_hub(
        f"{CLIP_REPO} (model)",
        snapshot_download,
        repo_id=CLIP_REPO,
        repo_type="model",
        local_dir=str(target),
        # Only the PyTorch-usable files, not the TF/Flax copies of the weights.
        allow_patterns=["*.json", "*.txt", "*.safetensors"],
    )
    if not any(target.glob("*.safetensors")):
        # Older revisions only ship pytorch_model.bin.
        _call_hub(
            f"{CLIP_REPO}/pytorch_model.bin",
            hf_hub_download,
            repo_id=CLIP_REPO,
            repo_type="model",
            filename="pytorch_model.bin",
            local_dir=str(target),
        )
    return target


def _safe_extract(archive: zipfile.ZipFile, destination: Path) -> None:
    """Extract ``archive`` into ``destination``, refusing paths that escape it."""
    destination = destination.resolve()
    for member in archive.namelist():
        resolved = (destination / member).resolve()
        if resolved != destination and destination not in resolved.parents:
            raise DownloadError(f"refusing to extract {member!r}: it points outside {destination}")
    archive.extractall(destination)


def extract_zip(zip_path: Path, dataset_dir: Path) -> Path:
    """Unzip ``foo.zip`` into ``dataset_dir/foo`` and return that folder.

    Zips that already contain a single top-level ``foo/`` folder are extracted
    next to it instead, so we never end up with ``foo/foo/``. A marker file
    records the zip's size so a re-run skips archives already extracted.
    """
    target = dataset_dir / zip_path.stem
    marker = dataset_dir / f".{zip_path.name}.extracted"
    stamp = str(zip_path.stat().st_size)
    if marker.exists() and marker.read_text().strip() == stamp and target.is_dir():
        return target
    with zipfile.ZipFile(zip_path) as archive:
        tops = {name.split("/", 1)[0] for name in archive.namelist() if name and not name.startswith("__MACOSX")}
        wrapped = tops == {zip_path.stem}
        target.mkdir(parents=True, exist_ok=True)
        _safe_extract(archive, dataset_dir if wrapped else target)
    marker.write_text(stamp)
    return target


def download_dataset(root: Path, delete_zips: bool = False) -> list[Path]:
    """Download the MiniMind-V JSON files and image zips; unzip every zip found."""
    target = root / DATASET_DIR
    _call_hub(
        f"{DATASET_REPO} (dataset)",
        snapshot_download,
        repo_id=DATASET_REPO,
        repo_type="dataset",
        local_dir=str(target),
        allow_patterns=DATASET_PATTERNS,
    )
    jsons = sorted(p for p in target.rglob("*.json") if ".cache" not in p.parts)
    zips = sorted(p for p in target.rglob("*.zip") if ".cache" not in p.parts)
    if not jsons:
        print(f"  warning: no JSON files matched {DATASET_PATTERNS[:2]} in {DATASET_REPO}")
    if not zips:
        print(f"  warning: no image zips matched {DATASET_PATTERNS[2:]} in {DATASET_REPO}")
    extracted = []
    for zip_path in zips:
        folder = extract_zip(zip_path, target)
        print(f"  unzipped {zip_path.name} -> {folder}")
        extracted.append(folder)
        if delete_zips:
            zip_path.unlink()
    return extracted


def download_llm(root: Path, dim: int = 512) -> Path:
    """Download ``out/{dim}_llm.pth`` (MiniMind LLM weights) to ``root/out/``."""
    if dim not in LLM_DIMS:
        raise DownloadError(f"--dim must be one of {LLM_DIMS}, got {dim}")
    filename = f"out/{dim}_llm.pth"
    path = _call_hub(
        f"{DATASET_REPO}/{filename} (dataset)",
        hf_hub_download,
        repo_id=DATASET_REPO,
        repo_type="dataset",
        filename=filename,
        local_dir=str(root),  # the "out/" prefix of filename is kept under local_dir
    )
    return Path(path)


def download_tokenizer(root: Path) -> Path:
    """Download the official MiniMind tokenizer files to ``root/TOKENIZER_DIR``."""
    target = root / TOKENIZER_DIR
    for filename in TOKENIZER_FILES:
        _call_hub(
            f"{TOKENIZER_REPO}/{filename} (model)",
            hf_hub_download,
            repo_id=TOKENIZER_REPO,
            repo_type="model",
            filename=filename,
            local_dir=str(target),
        )
    return target


def main(argv: list[str] | None = None) -> None:
    """CLI entry point; exits with a one-line message if a download fails."""
    parser = argparse.ArgumentParser(description="Download MiniMind-V assets from the Hugging Face hub.")
    parser.add_argument("--what", nargs="+", default=["all"], choices=PIECES + ("all",), help="what to fetch")
    parser.add_argument("--dim", type=int, default=512, choices=LLM_DIMS, help="LLM width for --what llm")
    parser.add_argument("--root", default=".", help="repository root to download into")
    parser.add_argument("--delete_zips", action="store_true", help="delete image zips after extracting them")
    args = parser.parse_args(argv)

    root = Path(args.root)
    pieces = PIECES if "all" in args.what else tuple(p for p in PIECES if p in args.what)
    print(f"hub endpoint: {hub_endpoint()} (set HF_ENDPOINT to change it, e.g. {MIRROR_HINT})")
    try:
        for piece in pieces:
            print(f"[{piece}] downloading ...")
            if piece == "clip":
                result = download_clip(root)
            elif piece == "dataset":
                result = download_dataset(root, delete_zips=args.delete_zips)
            elif piece == "llm":
                result = download_llm(root, args.dim)
            else:
                result = download_tokenizer(root)
            print(f"[{piece}] done: {result}")
    except DownloadError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
