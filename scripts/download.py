"""Download the real MiniMind-V assets from the Hugging Face hub.

For users with internet access. Pieces (``--what``):

* ``model``       the published MiniMind-V v1 model, jingyaogong/minimind-v-v1-small (``--dim 512``) or
                  jingyaogong/minimind-v-v1 (``--dim 768``) -> ./minimind-v-v1-small or ./minimind-v-v1
                  (config.json, pytorch_model.bin, tokenizer; its Python files are not fetched: never run)
* ``clip``        openai/clip-vit-base-patch32        -> model/clip_model/clip-vit-base-patch32
* ``eval_images`` the v1 test pictures                -> dataset/eval_images/
* ``dataset``     jingyaogong/minimind-v_dataset      -> dataset/ (the two JSON files + image zips, unzipped
                  into dataset/pretrain_images and dataset/sft_images, + eval_images/)
* ``llm``         out/{dim}_llm.pth from the same dataset repo -> out/{dim}_llm.pth
* ``tokenizer``   the official MiniMind tokenizer (jingyaogong/minimind-v-v1-small) -> model/minimind_tokenizer_official/
* ``bench``       the POPE (lmms-lab/POPE) and MMStar (Lin-Chen/MMStar) parquet files, each pinned to a commit
                  (evaluation/benchmark_specs.py) -> dataset/bench/pope/, dataset/bench/mmstar/, each with a
                  bench_source.json naming the repo and revision (``3-eval_chat.py --benchmark`` records it)

With ``--generation 3v`` the pieces are minimind-3v's published files instead (V3_SOURCES: ``model`` the
transformers directory jingyaogong/minimind-3v -> ./minimind-3v without its Python files, ``clip`` the SigLIP2
tower jingyaogong/siglip2-base-p32-256-ve -> model/siglip2-base-p32-256-ve, ``llm`` llm_768.pth of
jingyaogong/minimind-3v-pytorch -> out/llm_768.pth, ``tokenizer`` the official minimind-3v tokenizer, which the
published 3v checkpoints need -> model/minimind_3v_tokenizer_official (the project ships its own 3v-style tokenizer
in model/minimind_3v_tokenizer, for training from scratch), ``dataset`` the
two parquet files -> dataset/, ``eval_images`` the dataset repo's eval_images/ at its main branch); ``bench`` is
the same. The repo names are upstream's README's; which files each repo holds is not settled by upstream's code.

``all`` is everything except ``model`` and ``bench``. The dataset repo is pinned to the v1 snapshot (``--revision`` to
change it): its main branch later dropped the v1 files. Downloads show progress bars, and an interrupted one
resumes where it stopped when the command is run again: a single file is fetched into ``<file>.<etag>.part``
beside its destination and continued from there with an HTTP range request (huggingface_hub's own downloader
deletes its partial file on failure, so it is used only for the folder pieces below).

Each hub download has a deadline (``--deadline``, default 3600 s): one file, or for the folder pieces (``clip``,
``eval_images``, ``model``) one folder. The per-read timeout of huggingface_hub alone does not bound a transfer:
a server that sends a byte every few seconds never trips it. Past the deadline the command stops with a one-line
error; what arrived is kept (for a single file, in 10 MiB chunks), and running the same command again resumes.

The endpoint is whatever ``huggingface_hub`` uses, i.e. the ``HF_ENDPOINT``
environment variable when set (e.g. ``HF_ENDPOINT=https://hf-mirror.com``).

Usage::

    python scripts/download.py [--what model clip eval_images dataset llm tokenizer bench | all] [--dim 512|768]
                               [--revision SHA] [--root .] [--deadline SECONDS] [--generation v1|3v]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Callable

import huggingface_hub
from huggingface_hub import snapshot_download

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from evaluation.benchmark_specs import BENCHMARKS, BENCH_DIR, MANIFEST_NAME  # noqa: E402  (no torch import)
# the deadline and the resumable single-file download (hf_hub_download is looked up here, so tests can replace it)
from scripts.hub_transfer import (DownloadDeadlineError, DownloadError, hf_hub_download,  # noqa: E402,F401
                                  within_deadline)

DEFAULT_ENDPOINT = "https://huggingface.co"
MIRROR_HINT = "HF_ENDPOINT=https://hf-mirror.com"

CLIP_REPO = "openai/clip-vit-base-patch32"
CLIP_DIR = "model/clip_model/clip-vit-base-patch32"

DATASET_REPO = "jingyaogong/minimind-v_dataset"
DATASET_DIR = "dataset"
# The v1 snapshot of the dataset repo (October 2024); later commits removed these files from main.
DATASET_REVISION = "dbe331826f7dd6bf9e66d33cb7f4b15fbcb88afe"
# The exact files of that snapshot the v1 scripts read (paths inside the repo = paths under dataset/).
DATASET_FILES = (
    "LLaVA-Pretrain/chat-translated.json",
    "LLaVA-Instruct/llava_instruct_230k.json",
    "pretrain_images.zip",  # 2.61 GB
    "sft_images.zip",  # 376 MB
)
EVAL_IMAGES_FOLDER = "eval_images"  # -> dataset/eval_images/

MODEL_REPOS = {512: "jingyaogong/minimind-v-v1-small", 768: "jingyaogong/minimind-v-v1"}

LLM_DIMS = (512, 768)

TOKENIZER_REPO = "jingyaogong/minimind-v-v1-small"
TOKENIZER_DIR = "model/minimind_tokenizer_official"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# The longest one hub download (a file, or a folder piece) may take: 2.6 GB at under 1 MB/s is stalled.
DEFAULT_DEADLINE_S = 3600.0

PIECES = ("model", "clip", "eval_images", "dataset", "llm", "tokenizer", "bench")
ALL_PIECES = ("clip", "dataset", "llm", "tokenizer")  # `--what all`: what training needs


# minimind-3v: piece -> (repo, repo type, files or folder patterns, destination under --root; "" keeps hub paths)
V3_SOURCES = {
    "model": ("jingyaogong/minimind-3v", "model", None, "minimind-3v"),
    "clip": ("jingyaogong/siglip2-base-p32-256-ve", "model", ["*.json", "*.safetensors"],
             "model/siglip2-base-p32-256-ve"),
    "eval_images": (DATASET_REPO, "dataset", [f"{EVAL_IMAGES_FOLDER}/*"], DATASET_DIR),
    "llm": ("jingyaogong/minimind-3v-pytorch", "model", ("llm_768.pth",), "out"),
    "tokenizer": ("jingyaogong/minimind-3v", "model", TOKENIZER_FILES, "model/minimind_3v_tokenizer_official"),
    "dataset": (DATASET_REPO, "dataset", ("pretrain_i2t.parquet", "sft_i2t.parquet"), DATASET_DIR),
}


def download_v3(piece: str, root: Path, deadline_s: float = DEFAULT_DEADLINE_S) -> Path:
    """One minimind-3v piece (V3_SOURCES) with the same progress, deadline and resume as v1's: a tuple of files
    one by one (hf_hub_download, resumable), a folder (snapshot_download, one deadline) without Python files."""
    repo, repo_type, files, dest = V3_SOURCES[piece]
    target = root / dest
    if isinstance(files, tuple):
        for filename in files:
            _call_hub(f"{repo}/{filename} ({repo_type})", hf_hub_download, deadline_s=deadline_s, repo_id=repo,
                      repo_type=repo_type, filename=filename, local_dir=str(target))
        return target
    _call_hub(f"{repo} ({repo_type})", snapshot_download, deadline_s=deadline_s, repo_id=repo,
              repo_type=repo_type, local_dir=str(target), allow_patterns=files,
              ignore_patterns=["*.py", ".gitattributes"])
    return target / EVAL_IMAGES_FOLDER if piece == "eval_images" else target


def hub_endpoint() -> str:
    """The endpoint huggingface_hub talks to (``HF_ENDPOINT`` if set)."""
    # huggingface_hub reads HF_ENDPOINT once at import; the environment is
    # checked first so a value set later in this process is still reported
    # (and passed on explicitly, see _call_hub).
    env = os.environ.get("HF_ENDPOINT", "").strip()
    if env:
        return env.rstrip("/")
    return str(getattr(huggingface_hub.constants, "ENDPOINT", DEFAULT_ENDPOINT)).rstrip("/")


def _call_hub(description: str, fn: Callable, deadline_s: float = DEFAULT_DEADLINE_S, **kwargs) -> str:
    """Run one hub call within its deadline, turning any failure into a one-line DownloadError."""
    endpoint = hub_endpoint()
    try:
        return within_deadline(description, deadline_s, lambda: fn(endpoint=endpoint, **kwargs))
    except DownloadError:
        raise
    except Exception as err:  # noqa: BLE001 - network/auth/HTTP errors come in many types
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        hint = f"check your connection, or try a mirror: {MIRROR_HINT} python scripts/download.py ..."
        if endpoint != DEFAULT_ENDPOINT:
            hint = f"check your connection and that {endpoint} serves this repo"
        raise DownloadError(
            f"download failed: {description} from {endpoint}: {type(err).__name__}: {first_line} -- {hint}"
        ) from err


def download_clip(root: Path, deadline_s: float = DEFAULT_DEADLINE_S) -> Path:
    """Download CLIP ViT-B/32 (weights, configs, tokenizer files) to ``root/CLIP_DIR``."""
    target = root / CLIP_DIR
    _call_hub(
        f"{CLIP_REPO} (model)",
        snapshot_download,
        deadline_s=deadline_s,
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
            deadline_s=deadline_s,
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


def download_eval_images(root: Path, revision: str = DATASET_REVISION,
                         deadline_s: float = DEFAULT_DEADLINE_S) -> Path:
    """Download the v1 eval_images/ folder of the dataset repo to ``root/dataset/eval_images``."""
    target = root / DATASET_DIR
    _call_hub(
        f"{DATASET_REPO}/{EVAL_IMAGES_FOLDER}/ (dataset, revision {revision[:12]})",
        snapshot_download,
        deadline_s=deadline_s,
        repo_id=DATASET_REPO,
        repo_type="dataset",
        revision=revision,
        local_dir=str(target),
        allow_patterns=[f"{EVAL_IMAGES_FOLDER}/*"],
    )
    return target / EVAL_IMAGES_FOLDER


def download_dataset(root: Path, delete_zips: bool = False, revision: str = DATASET_REVISION,
                     deadline_s: float = DEFAULT_DEADLINE_S) -> list[Path]:
    """Download the v1 JSON files, image zips and eval images; unzip the image zips."""
    target = root / DATASET_DIR
    for filename in DATASET_FILES:
        _call_hub(
            f"{DATASET_REPO}/{filename} (dataset, revision {revision[:12]})",
            hf_hub_download,
            deadline_s=deadline_s,
            repo_id=DATASET_REPO,
            repo_type="dataset",
            revision=revision,
            filename=filename,
            local_dir=str(target),
        )
    download_eval_images(root, revision, deadline_s)
    extracted = []
    for filename in DATASET_FILES:
        if not filename.endswith(".zip"):
            continue
        zip_path = target / filename
        folder = extract_zip(zip_path, target)
        print(f"  unzipped {zip_path.name} -> {folder}")
        extracted.append(folder)
        if delete_zips:
            zip_path.unlink()
    return extracted


def download_llm(root: Path, dim: int = 512, revision: str = DATASET_REVISION,
                 deadline_s: float = DEFAULT_DEADLINE_S) -> Path:
    """Download ``out/{dim}_llm.pth`` (MiniMind LLM weights) to ``root/out/``."""
    if dim not in LLM_DIMS:
        raise DownloadError(f"--dim must be one of {LLM_DIMS}, got {dim}")
    filename = f"out/{dim}_llm.pth"
    path = _call_hub(
        f"{DATASET_REPO}/{filename} (dataset)",
        hf_hub_download,
        deadline_s=deadline_s,
        repo_id=DATASET_REPO,
        repo_type="dataset",
        revision=revision,
        filename=filename,
        local_dir=str(root),  # the "out/" prefix of filename is kept under local_dir
    )
    return Path(path)


def download_tokenizer(root: Path, deadline_s: float = DEFAULT_DEADLINE_S) -> Path:
    """Download the official MiniMind tokenizer files to ``root/TOKENIZER_DIR``."""
    target = root / TOKENIZER_DIR
    for filename in TOKENIZER_FILES:
        _call_hub(
            f"{TOKENIZER_REPO}/{filename} (model)",
            hf_hub_download,
            deadline_s=deadline_s,
            repo_id=TOKENIZER_REPO,
            repo_type="model",
            filename=filename,
            local_dir=str(target),
        )
    return target


def download_model(root: Path, dim: int = 512, deadline_s: float = DEFAULT_DEADLINE_S) -> Path:
    """Download the published MiniMind-V v1 model directory into ``root/<repo name>`` (as a `git clone` would),
    without its Python files: this project reads config.json and the weights, and never runs downloaded code."""
    if dim not in MODEL_REPOS:
        raise DownloadError(f"--dim must be one of {tuple(MODEL_REPOS)}, got {dim}")
    repo = MODEL_REPOS[dim]
    target = root / repo.split("/")[1]
    _call_hub(
        f"{repo} (model)",
        snapshot_download,
        deadline_s=deadline_s,
        repo_id=repo,
        repo_type="model",
        local_dir=str(target),
        ignore_patterns=["*.py", ".gitattributes"],
    )
    return target


def download_bench(root: Path, deadline_s: float = DEFAULT_DEADLINE_S) -> Path:
    """Download the POPE and MMStar parquet files at their pinned commits into ``root/dataset/bench/<name>/`` (the
    Hub paths kept), and write bench_source.json beside them: the evaluation records the revision from it."""
    for spec in BENCHMARKS.values():
        target = root / spec.default_path
        for filename in spec.files:
            _call_hub(
                f"{spec.repo}/{filename} (dataset, revision {spec.revision[:12]})",
                hf_hub_download,
                deadline_s=deadline_s,
                repo_id=spec.repo,
                repo_type="dataset",
                revision=spec.revision,
                filename=filename,
                local_dir=str(target),
            )
        manifest = {"benchmark": spec.name, "repo": spec.repo, "revision": spec.revision, "files": list(spec.files)}
        (target / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        print(f"  {spec.name}: {target}")
    return root / BENCH_DIR


def main(argv: list[str] | None = None) -> None:
    """CLI entry point; exits with a one-line message if a download fails."""
    parser = argparse.ArgumentParser(description="Download MiniMind-V assets from the Hugging Face hub.")
    parser.add_argument("--what", nargs="+", default=["all"], choices=PIECES + ("all",), help="what to fetch")
    parser.add_argument("--dim", type=int, default=512, choices=LLM_DIMS,
                        help="model width for --what llm and --what model (512: minimind-v-v1-small, 768: minimind-v-v1)")
    parser.add_argument("--revision", default=DATASET_REVISION,
                        help="dataset repo revision (default: the v1 snapshot, whose files the v1 scripts read); "
                             "--what bench always fetches the benchmarks' pinned commits")
    parser.add_argument("--root", default=".", help="repository root to download into")
    parser.add_argument("--delete_zips", action="store_true", help="delete image zips after extracting them")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S, metavar="SECONDS",
                        help="the longest one hub download may take: a file, or a whole folder for clip, eval_images "
                             "and model (default %(default)g s); past it the command stops, keeping what arrived "
                             "for the next run to resume")
    parser.add_argument("--generation", default="v1", choices=["v1", "3v"],
                        help="v1's files (default) or minimind-3v's published files (see V3_SOURCES)")
    args = parser.parse_args(argv)
    if not 0 < args.deadline < float("inf"):
        parser.error(f"--deadline must be a positive, finite number of seconds, got {args.deadline:g}")
    deadline = args.deadline

    root = Path(args.root)
    pieces = ALL_PIECES if "all" in args.what else tuple(p for p in PIECES if p in args.what)
    if "dataset" in pieces and "eval_images" in pieces:
        pieces = tuple(p for p in pieces if p != "eval_images")  # the dataset includes them
    print(f"hub endpoint: {hub_endpoint()} (set HF_ENDPOINT to change it, e.g. {MIRROR_HINT})")
    try:
        for piece in pieces:
            print(f"[{piece}] downloading ...")
            if args.generation == "3v" and piece in V3_SOURCES:
                result = download_v3(piece, root, deadline)
            elif piece == "model":
                result = download_model(root, args.dim, deadline)
            elif piece == "clip":
                result = download_clip(root, deadline)
            elif piece == "eval_images":
                result = download_eval_images(root, args.revision, deadline)
            elif piece == "dataset":
                result = download_dataset(root, args.delete_zips, args.revision, deadline)
            elif piece == "llm":
                result = download_llm(root, args.dim, args.revision, deadline)
            elif piece == "bench":
                result = download_bench(root, deadline)
            else:
                result = download_tokenizer(root, deadline)
            print(f"[{piece}] done: {result}")
    except DownloadDeadlineError as err:
        # The download's thread is still blocked on the network and cannot be stopped; a normal exit would wait
        # for huggingface_hub's worker threads, so the process ends here (the partial file stays for a resume).
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    except DownloadError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
