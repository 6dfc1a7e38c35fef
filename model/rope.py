"""The rotary-embedding pieces of the second generation (3v): YaRN frequencies and the rotate-half form.
decoder.py's rope_tables and Attention use them when the config's generation is "3v"."""
from __future__ import annotations

import math
from typing import Optional

import torch


def yarn_frequencies(freqs: torch.Tensor, head_dim: int, theta: float, yarn: dict) -> torch.Tensor:
    """YaRN (as 3v applies it): the dims whose frequency turns more than beta_fast times over the original context
    are kept, those turning fewer than beta_slow times are divided by `factor`, with a linear ramp between."""
    original, factor = yarn["original_max_position_embeddings"], yarn["factor"]

    def dim_of(turns: float) -> float:  # the dim whose frequency turns `turns` times over the original context
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dim_of(yarn["beta_fast"])), 0)
    high = min(math.ceil(dim_of(yarn["beta_slow"])), head_dim // 2 - 1)
    j = torch.arange(head_dim // 2, device=freqs.device, dtype=torch.float32)
    ramp = ((j - low) / max(high - low, 0.001)).clamp(0, 1)
    return freqs * (1 - ramp + ramp / factor)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    rotation: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotate dim i with dim i + D/2 (the rotate-half form of 3v, Qwen and Hugging Face): x [B, T, H, D], cos/sin
    [T, D/2] or [B, T, D/2] as decoder.apply_rope takes them (its complex `rotation` is not used here)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    first, second = x.float().chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1).type_as(x)
