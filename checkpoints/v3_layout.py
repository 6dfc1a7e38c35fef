"""The 3v file layout at the file boundary: its state-dict names (Hugging Face style, `model.layers.{i}.self_attn.
q_proj`, `lm_head`, `vision_proj.mlp.{n}`) translated to the network's own names (v1's: `layers.{i}.attention.wq`,
`output`, `vision_proj.vision_proj.{n}`) when a 3v `.pth` or model directory is read, and back when one is written;
its config.json fields translated to LMConfig fields; and the config read off a 3v state dict's shapes.

Which generation a checkpoint is comes from the checkpoint (its key names), its sidecar (`generation`) or its
config.json (`model_type` "minimind-v"), never from a file name; where they disagree the checkpoint is refused.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch

from model.config import V3_DEFAULTS, V3_IMAGE_TOKENS, V3_YARN
from .files import CheckpointError

V3_MODEL_TYPE = "minimind-v"  # config.json's model_type of a 3v transformers directory (v1's is "minimind")
TOP_LEVEL = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
# Inside a block: upstream name -> ours (the expert FFNs use the FFN names too).
IN_BLOCK = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
            "self_attn.o_proj": "attention.wo", "self_attn.q_norm": "attention.q_norm",
            "self_attn.k_norm": "attention.k_norm", "input_layernorm": "attention_norm",
            "post_attention_layernorm": "ffn_norm", "mlp.gate": "feed_forward.gate"}
FFN = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_UPSTREAM_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_OUR_BLOCK = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)$")
_EXPERT = re.compile(r"(experts\.\d+\.)?(\w+)$")


def _rename(key: str, to_ours: bool) -> Optional[str]:
    """The other layout's name of `key`, or None when it is no name of that layout."""
    top = TOP_LEVEL if to_ours else {v: k for k, v in TOP_LEVEL.items()}
    if key in top:
        return top[key]
    src, dst = ("vision_proj.mlp.", "vision_proj.vision_proj.") if to_ours else \
        ("vision_proj.vision_proj.", "vision_proj.mlp.")
    if key.startswith(src):
        return dst + key[len(src):]
    match = (_UPSTREAM_BLOCK if to_ours else _OUR_BLOCK).match(key)
    if match is None:
        return None
    layer, inner, kind = match.groups()
    block = IN_BLOCK if to_ours else {v: k for k, v in IN_BLOCK.items()}
    ffn = FFN if to_ours else {v: k for k, v in FFN.items()}
    prefix, mlp = ("mlp.", "feed_forward.") if to_ours else ("feed_forward.", "mlp.")
    if inner in block:
        new = block[inner]
    elif inner.startswith(prefix) and (m := _EXPERT.match(inner[len(prefix):])) and m.group(2) in ffn:
        new = mlp + (m.group(1) or "") + ffn[m.group(2)]
    else:
        return None
    return f"layers.{layer}.{new}.{kind}" if to_ours else f"model.layers.{layer}.{new}.{kind}"


