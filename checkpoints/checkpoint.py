"""A checkpoint: read one (a .pth / .safetensors file with its config sidecar, or a Hugging Face model
directory), build the model it describes and load it strictly, and write one atomically.

The weight files keep the v1 layout (a flat state dict with v1 key names) so v1 code can load them;
the full config is written beside them as `<name>.config.json` (head counts cannot be read off shapes).
Reading the weight files is weights.py's job, the config read off their shapes config_inference.py's, and
the pairing with a tokenizer tokenizer_pairing.py's.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from model.config import V3_DEFAULTS, LMConfig
from .config_inference import (PROJ_BIAS, PROJ_PREFIX, TOKENIZER_FIELD, VISION_FIELD, check_config_fields,
                               config_fields, has_projection_bias, infer_config)
from .files import CheckpointError, PathLike, atomic_write, read_json_object
from .schema import check, path_and_fingerprint, portable_path
from .tokenizer import tokenizer_fingerprint
from .v3_layout import V3_MODEL_TYPE, native_layout, read_v3_model_dir, to_upstream
from .weights import load_weights_only, read_hf_weights, read_state_dict, strip_prefixes, untie_head


@dataclass
class Checkpoint:
    """What a checkpoint path holds: the weights, the stored config fields and where its tokenizer is recorded."""

    path: str
    state_dict: dict[str, torch.Tensor]
    stored: dict[str, Any]  # config fields (sidecar or config.json); may be empty
    tokenizer_record: Optional[dict[str, str]] = None  # {"path", "fingerprint"}; None for a published v1 file
    tokenizer_dir: Optional[str] = None  # the tokenizer shipped inside a Hugging Face model directory
    vision_record: Optional[dict[str, str]] = None  # {"path", "fingerprint"} of its vision encoder; None: unrecorded


@dataclass
class LoadReport:
    new_keys: list[str] = field(default_factory=list)  # keys the file lacked that the model initialised itself


def config_path_for(path: PathLike) -> Path:
    """The config sidecar of a weight file: `<name>.config.json`."""
    return Path(path).with_suffix(".config.json")


def read_stored_config(path: PathLike) -> dict[str, Any]:
    """The config sidecar of the weight file `path`, or {} when there is none."""
    cfg_file = config_path_for(path)
    if not cfg_file.exists():
        return {}
    return read_json_object(cfg_file, what="config beside the checkpoint",
                            remedy="delete it to infer the config from the weights")


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
        sd, stored = native_layout(sd, stored, path)  # a 3v file: its upstream key names translated
        record = _record(stored, TOKENIZER_FIELD, path)
        ckpt = Checkpoint(path, sd, stored, record, vision_record=_record(stored, VISION_FIELD, path))
    config_from_checkpoint(ckpt)  # structure: embedding, contiguous layers, head counts, bounds
    return ckpt


def _record(stored: dict[str, Any], name: str, path: str) -> Optional[dict[str, str]]:
    """The sidecar's record `name` ({"path", "fingerprint"}, strings of bounded length), taken out of `stored`;
    None when there is none. Anything else is one line naming the sidecar and the field."""
    record = stored.pop(name, None)
    check(record, path_and_fingerprint(), str(config_path_for(path)), name=name)
    return record


def read_model_dir(path: str) -> Checkpoint:
    """A Hugging Face model directory (v1's export or this project's): config.json fields, weights, tokenizer.

    Only JSON and weight files are read: the directory's Python files (config.json's auto_map) are never
    imported, and pickled weights load with weights_only."""
    root = Path(path)
    cfg_file = root / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file nor a model directory (no config.json)")
    raw = read_json_object(cfg_file)
    if raw.get("model_type") == V3_MODEL_TYPE:  # a minimind-3v directory (upstream's conversion)
        sd, fields = read_v3_model_dir(root, raw)
    elif raw.get("model_type", "minimind") != "minimind":
        raise CheckpointError(f"{path}: model_type is {raw.get('model_type')!r}, not 'minimind' (v1) nor "
                              f"{V3_MODEL_TYPE!r} (minimind-3v)")
    else:
        sd, fields = untie_head(read_hf_weights(root), path), config_fields(raw)
    check_config_fields(fields, what=str(cfg_file))
    tokenizer_dir = path if (root / "tokenizer.json").exists() else None
    # The directory's own tokenizer is the one its weights go with.
    record = {"path": path, "fingerprint": tokenizer_fingerprint(path)} if tokenizer_dir else None
    return Checkpoint(path, sd, fields, record, tokenizer_dir)


def config_from_checkpoint(path: Union[PathLike, Checkpoint], **overrides: Any) -> tuple[LMConfig,
                                                                                          dict[str, torch.Tensor]]:
    """The LMConfig a checkpoint describes (read off its shapes and stored config, then `overrides` that are not
    None) and its state dict."""
    ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    try:
        fields = infer_config(ckpt.state_dict, ckpt.stored)
    except CheckpointError as e:
        raise CheckpointError(str(e) if ckpt.path in str(e) else f"{ckpt.path}: {e}") from None
    fields.update({k: v for k, v in overrides.items() if v is not None})
    check_config_fields(fields, what=f"{ckpt.path} (with the given options)")
    return LMConfig(**fields), ckpt.state_dict


def load_model(path: Union[PathLike, Checkpoint], image_ids: Optional[list[int]] = None,
               device: Union[str, torch.device] = "cpu", **overrides: Any) -> nn.Module:
    """Build a MiniMindVLM whose config comes from the checkpoint itself and load it strictly.

    `path` is a .pth/.safetensors file, a Hugging Face model directory, or an already read Checkpoint."""
    from model.vlm import MiniMindVLM

    config, sd = config_from_checkpoint(path, **overrides)
    source = path.path if isinstance(path, Checkpoint) else str(path)
    if image_ids is not None:
        config.image_ids = list(image_ids)
    with torch.device("meta"):  # check every key and shape against a model that allocates nothing
        fit_check(MiniMindVLM(config), sd, source=source)
    model = MiniMindVLM(config)
    load_weights(model, sd, source=source)
    return model.to(device).eval()


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


def _shorten(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


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


def save_checkpoint(model: nn.Module, path: PathLike, tokenizer: Optional[dict[str, str]] = None,
                    vision_encoder: Optional[dict[str, str]] = None, dtype: Optional[torch.dtype] = None) -> None:
    """Write the v1-layout weights and the config sidecar, both atomically; `dtype` casts the floating-point
    weights (3v's trainer writes float16, as upstream's), None keeps theirs.

    `tokenizer` is the record of the tokenizer the weights go with (checkpoints.tokenizer.tokenizer_record), and
    `vision_encoder` that of the encoder their projection was fitted to (checkpoints.vision_pairing.encoder_record)."""
    config = unwrap(model).config
    v3 = getattr(config, "generation", "v1") == "3v"  # 3v: upstream key names, every 3v default spelled out
    sd = to_upstream(v1_state_dict(model)) if v3 else v1_state_dict(model)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    atomic_write(path, lambda f: torch.save(sd, f))
    fields = config.to_diff_dict() | {"n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads,
                                      "dim": config.dim, "n_layers": config.n_layers}
    if v3:
        fields |= {name: getattr(config, name) for name in V3_DEFAULTS} | {"generation": "3v"}
    if tokenizer is not None:  # paths as portable records: project-relative or absolute (schema.portable_path)
        fields[TOKENIZER_FIELD] = {**tokenizer, "path": portable_path(tokenizer["path"])}
    if vision_encoder is not None:
        fields[VISION_FIELD] = {**vision_encoder, "path": portable_path(vision_encoder["path"])}
    text = json.dumps(fields, indent=2, ensure_ascii=False)
    atomic_write(config_path_for(path), lambda f: f.write(text.encode()))


def save_object(obj: Any, path: PathLike) -> None:
    """Write a resume checkpoint (plain tensors and containers) atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_object(path: PathLike) -> Any:
    """Load a resume checkpoint (plain tensors and containers only)."""
    return load_weights_only(str(path), "plain data", "file")
