"""Checkpoints in one place: read (strict, weights_only), infer the config from shapes, write atomically.

The weight files keep the v1 layout (a flat state dict with v1 key names) so v1 code can load them;
the full config is written beside them as `<name>.config.json` (head counts cannot be read off shapes).
"""
from __future__ import annotations

import glob
import json
import math
import os
import pickle
import re
import stat
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .config import LMConfig
from .tokenizer import (DEFAULT_TOKENIZER_PATH, TokenizerError, check_tokenizer, resolve_tokenizer_path,
                        tokenizer_fingerprint, tokenizer_record)

PathLike = Union[str, os.PathLike]
PROJ_PREFIX = "vision_proj."
PROJ_BIAS = "vision_proj.vision_proj.0.bias"
PREFIXES = ("_orig_mod.", "module.")
TOKENIZER_FIELD = "tokenizer"  # the sidecar's record of the tokenizer a checkpoint was trained with
# Weight files of a Hugging Face model directory, in the order they are looked for.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (e.g. the disk is full); the file under the final name is left as it was."""


@dataclass
class LoadReport:
    new_keys: list[str] = field(default_factory=list)  # keys the file lacked that the model initialised itself


def config_path_for(path: PathLike) -> Path:
    return Path(path).with_suffix(".config.json")


def _first_line(e: BaseException) -> str:
    """The first line of an error message, cut at its first sentence (torch's messages run on)."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line.split(". ")[0][:160]


def _unpickling_reason(e: BaseException) -> str:
    """The informative line of torch's weights-only refusal (not its boilerplate, which suggests weights_only=False)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    useful = [line for line in lines if not line.startswith(boilerplate)]
    return (useful or lines or [type(e).__name__])[0][:160]


def _refusal(path: str, e: BaseException, what: str) -> CheckpointError:
    reason = _unpickling_reason(e)
    if "GLOBAL" in reason or "global" in reason:
        return CheckpointError(f"{path}: refused to load: it holds objects other than {what} and could run code "
                               f"({reason})")
    return CheckpointError(f"{path}: refused to load: not a weights-only PyTorch file (corrupt, or pickle data "
                           f"other than {what}: {reason})")


def _torch_load(path: str) -> Any:
    with warnings.catch_warnings():  # junk read as a legacy pickle warns about its "protocol" on stderr
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True)


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
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({_first_line(e)})") from None
    else:
        try:
            sd = _torch_load(path)
        except pickle.UnpicklingError as e:
            raise _refusal(path, e, "plain tensors") from None
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_first_line(e)})") from None
        except Exception as e:  # junk bytes can trip the unpickler in any way (IndexError, TypeError, ...)
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: "
                                  f"{_first_line(e)})") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # a resume checkpoint
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    check_tensors(sd, path)
    return strip_prefixes(sd)


def refuse_special_file(path: str) -> None:
    """A checkpoint is a non-empty regular file: name a directory, FIFO or device for what it is."""
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file (give the .pth or .safetensors file)")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else \
            "a character device" if stat.S_ISCHR(st.st_mode) else "not a regular file"
        raise CheckpointError(f"{path}: not a regular file ({kind})")
    if st.st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes)")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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


def has_projection_bias(sd: dict[str, torch.Tensor]) -> bool:
    """A bias that is all zeros is how unbiased projections are written in the v1 layout."""
    bias = sd.get(PROJ_BIAS)
    return bias is not None and bool(bias.abs().max() > 0)


