"""The MiniMind text decoder, read top to bottom:

  RMSNorm -> rotary embedding -> KV cache -> attention_layout (which keys each query sees, at which RoPE
  positions: padding, cache, packed rows) -> Attention (GQA) -> Block (with feed_forward.py's SwiGLU or MoE)
  -> MiniMindLM (embedding, blocks, final norm, tied output head, loss).

Parameter names and shapes are those of the MiniMind-V v1 release, so v1 checkpoints load strictly. The vision
side (projection, splice, generation) is in vlm.py.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import LMConfig
from .feed_forward import FeedForward, MOEFeedForward
from .rope import apply_rope_half, yarn_frequencies


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, scale_in_fp32: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.scale_in_fp32 = scale_in_fp32  # 3v multiplies by the weight before casting back, v1 after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16/fp16 lose too much in the mean of squares), cast back, then scale.
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same arithmetic as below in one fused kernel (fewer passes over the activations)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.scale_in_fp32:
            return (self.weight.float() * normed).type_as(x)
        return self.weight * normed.type_as(x)


def rope_tables(head_dim: int, length: int, theta: float, device=None,
                yarn: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [length, head_dim/2]: frequency j is theta^(-2j/head_dim). Both RoPE forms use them
    (apply_rope pairs adjacent dims, apply_rope_half the two halves). yarn (3v): see yarn_frequencies."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    scale = 1.0
    if yarn:
        freqs, scale = yarn_frequencies(freqs, head_dim, theta, yarn), float(yarn.get("attention_factor", 1.0))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), freqs)
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               rotation: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotate adjacent pairs (x0, x1), (x2, x3), ... of the last dim (the Meta-LLaMA complex form).

    x: [B, T, H, D]; cos/sin: [T, D/2], or [B, T, D/2] when rows sit at different positions (left padding);
    rotation: optionally cos + i sin precomputed (torch.complex(cos, sin)).
    Computed in fp32 and cast back. Eager mode multiplies each pair, read as x0 + i x1, by cos + i sin: one
    kernel forward and one backward instead of a dozen; the result is the same arithmetic. Under torch.compile
    the real form is used (inductor fuses it; it generates no code for complex operators)."""
    if torch.compiler.is_compiling():
        xf = x.float().unflatten(-1, (-1, 2))
        x0, x1 = xf[..., 0], xf[..., 1]
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return out.flatten(-2).type_as(x)
    if rotation is None:
        rotation = torch.complex(cos.float(), sin.float())
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rotation.unsqueeze(-2)).flatten(-2).type_as(x)


class KVCache:
    """Pre-allocated keys and values for every layer; `length` tokens are filled. key_mask is None while no
    cached position is padding, else bool [B, length]: which cached positions are real tokens (attention_layout
    keeps it, so later steps need no attention_mask)."""

    def __init__(self, config: LMConfig, batch: int, max_len: int, device, dtype):
        shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.key_mask: Optional[torch.Tensor] = None

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values [B, H, T, D] after the `length` cached ones; return all of them so far."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def select_rows(self, index: torch.Tensor) -> "KVCache":
        """A new cache holding copies of these rows (one cached prefix continued several ways)."""
        picked = copy.copy(self)
        picked.k, picked.v = self.k[:, index], self.v[:, index]
        picked.key_mask = None if self.key_mask is None else self.key_mask[index]
        return picked


