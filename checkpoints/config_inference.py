"""The model config of a checkpoint: read off its tensor shapes (head counts from the stored config, since shapes
cannot tell them), and every size-like field checked against sane bounds before a model is built from it.
"""
from __future__ import annotations

import inspect
import math
import re
from typing import Any, Optional

import torch

from model.config import GENERATIONS, LMConfig
from .files import CheckpointError
from .schema import Rule, brief, check, obj
from .v3_layout import infer_v3_fields

PROJ_PREFIX = "vision_proj."
PROJ_BIAS = "vision_proj.vision_proj.0.bias"
TOKENIZER_FIELD = "tokenizer"  # the sidecar's record of the tokenizer a checkpoint was trained with
VISION_FIELD = "vision_encoder"  # ... and of the vision encoder its projection was fitted to

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
# The types of the other config fields (absent or null is allowed; the constructor defaults them).
_NULL = type(None)
OTHER_FIELDS = obj({
    "image_special_token": Rule((str, _NULL), max_len=1024), "scoring_func": Rule((str, _NULL), max_len=64),
    "image_ids": Rule((list, _NULL), max_len=1024, each=Rule((int,), low=0)),
    "n_shared_experts": Rule((bool, int, _NULL)), "generation": Rule((str, _NULL), max_len=64),
    "rope_yarn": Rule((dict, _NULL), max_len=64, each=Rule((int, float, str, bool, _NULL), max_len=256)),
}, optional=("image_special_token", "scoring_func", "image_ids", "n_shared_experts", "generation", "rope_yarn"))


def has_projection_bias(sd: dict[str, torch.Tensor]) -> bool:
    """A bias that is all zeros is how unbiased projections are written in the v1 layout."""
    bias = sd.get(PROJ_BIAS)
    return bias is not None and bool(bias.abs().max() > 0)


def _layer_count(sd: dict[str, torch.Tensor]) -> int:
    """The number of blocks (layers.0 .. layers.n-1), or CheckpointError naming the first missing index."""
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))}
    n_layers = max(layer_ids) + 1 if layer_ids else 0
    if len(layer_ids) != n_layers:  # ids are >= 0 with max n_layers - 1: equal counts means 0..n-1, no gap
        first_gap = next(i for i in range(n_layers) if i not in layer_ids)
        raise CheckpointError(f"layer indices are not contiguous: {len(layer_ids)} layers up to index "
                              f"{n_layers - 1}, layer {first_gap} is missing")
    return n_layers


def infer_config(sd: dict[str, torch.Tensor], stored: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Model config fields read off tensor shapes; `stored` (the sidecar config) supplies head counts."""
    stored = dict(stored or {})
    stored.pop(TOKENIZER_FIELD, None)  # not model fields
    stored.pop(VISION_FIELD, None)
    check_config_fields(stored, what="stored config")
    if stored.get("generation") == "3v":  # shapes tell 3v's head counts too (q_norm is head_dim wide)
        cfg = infer_v3_fields(sd, stored)
        check_config_fields(cfg)
        return cfg
    if "tok_embeddings.weight" not in sd:
        raise CheckpointError("not a MiniMind checkpoint: no tok_embeddings.weight")
    if sd["tok_embeddings.weight"].dim() != 2:
        raise CheckpointError(f"tok_embeddings.weight has {sd['tok_embeddings.weight'].dim()} dimensions "
                              f"(shape {tuple(sd['tok_embeddings.weight'].shape)}), not 2 (vocab_size x dim)")
    vocab_size, dim = sd["tok_embeddings.weight"].shape
    n_layers = _layer_count(sd)
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


def check_config_fields(fields: dict[str, Any], what: str = "config") -> None:
    """Raise CheckpointError (one line, naming the field) for a config value of the wrong type or out of bounds,
    or head/expert counts that do not divide; fields that are absent or None (hidden_dim) are skipped."""
    check(fields, OTHER_FIELDS, what, root="the config")
    for name, (kind, low, high) in CONFIG_BOUNDS.items():
        value = fields.get(name)
        if value is None:
            continue
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool) and \
            (kind is float or float(value).is_integer())
        if not ok_type or not math.isfinite(value) or not low <= value <= high:
            want = "an integer" if kind is int else "a number"
            raise CheckpointError(f"{what}: {name} = {brief(value)} is out of range ({want} in [{low:g}, {high:g}])")
    for name in BOOL_FIELDS:
        if name in fields and fields[name] is not None and not isinstance(fields[name], bool):
            raise CheckpointError(f"{what}: {name} = {brief(fields[name])} is not true/false")
    if fields.get("generation", "v1") not in GENERATIONS:
        raise CheckpointError(f"{what}: generation = {brief(fields['generation'])} is not one of {GENERATIONS}")
    heads, kv = fields.get("n_heads"), fields.get("n_kv_heads")
    if heads is not None and kv is not None and heads % kv:
        raise CheckpointError(f"{what}: n_heads {heads} is not a multiple of n_kv_heads {kv}")
    if fields.get("use_moe") and fields.get("num_experts_per_tok", 2) > fields.get("n_routed_experts", 4):
        raise CheckpointError(f"{what}: num_experts_per_tok {fields.get('num_experts_per_tok')} is more than "
                              f"n_routed_experts {fields.get('n_routed_experts')}")


def config_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The LMConfig fields of a config.json; transformers bookkeeping (auto_map, dtype, ...) and unknown keys
    are dropped."""
    known = set(inspect.signature(LMConfig.__init__).parameters) - {"self", "kwargs"}
    return {k: v for k, v in raw.items() if k in known}