def infer_config(sd: dict[str, torch.Tensor], stored: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Model config fields read off tensor shapes; `stored` (the sidecar config) supplies head counts."""
    stored = dict(stored or {})
    stored.pop(TOKENIZER_FIELD, None)  # not a model field
    if "tok_embeddings.weight" not in sd:
        raise CheckpointError("not a MiniMind checkpoint: no tok_embeddings.weight")
    if sd["tok_embeddings.weight"].dim() != 2:
        raise CheckpointError(f"tok_embeddings.weight has {sd['tok_embeddings.weight'].dim()} dimensions "
                              f"(shape {tuple(sd['tok_embeddings.weight'].shape)}), not 2 (vocab_size x dim)")
    vocab_size, dim = sd["tok_embeddings.weight"].shape
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))}
    n_layers = max(layer_ids) + 1 if layer_ids else 0
    if len(layer_ids) != n_layers:  # ids are >= 0 with max n_layers - 1: equal counts means 0..n-1, no gap
        first_gap = next(i for i in range(n_layers) if i not in layer_ids)
        raise CheckpointError(f"layer indices are not contiguous: {len(layer_ids)} layers up to index "
                              f"{n_layers - 1}, layer {first_gap} is missing")
    check_config_fields(stored, what="stored config")
    n_heads = stored.get("n_heads", 16 if dim % 16 == 0 else 8)
    if not dim or dim % n_heads:
        raise CheckpointError(f"dim {dim} (from tok_embeddings.weight) is not a multiple of n_heads {n_heads}")
    experts = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.0\.feed_forward\.experts\.(\d+)\.", k))}
    use_moe = bool(experts)
    w1 = sd.get("layers.0.feed_forward.experts.0.w1.weight" if use_moe else "layers.0.feed_forward.w1.weight")
    head_dim = dim // n_heads
    wk = sd.get("layers.0.attention.wk.weight")
    n_kv_heads = wk.shape[0] // head_dim if wk is not None else stored.get("n_kv_heads", 8)
    cfg = {**stored, "dim": int(dim), "vocab_size": int(vocab_size), "n_layers": n_layers,
           "n_heads": n_heads, "n_kv_heads": int(n_kv_heads), "use_moe": use_moe,
           "vision_proj_bias": has_projection_bias(sd)}
    if w1 is not None:
        probe = LMConfig(dim=int(dim), multiple_of=stored.get("multiple_of", 64))
        cfg["hidden_dim"] = None if w1.shape[0] == probe.ffn_hidden_dim else int(w1.shape[0])
    if use_moe:
        cfg["n_routed_experts"] = len(experts)
    proj = sd.get("vision_proj.vision_proj.0.weight")
    if proj is not None:
        cfg["vision_dim"] = int(proj.shape[1])
    check_config_fields(cfg)
    return cfg


# Sane bounds for every size-like config field (type, lowest, highest): values outside them come from a damaged
# or forged file and would otherwise reach the constructor (a max_seq_len of 10^9 allocates its RoPE table).
CONFIG_BOUNDS: dict[str, tuple[type, float, float]] = {
    "dim": (int, 1, 16384), "n_layers": (int, 1, 256), "n_heads": (int, 1, 1024), "n_kv_heads": (int, 1, 1024),
    "vocab_size": (int, 1, 1_048_576), "hidden_dim": (int, 1, 262_144), "multiple_of": (int, 1, 16384),
    "max_seq_len": (int, 1, 131_072), "vision_dim": (int, 1, 16384), "n_routed_experts": (int, 1, 256),
    "num_experts_per_tok": (int, 1, 256), "norm_eps": (float, 1e-12, 1.0), "dropout": (float, 0.0, 0.99),
    "rope_theta": (float, 1.0, 1e9), "aux_loss_alpha": (float, 0.0, 1e3),
}
BOOL_FIELDS = ("use_moe", "vision_proj_bias", "flash_attn", "seq_aux", "norm_topk_prob")


def check_config_fields(fields: dict[str, Any], what: str = "config") -> None:
    """Raise CheckpointError (one line, naming the field) for a config value of the wrong type or out of bounds,
    or head/expert counts that do not divide; fields that are absent or None (hidden_dim) are skipped."""
    for name, (kind, low, high) in CONFIG_BOUNDS.items():
        value = fields.get(name)
        if value is None:
            continue
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool) and \
            (kind is float or float(value).is_integer())
        if not ok_type or not math.isfinite(value) or not low <= value <= high:
            want = "an integer" if kind is int else "a number"
            raise CheckpointError(f"{what}: {name} = {_brief(value)} is out of range ({want} in [{low:g}, {high:g}])")
    for name in BOOL_FIELDS:
        if name in fields and fields[name] is not None and not isinstance(fields[name], bool):
            raise CheckpointError(f"{what}: {name} = {_brief(fields[name])} is not true/false")
    heads, kv = fields.get("n_heads"), fields.get("n_kv_heads")
    if heads is not None and kv is not None and heads % kv:
        raise CheckpointError(f"{what}: n_heads {heads} is not a multiple of n_kv_heads {kv}")
    if fields.get("use_moe") and fields.get("num_experts_per_tok", 2) > fields.get("n_routed_experts", 4):
        raise CheckpointError(f"{what}: num_experts_per_tok {fields.get('num_experts_per_tok')} is more than "
                              f"n_routed_experts {fields.get('n_routed_experts')}")


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _shorten(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_weights(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "checkpoint",
                 allow_new_projection: bool = False) -> LoadReport:
    """Strictly load sd into model. The one allowed gap is the projection (an LLM-only checkpoint
    starting a VLM) when allow_new_projection is set; it is reported in LoadReport.new_keys."""
    sd, new_keys = fit_check(model, sd, source, allow_new_projection)
    model.load_state_dict(sd, strict=False)  # every key checked above; only new_keys stay initialised
    return LoadReport(new_keys=new_keys)


def fit_check(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "checkpoint",
              allow_new_projection: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(sd ready to load, keys the model must initialise itself), or CheckpointError naming every mismatch.
    Works on a model built on the meta device, so a file can be checked before any memory is allocated."""
    sd = strip_prefixes(sd)
    expected = model.state_dict()
    if PROJ_BIAS in sd and PROJ_BIAS not in expected and not has_projection_bias(sd):
        sd = {k: v for k, v in sd.items() if k != PROJ_BIAS}  # zero bias == no bias
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    new_keys = [k for k in missing if k.startswith(PROJ_PREFIX)] if allow_new_projection else []
    missing = [k for k in missing if k not in new_keys]
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(sd) & set(expected)) if sd[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_shorten(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_shorten(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_shorten(mismatched, 4)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model ({'; '.join(problems)})")
    return sd, new_keys


def read_stored_config(path: PathLike) -> dict[str, Any]:
    cfg_file = config_path_for(path)
    if not cfg_file.exists():
        return {}
    try:
        stored = json.loads(cfg_file.read_text())
    except RecursionError:
        raise CheckpointError(f"{cfg_file}: unreadable config beside the checkpoint (JSON nested too deeply); "
                              f"delete it to infer the config from the weights") from None
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{cfg_file}: unreadable config beside the checkpoint ({_first_line(e)}); "
                              f"delete it to infer the config from the weights") from None
    if not isinstance(stored, dict):
        raise CheckpointError(f"{cfg_file}: the config beside the checkpoint is not a JSON object")
    return stored


@dataclass
class Checkpoint:
    """What a checkpoint path holds: the weights, the stored config fields and where its tokenizer is recorded."""

    path: str
    state_dict: dict[str, torch.Tensor]
    stored: dict[str, Any]  # config fields (sidecar or config.json); may be empty
    tokenizer_record: Optional[dict[str, str]] = None  # {"path", "fingerprint"}; None for a published v1 file
    tokenizer_dir: Optional[str] = None  # the tokenizer shipped inside a Hugging Face model directory


def read_checkpoint(path: PathLike) -> Checkpoint:
    """Read a .pth / .safetensors checkpoint (with its sidecar) or a Hugging Face model directory.

    The weights and config are checked for structure here, so a broken file is reported as such before any
    question about its tokenizer."""
    path = str(path)
    if os.path.isdir(path):
        ckpt = read_model_dir(path)
    else:
        sd = read_state_dict(path)
        stored = read_stored_config(path)
        check_config_fields(stored, what=str(config_path_for(path)))
        record = stored.pop(TOKENIZER_FIELD, None)
        if record is not None and not (isinstance(record, dict) and isinstance(record.get("fingerprint"), str)):
            raise CheckpointError(f"{config_path_for(path)}: the tokenizer record is not {{'path', 'fingerprint'}}")
        ckpt = Checkpoint(path, sd, stored, record)
    config_from_checkpoint(ckpt)  # structure: embedding, contiguous layers, head counts, bounds
    return ckpt


def read_model_dir(path: str) -> Checkpoint:
    """A Hugging Face model directory (v1's export or this project's): config.json fields, weights, tokenizer.

    Only JSON and weight files are read: the directory's Python files (config.json's auto_map) are never
    imported, and pickled weights load with weights_only."""
    root = Path(path)
    cfg_file = root / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file nor a model directory (no config.json)")
    raw = read_json_object(cfg_file)
    if raw.get("model_type", "minimind") != "minimind":
        raise CheckpointError(f"{path}: model_type is {raw.get('model_type')!r}, not 'minimind'")
    sd = untie_head(read_hf_weights(root), path)
    fields = config_fields(raw)
    check_config_fields(fields, what=str(cfg_file))
    tokenizer_dir = path if (root / "tokenizer.json").exists() else None
    # The directory's own tokenizer is the one its weights go with.
    record = {"path": path, "fingerprint": tokenizer_fingerprint(path)} if tokenizer_dir else None
    return Checkpoint(path, sd, fields, record, tokenizer_dir)


def is_model_dir(path: PathLike) -> bool:
    """A directory holding a config.json and weights in a Hugging Face layout."""
    root = Path(path)
    return root.is_dir() and (root / "config.json").exists() and any(
        (root / name).exists() for name in HF_WEIGHT_FILES + HF_INDEX_FILES)


def find_model_dirs(folder: PathLike) -> list[Path]:
    """The MiniMind model directories directly inside `folder` (config.json with model_type minimind + weights)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith(".") or not is_model_dir(child):
            continue
        try:
            model_type = json.loads((child / "config.json").read_text()).get("model_type")
        except (ValueError, OSError, AttributeError, RecursionError):  # not a model directory we can list
            continue
        if model_type == "minimind":
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
    """The most recently written SFT checkpoint (out_dir/*_vlm_sft.pth) or model directory (in out_dir or root)."""
    out_dir = Path(out_dir)
    candidates = sorted(out_dir.glob("*_vlm_sft.pth")) if out_dir.is_dir() else []
    candidates += find_model_dirs(out_dir) + find_model_dirs(root)
    if not candidates:
        return None
    return max(candidates, key=lambda p: weights_file(p).stat().st_mtime)


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


def config_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The LMConfig fields of a config.json; transformers bookkeeping (auto_map, dtype, ...) and unknown keys
    are dropped."""
    import inspect

    known = set(inspect.signature(LMConfig.__init__).parameters) - {"self", "kwargs"}
    return {k: v for k, v in raw.items() if k in known}


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


def checkpoint_tokenizer(ckpt: Checkpoint, explicit: Optional[str] = None) -> tuple[str, str]:
    """(path, fingerprint) of the tokenizer for `ckpt` by the one resolution rule, checked against its record.

    Raises model.tokenizer.TokenizerError (one line) when none is found or the vocabularies differ."""
    path = resolve_tokenizer_path(explicit, ckpt.tokenizer_dir, ckpt.tokenizer_record, ckpt.path)
    return path, check_tokenizer(path, ckpt.tokenizer_record, ckpt.path)


def training_tokenizer(explicit: Optional[str], init: Optional[Checkpoint]) -> dict[str, str]:
    """The record ({"path", "fingerprint"}) of the tokenizer a training run uses, checked before any step.

    From scratch: `explicit` or the project's tokenizer. From a checkpoint (a chained stage, --init, or the
    published *_llm.pth): its own tokenizer by the resolution rule, which must match its record."""
    if init is None:
        return tokenizer_record(explicit or DEFAULT_TOKENIZER_PATH)
    path, fingerprint = checkpoint_tokenizer(init, explicit)
    return {"path": path, "fingerprint": fingerprint}


def check_resume_tokenizer(saved: Optional[dict], record: dict[str, str], resume_path: PathLike) -> None:
    """A resumed run must use the vocabulary its resume checkpoint was trained with (older files record none)."""
    if saved and saved.get("fingerprint") != record["fingerprint"]:
        raise TokenizerError(f"tokenizer mismatch: {resume_path} was trained with the tokenizer at "
                             f"'{saved.get('path')}' (vocabulary {str(saved.get('fingerprint'))[:12]}), but this run "
                             f"uses '{record['path']}' (vocabulary {record['fingerprint'][:12]}); pass --tokenizer_path "
                             f"{saved.get('path')}")


def config_from_checkpoint(path: Union[PathLike, Checkpoint], **overrides: Any) -> tuple[LMConfig,
                                                                                          dict[str, torch.Tensor]]:
    ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    try:
        fields = infer_config(ckpt.state_dict, ckpt.stored)
    except CheckpointError as e:
        raise CheckpointError(str(e) if ckpt.path in str(e) else f"{ckpt.path}: {e}") from None
    fields.update({k: v for k, v in overrides.items() if v is not None})
    check_config_fields(fields, what=f"{ckpt.path} (with the given options)")
    return LMConfig(**fields), ckpt.state_dict


def load_model(path: Union[PathLike, Checkpoint], image_ids: Optional[list[int]] = None,
               device: Union[str, torch.device] = "cpu", **overrides: Any):
    """Build a MiniMindVLM whose config comes from the checkpoint itself and load it strictly.

    `path` is a .pth/.safetensors file, a Hugging Face model directory, or an already read Checkpoint."""
    from .vlm import MiniMindVLM

    config, sd = config_from_checkpoint(path, **overrides)
    source = path.path if isinstance(path, Checkpoint) else str(path)
    if image_ids is not None:
        config.image_ids = list(image_ids)
    with torch.device("meta"):  # check every key and shape against a model that allocates nothing
        fit_check(MiniMindVLM(config), sd, source=source)
    model = MiniMindVLM(config)
    load_weights(model, sd, source=source)
    return model.to(device).eval()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def v1_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict in the v1 layout: every v1 key present (an unbiased projection gets a zero bias)."""
    model = unwrap(model)
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    weight = sd.get("vision_proj.vision_proj.0.weight")
    if weight is not None and PROJ_BIAS not in sd:
        sd[PROJ_BIAS] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return sd


def atomic_write(path: PathLike, write_fn) -> None:
    """Write through a temp file in the same folder, fsync, then rename: a crash leaves the old file intact."""
    path = Path(path)
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
        if isinstance(e, OSError) and not isinstance(e, CheckpointWriteError):  # e.g. ENOSPC: disk full
            kept = "the previous file is unchanged" if path.exists() else "nothing was written"
            error = CheckpointWriteError(f"{path}: could not write ({e.strerror or e}); {kept}")
            error.errno = e.errno
            raise error from e
        raise


def read_json_object(path: PathLike) -> dict[str, Any]:
    """A JSON file holding an object, or CheckpointError with one line naming the file (malformed, nested too
    deeply, integers past Python's int-string limit, not an object, not UTF-8)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply to read") from None
    except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError and the int-string limit included
        raise CheckpointError(f"{path}: unreadable JSON ({_first_line(e)})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return value


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


def save_checkpoint(model: nn.Module, path: PathLike, tokenizer: Optional[dict[str, str]] = None) -> None:
    """Write the v1-layout weights and the config sidecar, both atomically.

    `tokenizer` is the record of the tokenizer the weights go with (model.tokenizer.tokenizer_record)."""
    config = unwrap(model).config
    atomic_write(path, lambda f: torch.save(v1_state_dict(model), f))
    fields = config.to_diff_dict() | {"n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads,
                                      "dim": config.dim, "n_layers": config.n_layers}
    if tokenizer is not None:
        fields[TOKENIZER_FIELD] = dict(tokenizer)
    text = json.dumps(fields, indent=2, ensure_ascii=False)
    atomic_write(config_path_for(path), lambda f: f.write(text.encode()))


def save_object(obj: Any, path: PathLike) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def load_object(path: PathLike) -> Any:
    """Load a resume checkpoint (plain tensors and containers only)."""
    try:
        return _torch_load(str(path))
    except pickle.UnpicklingError as e:
        raise _refusal(str(path), e, "plain data") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, KeyError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated file ({_first_line(e)})") from None
    except Exception as e:  # junk bytes can trip the unpickler in any way
        raise CheckpointError(f"{path}: corrupt or truncated file ({type(e).__name__}: {_first_line(e)})") from None