def attention_layout(new_tokens: int, batch: int, device: torch.device,
                     attention_mask: Optional[torch.Tensor] = None, cache=None,
                     segment_ids: Optional[torch.Tensor] = None) -> tuple[Optional[torch.Tensor],
                                                                          Optional[torch.Tensor]]:
    """(RoPE positions [B, T], attention mask) of the `new_tokens` queries that follow the cache's filled ones.

    positions None: the queries sit at start..end-1 in every row. mask None: plain causal attention (for one
    query: every key so far); else bool, True where a query may look: [B, 1, T, keys], or [T, keys] for a
    chunk after an unpadded cache. The situations, fastest first:
      - no padding anywhere, no cache or an empty one: (None, None), the plain causal path;
      - right padding only, without a cache (scoring, training): also (None, None), since causal attention
        already keeps every real token from the padding after it and its positions are 0..n-1;
      - a chunk of several tokens after an unpadded filled cache: query i sees keys up to start + i;
      - padding (attention_mask, or the cache's key_mask from an earlier step): a row's positions count only
        its real tokens, so a left-padded row is rotated exactly as it would be alone, and padding is no key;
      - packed rows (segment_ids; no cache, no attention_mask): see _packed_layout.
    attention_mask (1 = token, 0 = padding) covers either the new tokens or the whole sequence so far (the
    transformers convention). A KVCache keeps which of its positions are real in key_mask."""
    start = cache.length if cache is not None else 0
    end = start + new_tokens
    if segment_ids is not None:
        if cache is not None or attention_mask is not None:
            raise ValueError("segment_ids (packed rows) go without a cache and without an attention_mask")
        return _packed_layout(segment_ids)
    keys = _real_keys(attention_mask, cache, batch, start, end)
    if keys is None:
        if start > 0 and new_tokens > 1:  # a chunk after a filled cache: is_causal would align it top-left
            return None, torch.ones(new_tokens, end, dtype=torch.bool, device=device).tril(diagonal=start)
        return None, None
    if cache is None and bool((keys[:, 1:] <= keys[:, :-1]).all()):  # right padding only
        return None, None
    positions = (keys.long().cumsum(-1) - 1).clamp(min=0)[:, start:end]
    return positions, _causal_over_real_keys(keys, start, end)


def _real_keys(attention_mask: Optional[torch.Tensor], cache, batch: int, start: int,
               end: int) -> Optional[torch.Tensor]:
    """Which of the keys 0..end-1 are real tokens (bool [B, end]), or None when none is padding; a KVCache
    records it in key_mask for the next steps."""
    past = getattr(cache, "key_mask", None)
    if attention_mask is None:
        if past is None:
            return None
        keys = torch.cat([past[:, :start], past.new_ones(batch, end - start)], dim=1)
    else:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or \
                attention_mask.shape[1] not in (end - start, end):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({batch}, "
                             f"{end - start}) for the new tokens or ({batch}, {end}) with the cached ones")
        keys = attention_mask.bool()
        if keys.shape[1] != end:
            before = past[:, :start] if past is not None else keys.new_ones(batch, start)
            keys = torch.cat([before, keys], dim=1)
        if past is None and bool(keys.all()):
            return None
    if isinstance(cache, KVCache):
        cache.key_mask = keys
    return keys


