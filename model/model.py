"""The MiniMind decoder and the vision-language model built on it.

Read top to bottom:
  RMSNorm -> rotary embedding -> Attention (GQA, KV cache) -> FeedForward (SwiGLU) / MoE
  -> Block -> MiniMindLM (text decoder) -> VisionProj -> MiniMindVLM (projection + splice + generate).

Parameter names and shapes are those of the MiniMind-V v1 release, so v1 checkpoints load strictly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .LMConfig import IMAGE_TOKENS, LMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16/fp16 lose too much in the mean of squares), cast back, then scale.
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same arithmetic as below in one fused kernel (fewer passes over the activations)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def rope_tables(head_dim: int, length: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [length, head_dim/2] for the interleaved-pair rotary embedding."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               rotation: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotate adjacent pairs (x0, x1), (x2, x3), ... of the last dim (the Meta-LLaMA complex form).

    x: [B, T, H, D]; cos/sin: [T, D/2], or [B, T, D/2] when rows sit at different positions (left padding);
    rotation: optionally cos + i sin precomputed (torch.complex(cos, sin)).
    Computed in fp32 and cast back. Eager mode multiplies each pair, read as x0 + i x1, by cos + i sin: one
    kernel forward and one backward instead of a dozen; the result is the same arithmetic. Under torch.compile
    the real form is used (inductor fuses it; it generates no code for complex operators).
    """
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
    """Pre-allocated keys and values for every layer; `length` tokens are filled.

    key_mask is None while no cached position is padding, else bool [B, length]: which cached positions are
    real tokens (run_blocks keeps it, so later steps need no attention_mask).
    """

    def __init__(self, config: LMConfig, batch: int, max_len: int, device, dtype):
        shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.max_len = max_len
        self.key_mask: Optional[torch.Tensor] = None

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values [B, H, T, D] after the `length` cached ones; return all of them so far."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def key_padding(attention_mask: Optional[torch.Tensor], cache, batch: int, start: int,
                end: int) -> Optional[torch.Tensor]:
    """Which of the keys 0..end-1 are real tokens (bool [B, end]), or None when none is padding (the fast path).

    attention_mask (1 = token, 0 = padding) covers either the new tokens (end - start columns; the cache's
    key_mask supplies the rest) or the whole sequence so far (end columns, the transformers convention).
    """
    past = getattr(cache, "key_mask", None) if cache is not None else None
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