def to_native(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A 3v state dict (upstream names) under the network's names; an unknown key is a CheckpointError."""
    out = {}
    for key, value in sd.items():
        new = _rename(key, to_ours=True)
        if new is None:
            raise CheckpointError(f"{source}: {key!r} is not a key of a minimind-3v checkpoint")
        out[new] = value
    if "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]  # tied; transformers 5 writes only one of them
    return out


def to_upstream(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's 3v state dict under the upstream names (as 3v's trainer writes its `.pth`)."""
    out = {}
    for key, value in sd.items():
        new = _rename(key, to_ours=False)
        if new is None:
            raise ValueError(f"{key!r} has no minimind-3v name")
        out[new] = value
    return out


def is_upstream_layout(sd: dict[str, torch.Tensor]) -> bool:
    return "model.embed_tokens.weight" in sd


def native_layout(sd: dict[str, torch.Tensor], stored: dict[str, Any],
                  source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict under the network's names, stored config with its `generation`) of a weight file and its
    sidecar: a 3v file (upstream key names) is translated; a sidecar that names the other generation is refused."""
    upstream = is_upstream_layout(sd)
    recorded = stored.get("generation")
    if recorded is not None and recorded != ("3v" if upstream else "v1"):
        layout = "minimind-3v (model.embed_tokens...)" if upstream else "v1 (tok_embeddings...)"
        raise CheckpointError(f"{source}: its config says generation {recorded!r}, but its weights have the "
                              f"{layout} key names")
    if not upstream:
        return sd, stored
    return to_native(sd, source), {**stored, "generation": "3v"}


def config_json_fields(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """LMConfig fields of a 3v transformers directory's config.json (model_type "minimind-v"); settings this
    network does not implement are refused in one line."""
    checks = {"hidden_act": "silu", "tie_word_embeddings": True, "image_token_len": V3_IMAGE_TOKENS}
    for name, want in checks.items():
        if raw.get(name, want) != want:
            raise CheckpointError(f"{source}: {name} = {raw[name]!r} is not supported (minimind-3v uses {want!r})")
    if raw.get("use_moe") and raw.get("moe_intermediate_size", raw.get("intermediate_size")) != \
            raw.get("intermediate_size", raw.get("moe_intermediate_size")):
        raise CheckpointError(f"{source}: moe_intermediate_size differs from intermediate_size (not supported)")
    names = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
             "num_key_value_heads": "n_kv_heads", "vocab_size": "vocab_size", "intermediate_size": "hidden_dim",
             "rms_norm_eps": "norm_eps", "rope_theta": "rope_theta", "dropout": "dropout", "use_moe": "use_moe",
             "num_experts": "n_routed_experts", "num_experts_per_tok": "num_experts_per_tok",
             "norm_topk_prob": "norm_topk_prob", "router_aux_loss_coef": "aux_loss_alpha",
             "image_hidden_size": "vision_dim", "image_ids": "image_ids", "image_special_token": "image_special_token",
             "max_seq_len": "max_seq_len"}
    fields = {ours: raw[theirs] for theirs, ours in names.items() if raw.get(theirs) is not None}
    scaling = raw.get("rope_scaling")
    if raw.get("inference_rope_scaling") or scaling:
        fields["rope_yarn"] = dict(scaling) if isinstance(scaling, dict) else dict(V3_YARN)
    return {**fields, "generation": "3v"}


def read_v3_model_dir(root: Path, raw: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict under the network's names, LMConfig fields) of a 3v transformers directory. Only its JSON and
    weight files are read: its Python files (config.json's auto_map) are never imported."""
    from .weights import read_hf_weights

    sd = read_hf_weights(root)
    if not is_upstream_layout(sd):
        raise CheckpointError(f"{root}: config.json says model_type {V3_MODEL_TYPE!r} (minimind-3v), but the weights "
                              f"have no model.embed_tokens.weight")
    native = to_native(sd, str(root))
    if not torch.equal(native["output.weight"], native["tok_embeddings.weight"]):
        raise CheckpointError(f"{root}: lm_head.weight differs from model.embed_tokens.weight, but 3v ties them")
    return native, config_json_fields(raw, str(root / "config.json"))


def infer_v3_fields(sd: dict[str, torch.Tensor], stored: dict[str, Any]) -> dict[str, Any]:
    """LMConfig fields of a 3v state dict (network names), read off its shapes: head_dim from q_norm, so head counts
    need no sidecar; 3v defaults (V3_DEFAULTS) for what shapes cannot tell, under the stored fields."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise CheckpointError(f"not a minimind-3v checkpoint: no {key}")
        return tuple(sd[key].shape)

    vocab_size, dim = shape("tok_embeddings.weight")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))}
    if layers != set(range(len(layers))) or not layers:
        raise CheckpointError(f"layer indices are not contiguous from 0: {sorted(layers)[:8]}")
    head_dim = shape("layers.0.attention.q_norm.weight")[0]
    n_heads, n_kv_heads = shape("layers.0.attention.wq.weight")[0] // head_dim, \
        shape("layers.0.attention.wk.weight")[0] // head_dim
    if n_heads * head_dim != dim:
        raise CheckpointError(f"head_dim {head_dim} x {n_heads} heads is not hidden size {dim} (not supported)")
    experts = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.0\.feed_forward\.experts\.(\d+)\.", k))}
    w1 = "layers.0.feed_forward.experts.0.w1.weight" if experts else "layers.0.feed_forward.w1.weight"
    fields = {**V3_DEFAULTS, **stored, "generation": "3v", "dim": dim, "vocab_size": vocab_size,
              "n_layers": len(layers), "n_heads": n_heads, "n_kv_heads": n_kv_heads, "use_moe": bool(experts),
              "hidden_dim": shape(w1)[0]}
    if "vision_proj.vision_proj.1.weight" in sd:  # a text-only LLM (upstream's llm_768.pth) has no projection yet
        fields["vision_dim"] = shape("vision_proj.vision_proj.1.weight")[1]
    if experts:
        fields["n_routed_experts"] = len(experts)
    fields.setdefault("image_ids", None)
    return fields