def _causal_over_real_keys(keys: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """bool [B, 1, T, end]: causal attention restricted to real keys, for queries at positions start..end-1.
    A padded query sees itself as well, so that no row is empty: an all-masked row would give NaN, which the
    next layer's values would carry into real rows (0 weight times NaN is NaN)."""
    q = torch.arange(start, end, device=keys.device)[:, None]
    k = torch.arange(end, device=keys.device)[None, :]
    allowed = ((k <= q)[None] & keys[:, None, :]) | (k == q)[None]
    return allowed[:, None]


def _packed_layout(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE positions [B, T] and attention mask bool [B, 1, T, T] of packed rows (several questions sharing one
    image: data_pipeline's pack_same_image).

    segment_ids [B, T]: 0 on the shared prefix, k on the k-th segment, -1 on padding. A segment's token sees the
    prefix and the earlier tokens of its own segment, at the positions it would have in a row of its own
    (prefix length + its offset in the segment); the prefix and padding see as in a plain causal row."""
    B, T = segment_ids.shape
    t = torch.arange(T, device=segment_ids.device)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    segment_start = torch.where(starts, t, 0).cummax(dim=1).values  # index of each token's segment start
    prefix = (segment_ids == 0).sum(dim=1, keepdim=True)
    positions = torch.where(segment_ids > 0, prefix + t - segment_start, t)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    shared = (segment_ids == 0)[:, None, :]
    allowed = (t[None, :, None] >= t[None, None, :]) & (same | shared)
    return positions, allowed[:, None]


class Attention(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        if config.n_heads % config.n_kv_heads:
            raise ValueError(f"n_heads ({config.n_heads}) must be a multiple of n_kv_heads ({config.n_kv_heads})")
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)
        v3 = config.generation == "3v"
        # 3v normalises each query and key head over head_dim before the rotation
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps, scale_in_fp32=True) if v3 else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps, scale_in_fp32=True) if v3 else None
        self.rope = apply_rope_half if v3 else apply_rope
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def rotated_qkv(self, x: torch.Tensor, rope: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of x [B, T, dim] as [B, T, heads, head_dim], queries and keys rotated."""
        B, T, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.rope(q, *rope), self.rope(k, *rope), v

    def forward(self, x: torch.Tensor, rope: tuple, cache: Optional[KVCache] = None,
                layer: int = 0, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """rope: (cos, sin, rotation) of these positions, as apply_rope takes them (MiniMindLM.run_blocks).
        attn_mask: attention_layout's mask (None: plain causal attention, or every key for a single query)."""
        B, T, _ = x.shape
        q, k, v = self.rotated_qkv(x, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        if cache is not None:
            k, v = cache.store(layer, k, v)
            if T == 1 and not self.training:
                # One new token sees the whole cache, so the query heads sharing a kv head can stand in as
                # that kv head's queries: [B, n_kv, group, D] against [B, n_kv, L, D], no kv repeat (head h
                # uses kv head h // group, as enable_gqa does); a padding mask [B, 1, 1, L] broadcasts.
                out = self._attend(q.reshape(B, self.n_kv_heads, -1, self.head_dim), k, v, attn_mask, False)
                return self.resid_dropout(self.wo(out.reshape(B, 1, -1)))
        causal = True if attn_mask is None and T > 1 else False  # a bool even where T is symbolic (compiled)
        out = self._attend(q, k, v, attn_mask, causal=causal)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(B, T, -1)))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                causal: bool) -> torch.Tensor:
        """Scaled dot-product attention of q [B, Hq, T, D] over k, v [B, Hkv, S, D]; each kv head serves
        Hq / Hkv consecutive query heads (enable_gqa repeats it with repeat_interleave, as v1 does).

        CPU bf16 training attends in fp32: PyTorch's CPU flash-attention backward is about 3x slower in bf16 than
        in fp32 (forward included, fp32 costs a third), so CPU bf16 autocast, which would cast the inputs back to
        bf16, is paused for this op; inference stays in bf16."""
        if q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.requires_grad and torch.is_grad_enabled():
            with torch.autocast("cpu", enabled=False):
                return self._sdpa(q.float(), k.float(), v.float(), mask, causal).to(q.dtype)
        return self._sdpa(q, k, v, mask, causal)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              causal: bool) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              dropout_p=self.dropout if self.training else 0.0,
                                              enable_gqa=q.shape[1] != k.shape[1])


class Block(nn.Module):
    def __init__(self, layer_id: int, config: LMConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(config)
        v3 = config.generation == "3v"
        self.attention_norm = RMSNorm(config.dim, config.norm_eps, scale_in_fp32=v3)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, scale_in_fp32=v3)
        self.feed_forward = MOEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, x, rope: tuple, cache: Optional[KVCache] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, cache, self.layer_id, attn_mask)
        return h + self.feed_forward(self.ffn_norm(h))


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None