def padding_layout(attention_mask: Optional[torch.Tensor], cache, batch: int, start: int,
                   end: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """RoPE positions [B, T] and attention mask of the queries start..end-1 of padded rows, or (None, None)
    for the plain causal path (no padding, or right padding only without a cache)."""
    keys = key_padding(attention_mask, cache, batch, start, end)
    if keys is None or (cache is None and bool((keys[:, 1:] <= keys[:, :-1]).all())):
        # Right padding only (scoring, training): causal attention already keeps every real token from the
        # padding after it, and real positions are 0..n-1, so the fast causal path gives the same logits.
        return None, None
    positions = (keys.long().cumsum(-1) - 1).clamp(min=0)[:, start:end]  # [B, T]
    return positions, padded_attention_mask(keys, start, end)


def segment_layout(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE positions [B, T] and attention mask bool [B, 1, T, T] of packed rows (dataset.pack_same_image).

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


def padded_attention_mask(keys: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """bool [B, 1, T, end]: causal attention restricted to real keys, for queries at positions start..end-1.

    A padded query sees itself as well, so that no row is empty: an all-masked row would give NaN, which the
    next layer's values would carry into real rows (0 weight times NaN is NaN).
    """
    q = torch.arange(start, end, device=keys.device)[:, None]
    k = torch.arange(end, device=keys.device)[None, :]
    allowed = ((k <= q)[None] & keys[:, None, :]) | (k == q)[None]
    return allowed[:, None]


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
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def rotated_qkv(self, x: torch.Tensor, rope: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of x [B, T, dim] as [B, T, heads, head_dim], queries and keys rotated."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def forward(self, x: torch.Tensor, rope: tuple, cache: Optional[KVCache] = None,
                layer: int = 0, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """rope: (cos, sin, rotation) of these positions, as apply_rope takes them (MiniMindLM.run_blocks).
        attn_mask: None for plain causal attention, or bool [B, 1, T, keys] when rows hold padding
        (padded_attention_mask)."""
        B, T, _ = x.shape
        q, k, v = self.rotated_qkv(x, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]

        mask, causal = None, T > 1
        if cache is not None:
            start = cache.length
            k, v = cache.store(layer, k, v)
            if T == 1 and not self.training:
                # One new token sees the whole cache, so the query heads sharing a kv head can stand in as
                # that kv head's queries: [B, n_kv, group, D] against [B, n_kv, L, D], no kv repeat (head h
                # uses kv head h // group, as enable_gqa does); a padding mask [B, 1, 1, L] broadcasts.
                out = F.scaled_dot_product_attention(q.reshape(B, self.n_kv_heads, -1, self.head_dim), k, v,
                                                     attn_mask=attn_mask)
                return self.resid_dropout(self.wo(out.reshape(B, 1, -1)))
            if start > 0 and T > 1:
                # A chunk after a filled cache: query i sees keys up to start + i.
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
                causal = False
            elif T == 1:
                causal = False
        if attn_mask is not None:
            mask, causal = attn_mask, False
        dtype = q.dtype
        if dtype == torch.bfloat16 and q.device.type == "cpu" and q.requires_grad and torch.is_grad_enabled():
            # PyTorch's CPU flash-attention backward is about 3x slower in bf16 than in fp32 (forward included,
            # fp32 costs a third): train attention in fp32 on CPU (CPU bf16 autocast, which would cast the
            # inputs back to bf16, is paused for this op); inference stays in bf16.
            with torch.autocast("cpu", enabled=False):
                out = self._attend(q.float(), k.float(), v.float(), mask, causal).to(dtype)
        else:
            out = self._attend(q, k, v, mask, causal)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(B, T, -1)))

    def _attend(self, q, k, v, mask, causal: bool) -> torch.Tensor:
        # enable_gqa repeats each kv head for consecutive query heads (repeat_interleave), as v1 does.
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_heads != self.n_kv_heads,
        )


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: LMConfig):
        super().__init__()
        hidden = config.ffn_hidden_dim
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class MoEGate(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, T, dim] -> (expert index [N, k], weight [N, k], aux loss) for N = B*T tokens."""
        B, T, _ = x.shape
        scores = F.linear(x.reshape(-1, x.shape[-1]), self.weight).softmax(dim=-1)
        weight, index = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        aux = scores.new_zeros(())
        if self.training and self.alpha > 0:
            if self.seq_aux:  # load balance measured per sequence
                counts = torch.zeros(B, self.n_experts, device=x.device)
                counts.scatter_add_(1, index.view(B, -1), torch.ones(B, T * self.top_k, device=x.device))
                load = counts / (T * self.top_k / self.n_experts)
                aux = (load * scores.view(B, T, -1).mean(dim=1)).sum(dim=1).mean() * self.alpha
            else:
                load = F.one_hot(index.view(-1), self.n_experts).float().mean(0) * self.n_experts
                aux = (scores.mean(0) * load).sum() * self.alpha
        return index, weight, aux


class MOEFeedForward(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.experts = nn.ModuleList([FeedForward(config) for _ in range(config.n_routed_experts)])
        self.gate = MoEGate(config)
        # v1 builds the shared expert whenever the field is not None (even False); kept for key compatibility.
        self.shared_experts = FeedForward(config) if config.n_shared_experts is not None else None
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index, weight, self.aux_loss = self.gate(x)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.zeros_like(flat)
        token_of_slot = torch.arange(flat.shape[0], device=x.device).repeat_interleave(index.shape[1])
        expert_of_slot, weight_of_slot = index.reshape(-1), weight.reshape(-1, 1)
        # Each expert runs once on exactly the tokens routed to it (same path in training and eval).
        for e, expert in enumerate(self.experts):
            slots = (expert_of_slot == e).nonzero(as_tuple=True)[0]
            if slots.numel() == 0:
                continue
            tokens = token_of_slot[slots]
            out.index_add_(0, tokens, (expert(flat[tokens]) * weight_of_slot[slots]).to(out.dtype))
        out = out.view_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class Block(nn.Module):
    def __init__(self, layer_id: int, config: LMConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
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
        self.norm = RMSNorm(config.dim, config.norm_eps)
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
        cos, sin = rope_tables(self.config.head_dim, length, self.config.rope_theta, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._rope_len = length

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.tok_embeddings(input_ids))

    def run_blocks(self, h: torch.Tensor, cache: Optional[KVCache] = None,
                   attention_mask: Optional[torch.Tensor] = None,
                   segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the blocks and the final norm on embeddings h [B, T, dim] (positions continue the cache).

        attention_mask (1 = token, 0 = padding; see key_padding for its two accepted widths) keeps padded
        positions out of attention; a row's RoPE positions count only its real tokens, so a left-padded row
        is rotated exactly as it would be alone. Without padding this is the plain causal path.
        segment_ids [B, T] marks packed rows (segment_layout; training and scoring only, no cache).
        """
        B, T = h.shape[:2]
        start = cache.length if cache is not None else 0
        end = start + T
        if end > self._rope_len:  # longer than max_seq_len (e.g. long generation): grow the table
            self._extend_rope(max(end, 2 * self._rope_len), h.device)
        if segment_ids is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("segment_ids (packed rows) go without a cache and without an attention_mask")
            positions, attn_mask = segment_layout(segment_ids)
        else:
            positions, attn_mask = padding_layout(attention_mask, cache, B, start, end)
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
                        loss_only: bool = False) -> ModelOutput:
        """Logits and the loss. labels align with input_ids: position t predicts token t+1; -100 is ignored
        (token id 0 is an ordinary target). loss_only computes logits just where a label is supervised:
        the output head is a large share of a small model's FLOPs and most positions carry no label."""
        aux = self.aux_loss() if self.training else None
        if labels is not None and loss_only:
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


