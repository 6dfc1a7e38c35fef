"""Reading weights, strictly: a .pth (weights_only) or .safetensors file, or the weight files of a Hugging Face
model directory (single-file or sharded). Every failure is a one-line CheckpointError naming the file.
"""
from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from .files import CheckpointError, PathLike, first_line, read_json_object, regular_file_problem

PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers
# Weight files of a Hugging Face model directory, in the order they are looked for.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _unpickling_reason(e: BaseException) -> str:
    """The informative line of torch's weights-only refusal (not its boilerplate, which suggests weights_only=False)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    useful = [line for line in lines if not line.startswith(boilerplate)]
    return (useful or lines or [type(e).__name__])[0][:160]


def load_weights_only(path: str, contents: str, noun: str) -> Any:
    """torch.load(path, weights_only=True) on the CPU, or a one-line CheckpointError: `contents` says what the
    file may hold ("plain tensors"), `noun` what it is called in the corrupt-file message ("checkpoint")."""
    try:
        with warnings.catch_warnings():  # junk read as a legacy pickle warns about its "protocol" on stderr
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickling_reason(e)
        if "GLOBAL" in reason or "global" in reason:
            raise CheckpointError(f"{path}: refused to load: it holds objects other than {contents} and could run "
                                  f"code ({reason})") from None
        raise CheckpointError(f"{path}: refused to load: not a weights-only PyTorch file (corrupt, or pickle data "
                              f"other than {contents}: {reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated {noun} ({first_line(e)})") from None
    except Exception as e:  # junk bytes can trip the unpickler in any way (IndexError, TypeError, ...)
        raise CheckpointError(f"{path}: corrupt or truncated {noun} ({type(e).__name__}: "
                              f"{first_line(e)})") from None


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a .pth (weights_only) or .safetensors file into a flat state dict with clean key names."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    refuse_special_file(path)
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({first_line(e)})") from None
    else:
        sd = load_weights_only(path, "plain tensors", "checkpoint")
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # a resume checkpoint
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    check_tensors(sd, path)
    return strip_prefixes(sd)


def refuse_special_file(path: str) -> None:
    """A checkpoint is a non-empty regular file: name a directory, FIFO or device for what it is."""
    problem = regular_file_problem(path, "a checkpoint file (give the .pth or .safetensors file)")
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")


def check_tensors(sd: dict[str, torch.Tensor], path: str) -> None:
    """Refuse tensors that are not plain float weights before anything is sized from them.

    A stride-0 (expanded) or otherwise non-contiguous view can describe gigabytes with a few stored bytes, and a
    model built from its shape would allocate them all; a storage smaller than the shape needs is a forged file;
    integer, bool or complex weights are not MiniMind weights; NaN/inf weights would only fail at generation."""
    for key, t in sd.items():
        if t.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: {key}: dtype {str(t.dtype).replace('torch.', '')} is not a float type "
                                  f"(weights are float32, float16, bfloat16 or float64)")
        if t.numel() == 0:
            continue
        if not t.is_contiguous() or any(st == 0 for st, n in zip(t.stride(), t.shape) if n > 1):
            raise CheckpointError(f"{path}: {key}: stored as a non-contiguous or expanded view (shape "
                                  f"{tuple(t.shape)}, stride {tuple(t.stride())}); refused")
        needed = (t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()
        if t.untyped_storage().nbytes() < needed:
            raise CheckpointError(f"{path}: {key}: shape {tuple(t.shape)} needs {needed} bytes but only "
                                  f"{t.untyped_storage().nbytes()} are stored")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path}: {key}: {bad} non-finite value(s) (NaN or inf) in the weights")


def strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the `_orig_mod.` (torch.compile) and `module.` (DDP) wrappers from key names."""
    out = {}
    for key, value in sd.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
            key = key.replace("._orig_mod.", ".")
        out[key] = value
    return out


def is_model_dir(path: PathLike) -> bool:
    """A directory holding a config.json and weights in a Hugging Face layout."""
    root = Path(path)
    return root.is_dir() and (root / "config.json").exists() and any(
        (root / name).exists() for name in HF_WEIGHT_FILES + HF_INDEX_FILES)


def read_hf_weights(root: Path) -> dict[str, torch.Tensor]:
    """The state dict of a Hugging Face directory: single-file or sharded, safetensors or pytorch_model.bin."""
    for index_name in HF_INDEX_FILES:
        index = root / index_name
        if index.exists():
            sd: dict[str, torch.Tensor] = {}
            for shard in shard_paths(index):  # each inside the directory
                sd.update(read_state_dict(shard))
            return sd
    for name in HF_WEIGHT_FILES:
        if (root / name).exists():
            return read_state_dict(root / name)
    raise CheckpointError(f"{root}: no model.safetensors or pytorch_model.bin (nor a sharded index)")


def shard_paths(index_path: PathLike) -> list[Path]:
    """The shard files a Hugging Face `*.index.json` names, each checked to lie inside the index's directory
    (after resolving `..` and symlinks): an index must not make the loader read files elsewhere."""
    index = read_json_object(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()):
        raise CheckpointError(f"{index_path}: 'weight_map' must be a non-empty object of tensor name -> shard file")
    root = os.path.realpath(Path(index_path).parent)
    shards = []
    for name in sorted(set(weight_map.values())):
        real = os.path.realpath(os.path.join(root, name))
        if os.path.commonpath([root, real]) != root:
            raise CheckpointError(f"{index_path}: shard {name!r} is outside the model directory")
        shards.append(Path(real))
    return shards


def untie_head(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Make the v1 layout's `output.weight` present: it is the embedding matrix (tied)."""
    emb, out = sd.get("tok_embeddings.weight"), sd.get("output.weight")
    if emb is None:
        raise CheckpointError(f"{source}: not a MiniMind model (no tok_embeddings.weight)")
    if out is None:
        return {**sd, "output.weight": emb}
    if out.shape != emb.shape or not torch.equal(out, emb):
        raise CheckpointError(f"{source}: output.weight differs from tok_embeddings.weight, but MiniMind ties them")
    return sd