class MiniMindLM(nn.Module):
    """The text decoder: tied embedding, pre-norm blocks, final norm, output head."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([Block(i, config) for i in range(config.n_layers)])
        self.norm = RMSNorm(config.dim, config.norm_eps, scale_in_fp32=config.generation == "3v")
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied
        self._rope_len = 0
        self._extend_rope(config.max_seq_len)
        self.apply(self._init_weights)
        # Residual-branch output projections start smaller so the residual stream keeps its scale
        # (v1 scales w3 and wo; kept for identical initial statistics).
        for name, p in self.named_parameters():
            if name.endswith("w3.weight") or name.endswith("wo.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def _extend_rope(self, length: int, device=None) -> None:
        cos, sin = rope_tables(self.config.head_dim, length, self.config.rope_theta, device,
                               yarn=self.config.rope_yarn if self.config.generation == "3v" else None)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._rope_len = length

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.tok_embeddings(input_ids))

    def run_blocks(self, h: torch.Tensor, cache: Optional[KVCache] = None,
                   attention_mask: Optional[torch.Tensor] = None,
                   segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the blocks and the final norm on embeddings h [B, T, dim] (positions continue the cache).

        attention_mask (1 = token, 0 = padding) keeps padded positions out of attention; a row's RoPE positions
        count only its real tokens, so a left-padded row is rotated exactly as it would be alone. segment_ids
        [B, T] marks packed rows (training and scoring only, no cache). attention_layout says which keys each
        query sees, and at which positions; without padding this is the plain causal path."""
        B, T = h.shape[:2]
        start = cache.length if cache is not None else 0
        end = start + T
        if end > self._rope_len:  # longer than max_seq_len (e.g. long generation): grow the table
            self._extend_rope(max(end, 2 * self._rope_len), h.device)
        positions, attn_mask = attention_layout(T, B, h.device, attention_mask, cache, segment_ids)
        if positions is None:
            cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        # the complex table once for all layers (eager only: see apply_rope)
        rope = (cos, sin, None if torch.compiler.is_compiling() else torch.complex(cos.float(), sin.float()))
        for block in self.layers:
            h = block(h, rope, cache, attn_mask)
        if cache is not None:
            cache.length = end
        return self.norm(h)

    def aux_loss(self) -> Optional[torch.Tensor]:
        if not self.config.use_moe:
            return None
        return sum(block.feed_forward.aux_loss for block in self.layers)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, attention_mask: Optional[torch.Tensor] = None) -> ModelOutput:
        h = self.run_blocks(self.embed(input_ids), cache, attention_mask)
        return self.logits_and_loss(h, mask_padding_labels(labels, attention_mask))

    def logits_and_loss(self, h: torch.Tensor, labels: Optional[torch.Tensor],
                        loss_only: bool = False, loss_positions: Optional[torch.Tensor] = None) -> ModelOutput:
        """Logits and the loss. labels align with input_ids: position t predicts token t+1; -100 is ignored
        (token id 0 is an ordinary target). loss_only computes logits just where a label is supervised:
        the output head is a large share of a small model's FLOPs and most positions carry no label.
        loss_positions: those positions already found (flat indices into [B * (T-1)], ascending: the same rows
        in the same order as the mask gives), so a compiled step needs no data-dependent mask here."""
        aux = self.aux_loss() if self.training else None
        if labels is not None and loss_only and loss_positions is not None:
            flat = h[:, :-1].reshape(-1, h.shape[-1])
            logits = self.output(flat[loss_positions])
            loss = F.cross_entropy(logits.float(), labels[:, 1:].reshape(-1)[loss_positions])
        elif labels is not None and loss_only:
            targets = labels[:, 1:]
            keep = targets != -100
            logits = self.output(h[:, :-1][keep])
            loss = F.cross_entropy(logits.float(), targets[keep])
        else:
            logits = self.output(h)
            loss = None
            if labels is not None:
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                       labels[:, 1:].reshape(-1), ignore_index=-100)
        if loss is not None and aux is not None:  # v1 computed the MoE balance loss but never used it
            loss = loss + aux
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux)


def mask_padding_labels(labels: Optional[torch.Tensor],
                        attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """labels with padded positions set to -100, so padding is never a target of the loss."""
    if labels is None or attention_mask is None:
        return labels
    return labels.masked_fill(attention_mask[:, -labels.shape[1]:] == 0, -100)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (the tied embedding/output counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
