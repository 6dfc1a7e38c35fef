"""Model configuration: the MiniMind-V v1 fields, plus `vision_proj_bias`.

One knob sets the size: pick a preset from `PRESETS` (or pass `dim`/`n_layers`).
Field names and defaults follow the v1 release so that v1 checkpoints and
exported `config.json` files read back unchanged.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from transformers import PretrainedConfig

# Published sizes. Parameter counts are unique parameters (tied embedding counted once)
# with the v1 projection bias; tests check them.
PRESETS: dict[str, dict[str, int]] = {
    "minimind-v-small": {"dim": 512, "n_layers": 8},  # 27,272,192 parameters
    "minimind-v": {"dim": 768, "n_layers": 16},  # 109,340,160 parameters
}

# One image is spliced in as this many vectors: CLIP ViT-B/32 gives CLS + 7x7 patches.
IMAGE_TOKENS = 50
# The text placeholder for one image: 25 '<' then 25 '>' (v1). Its token ids come from the tokenizer.
IMAGE_SPECIAL_TOKEN = "<" * (IMAGE_TOKENS // 2) + ">" * (IMAGE_TOKENS // 2)
CLIP_DIM = 768

GENERATIONS = ("v1", "3v")
# The second generation (minimind-3v): a SigLIP2 tower gives 8x8 = 64 vectors per image, and the text
# placeholder is a run of 64 copies of one special token ('<|image_pad|>', id 12 in its tokenizer).
V3_IMAGE_TOKENS = 64
V3_IMAGE_SPECIAL_TOKEN = "<|image_pad|>"
# The 3v values of the fields v1 also has (its upstream config's defaults); LMConfig.for_generation applies them.
V3_DEFAULTS: dict[str, Any] = {
    "n_heads": 8, "n_kv_heads": 4, "norm_eps": 1e-6, "rope_theta": 1e6, "max_seq_len": 2048,
    "image_special_token": V3_IMAGE_SPECIAL_TOKEN, "vision_dim": 768,
    "num_experts_per_tok": 1, "n_routed_experts": 4, "n_shared_experts": None, "aux_loss_alpha": 5e-4,
    "seq_aux": False, "norm_topk_prob": True,
}
# YaRN as 3v switches it on (inference_rope_scaling): 16x the 2048 positions it was trained on.
V3_YARN = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 2048, "beta_fast": 32,
           "beta_slow": 1, "attention_factor": 1.0}


def _checked_generation(generation: str) -> str:
    """"v1": the first release, unchanged. "3v": q/k RMSNorm per head, rotate-half RoPE (theta 1e6), FFN width
    ceil(dim * pi / 64) * 64, top-1 MoE without shared expert, an MLP projector, 64-token image runs."""
    if generation not in GENERATIONS:
        raise ValueError(f"generation must be one of {GENERATIONS}, got {generation!r}")
    return generation


class LMConfig(PretrainedConfig):
    model_type = "minimind"
    # The standard names transformers reads (e.g. DynamicCache(config=...) counts layers) for the v1 fields.
    attribute_map = {"num_hidden_layers": "n_layers", "hidden_size": "dim", "num_attention_heads": "n_heads",
                     "num_key_value_heads": "n_kv_heads"}

    def __init__(
        self,
        dim: int = 512,
        n_layers: int = 8,
        n_heads: int = 16,
        n_kv_heads: int = 8,
        vocab_size: int = 6400,
        hidden_dim: Optional[int] = None,
        multiple_of: int = 64,
        norm_eps: float = 1e-5,
        max_seq_len: int = 200,
        dropout: float = 0.0,
        flash_attn: bool = True,
        image_special_token: str = IMAGE_SPECIAL_TOKEN,
        image_ids: Optional[list[int]] = None,
        vision_dim: int = CLIP_DIM,
        vision_proj_bias: bool = False,
        rope_theta: float = 1e4,
        use_moe: bool = False,
        num_experts_per_tok: int = 2,
        n_routed_experts: int = 4,
        n_shared_experts: Optional[bool] = True,
        scoring_func: str = "softmax",
        aux_loss_alpha: float = 0.01,
        seq_aux: bool = True,
        norm_topk_prob: bool = True,
        generation: str = "v1",
        rope_yarn: Optional[dict] = None,
        **kwargs: Any,
    ):
        self.generation = _checked_generation(generation)  # "v1" or "3v" (see V3_DEFAULTS)
        self.rope_yarn = dict(rope_yarn) if rope_yarn else None  # 3v's YaRN (transformers owns `rope_scaling`)
        self.dim = dim
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.vocab_size = vocab_size
        self.hidden_dim = hidden_dim
        self.multiple_of = multiple_of
        self.norm_eps = norm_eps
        self.max_seq_len = max_seq_len
        self.dropout = dropout
        self.flash_attn = flash_attn  # v1 compatibility: read back from v1 configs; SDPA is always used
        self.image_special_token = image_special_token  # v1 compatibility: the placeholder text v1 configs record
        # None until a tokenizer fills it in (see checkpoints.tokenizer.image_token_ids);
        # never hard-coded, because different tokenizers give different ids.
        self.image_ids = list(image_ids) if image_ids is not None else None
        self.vision_dim = vision_dim
        self.vision_proj_bias = vision_proj_bias
        self.rope_theta = rope_theta
        self.use_moe = use_moe
        self.num_experts_per_tok = num_experts_per_tok
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = n_shared_experts
        self.scoring_func = scoring_func  # v1 compatibility: v1 supports only softmax gate scores, as here
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.norm_topk_prob = norm_topk_prob
        super().__init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def image_tokens(self) -> int:
        """Vectors per image: 50 (v1, CLIP CLS + 7x7) or 64 (3v, SigLIP2 8x8 patches)."""
        return V3_IMAGE_TOKENS if self.generation == "3v" else IMAGE_TOKENS

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: v1 2/3 of 4*dim, rounded up to `multiple_of` (1408 for 512, 2048 for 768);
        3v ceil(dim * pi / 64) * 64 (2432 for 768, 256 for 64)."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        if self.generation == "3v":
            return math.ceil(self.dim * math.pi / 64) * 64
        hidden = int(2 * (4 * self.dim) / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def for_generation(cls, generation: str, **fields: Any) -> "LMConfig":
        """A config of `generation` with its own defaults ("3v": V3_DEFAULTS) under the given fields."""
        defaults = V3_DEFAULTS if generation == "3v" else {}
        return cls(**{**defaults, **fields, "generation": generation})

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "LMConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def train_flops(self, lengths: Sequence[int], supervised: int, images: int) -> float:
        """Matmul FLOPs of one training step (forward + backward) on real tokens: padding never counts.

        `lengths` are the rows' real token counts, `supervised` the positions with a label (the output head runs
        only there: loss_only), `images` the images spliced in. With d = dim, L = n_layers, kv = n_kv_heads x
        head_dim, f = ffn width, E = routed experts, k = experts per token (+1 for the shared expert), V = vocab,
        v = vision_dim, and 6 FLOPs per weight and token (forward 2, backward 4):
          blocks      6 P n per row,  P = L (2 d^2 + 2 d kv + 3 d f k + d E)  (dense: k = 1 and no gate d E)
          attention   6 L d n (n + 1) per row: QK^T and AV over the n (n + 1) / 2 causal pairs, fwd + bwd
          head        6 d V per supervised position
          projection  4 v d per image token: forward + weight gradient (the frozen features need no gradient)
        The frozen CLIP tower is not counted: it is not part of the model being trained.
        """
        d, L = self.dim, self.n_layers
        kv = self.n_kv_heads * self.head_dim
        if self.use_moe:
            experts = self.num_experts_per_tok + (self.n_shared_experts is not None)
            ffn = 3 * d * self.ffn_hidden_dim * experts + d * self.n_routed_experts
        else:
            ffn = 3 * d * self.ffn_hidden_dim
        block_weights = L * (2 * d * d + 2 * d * kv + ffn)
        n = sum(lengths)
        pairs = sum(x * (x + 1) for x in lengths)
        return float(6 * block_weights * n + 6 * L * d * pairs + 6 * d * self.vocab_size * supervised
                     + 4 * self.vision_dim * d * IMAGE_TOKENS * images)
