"""The MiniMind text decoder, read top to bottom:

  RMSNorm -> rotary embedding -> KV cache and attention masks -> Attention (GQA) -> FeedForward (SwiGLU) / MoE
  -> Block -> MiniMindLM (embedding, blocks, final norm, tied output head, loss).

Parameter names and shapes are those of the MiniMind-V v1 release, so v1 checkpoints load strictly. The vision
side (projection, splice, generation) is in vlm.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import LMConfig


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


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (the tied embedding/output counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