class VisionProj(nn.Module):
    """Linear 768 -> dim. Attribute path `vision_proj.vision_proj.0` as in v1."""

    def __init__(self, vision_dim: int, dim: int, bias: bool):
        super().__init__()
        self.vision_proj = nn.Sequential(nn.Linear(vision_dim, dim, bias=bias))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.vision_proj(features)


class ImageSpliceError(ValueError):
    pass


def find_image_spans(input_ids: torch.Tensor, image_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, start) of every complete image placeholder span (`image_ids`, 50 ids) in input_ids [B, T], in
    row-major order. An opening half that does not start a full span means the placeholder was cut short: an
    ImageSpliceError. The one span search, used by the model's splice and by the dataset's truncation check."""
    B, T = input_ids.shape
    n, half = IMAGE_TOKENS, IMAGE_TOKENS // 2
    if T < half:
        empty = input_ids.new_zeros(0)
        return empty, empty
    image_ids = image_ids.to(input_ids.device)
    first = input_ids.unfold(1, half, 1).eq(image_ids[:half]).all(-1)  # [B, T-24]: 25 opening ids
    full = torch.zeros_like(first)
    if T >= n:
        full[:, : T - n + 1] = input_ids.unfold(1, n, 1).eq(image_ids).all(-1)
    if bool((first & ~full).any()):
        row = int((first & ~full).nonzero()[0, 0])
        raise ImageSpliceError(f"row {row}: an image placeholder span is cut short "
                               f"(needs {n} tokens); it was probably truncated")
    rows, starts = full.nonzero(as_tuple=True)
    return rows, starts


class MiniMindVLM(MiniMindLM):
    """MiniMindLM plus a projection whose outputs replace each 50-token image placeholder span."""

    def __init__(self, config: LMConfig):
        super().__init__(config)
        # Created after the LM init, so it keeps PyTorch's default Linear init (as v1).
        self.vision_proj = VisionProj(config.vision_dim, config.dim, config.vision_proj_bias)
        ids = config.image_ids
        if ids is not None and len(ids) != IMAGE_TOKENS:
            raise ValueError(f"image_ids must hold {IMAGE_TOKENS} ids, got {len(ids)}")
        self.register_buffer("image_ids", torch.tensor(ids if ids is not None else [-1] * IMAGE_TOKENS),
                             persistent=False)

    def find_image_spans(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, start) of every complete placeholder span, in row-major order. Raises on a cut-short span."""
        if self.config.image_ids is None:
            raise ImageSpliceError("config.image_ids is not set: fill it from the tokenizer "
                                   "(model.tokenizer_utils.image_token_ids)")
        return find_image_spans(input_ids, self.image_ids)

    def splice_images(self, h: torch.Tensor, input_ids: torch.Tensor,
                      image_features: Optional[torch.Tensor]) -> torch.Tensor:
        """Replace each placeholder span of h [B, T, dim] with projected features, in one step.

        image_features is [N, 50, vision_dim]: one per span in row-major order, or one per row
        (N == B) when every row holds at most one span (rows without a span skip theirs).
        """
        if image_features is None:
            return h
        if image_features.dim() == 2:
            image_features = image_features.unsqueeze(0)
        rows, starts = self.find_image_spans(input_ids)
        n_spans, n_images = rows.numel(), image_features.shape[0]
        if n_spans == 0:
            return h
        if n_images != n_spans:
            per_row = torch.bincount(rows, minlength=input_ids.shape[0])
            if n_images == input_ids.shape[0] and int(per_row.max()) <= 1:
                image_features = image_features[rows]
            else:
                raise ImageSpliceError(f"{n_spans} image placeholder span(s) but {n_images} image(s) given")
        proj = self.vision_proj(image_features.to(h.dtype)).to(h.dtype)  # [N, 50, dim]
        cols = starts[:, None] + torch.arange(IMAGE_TOKENS, device=h.device)  # [N, 50]
        return h.index_put((rows[:, None].expand_as(cols), cols), proj)

    def forward(self, input_ids: torch.Tensor, image_features: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                loss_only: bool = False, last_only: bool = False,
                attention_mask: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None) -> ModelOutput:
        """logits [B, T, vocab] for every position (and .loss given labels). Two shortcuts skip the output
        head where it is not needed: loss_only keeps the supervised positions ([N, vocab], training) and
        last_only the last position ([B, 1, vocab], generation). attention_mask (1 = token, 0 = padding):
        left padding for generation, right padding for scoring; padded positions are neither attended to
        nor targets of the loss. segment_ids [B, T] marks packed rows (several questions sharing one image:
        dataset.pack_same_image); each question then sees only the image prefix and itself."""
        h = self.splice_images(self.embed(input_ids), input_ids, image_features)
        h = self.run_blocks(h, cache, attention_mask, segment_ids)
        labels = mask_padding_labels(labels, attention_mask)
        return self.logits_and_loss(h[:, -1:] if last_only else h, labels, loss_only)

    # ----------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate_stream(
        self,
        input_ids: torch.Tensor,
        image_features: Optional[torch.Tensor] = None,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        repetition_penalty: float = 1.0,
        eos_token_id: Optional[int] = None,
        use_cache: bool = True,
        generator: Optional[torch.Generator] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token ids [B] one step at a time; stops at eos (not yielded) or max_new_tokens.

        temperature <= 0 is greedy. Rows that reached eos keep yielding eos until all have. Rows of different
        lengths are left-padded, with attention_mask [B, T] marking the real tokens (pad_rows builds both).
        """
        ids = input_ids
        B = ids.shape[0]
        finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
        mask = None if attention_mask is None or bool(attention_mask.bool().all()) else attention_mask.bool()
        cache = None
        if use_cache:
            dtype = next(self.parameters()).dtype
            cache = KVCache(self.config, B, ids.shape[1] + max_new_tokens, ids.device, dtype)
        logits = self(ids, image_features, cache=cache, last_only=True, attention_mask=mask).logits[:, -1]
        for step in range(max_new_tokens):
            # padding is no earlier token of its row: the repetition penalty sees the row's last token there
            seen = ids if mask is None else torch.where(mask, ids, ids[:, -1:])
            next_ids = sample_next(logits.float(), seen, temperature, top_k, top_p, repetition_penalty, generator)
            if eos_token_id is not None:
                next_ids = torch.where(finished, torch.full_like(next_ids, eos_token_id), next_ids)
                finished |= next_ids.eq(eos_token_id)
                if bool(finished.all()):
                    return
            yield next_ids
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            if step == max_new_tokens - 1:
                return
            if cache is not None:  # the cache remembers which of its positions are padding
                logits = self(next_ids[:, None], cache=cache).logits[:, -1]
            else:  # recompute everything, image included
                logits = self(ids, image_features, last_only=True, attention_mask=mask).logits[:, -1]

    def generate(self, input_ids: torch.Tensor, image_features: Optional[torch.Tensor] = None,
                 **kwargs) -> torch.Tensor:
        """The new token ids [B, n] (prompt excluded, eos excluded); same arguments as generate_stream."""
        steps = list(self.generate_stream(input_ids, image_features, **kwargs))
        if not steps:
            return input_ids.new_zeros(input_ids.shape[0], 0)
        return torch.stack(steps, dim=1)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str = "left",
             device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], attention_mask [B, T]) of token rows of different lengths: padded on the left for
    generation (every row's next token comes at the end), on the right for scoring and training."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("pad_rows needs at least one row, and no empty row")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, cols] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def sample_next(logits: torch.Tensor, seen: torch.Tensor, temperature: float, top_k: Optional[int],
                top_p: Optional[float], repetition_penalty: float,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick the next token for each row of logits [B, V]; `seen` [B, T] feeds the repetition penalty."""
    if repetition_penalty != 1.0:
        prev = logits.gather(1, seen)
        # Make already-seen tokens less likely whatever their sign: divide positive, multiply negative.
        logits = logits.scatter(1, seen, torch.where(prev > 0, prev / repetition_penalty, prev * repetition_penalty))
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (the tied embedding/output counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
