"""See inside the model: how much attention answer tokens pay to the 50 image positions, per layer and head.

The normal forward (model/decoder.py) uses PyTorch's fused scaled_dot_product_attention, which never builds the
attention weights. `inspect_attention` runs the same blocks with the same parameters, but writes attention out
by hand, softmax(q k^T / sqrt(head_dim)) under the causal mask, and keeps the weight rows of chosen query
positions. It runs only on request (scripts/inspect_attention.py, the web demo's "inside the model" panel), so
the fast path is unchanged. Its logits match the normal forward's, which the tests check.

Which query goes with an answer token: position p's output predicts token p + 1, so the attention that
produced answer token i is the attention of the position just before it (the last prompt token for the first
answer token).

The 50 image positions hold CLIP's CLS token then the 7x7 patches in row-major order; the image was resized to
224x224 without cropping, so patch (r, c) covers the r-th seventh of the image's height and c-th of its width.
minimind-3v: the 64 image positions (a run of <|image_pad|>) hold SigLIP2's 8x8 patches of the 256x256 image, in
row-major order, with no CLS (its cls_weight is 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from model.config import IMAGE_TOKENS
from model.decoder import Attention, rope_tables
from model.vlm import MiniMindVLM, find_image_runs

PATCH_GRID = 7  # ViT-B/32 on 224x224: 7x7 patches after the CLS token


@dataclass
class AttentionMaps:
    """Attention weights of some query positions of one sequence.

    weights[layer, head, q, key] is the weight query_positions[q] gives key position `key` (float32; each row
    sums to 1 over keys 0..query_positions[q] and is 0 on later keys). image_start is the first of the 50
    image positions, or None when the sequence holds no image. logits are those of every position. image_tokens
    and cls_tokens: v1's 50 positions begin with CLS (1), 3v's 64 are all patches (0).
    """

    weights: torch.Tensor
    query_positions: list[int]
    image_start: Optional[int]
    logits: torch.Tensor
    image_tokens: int = IMAGE_TOKENS
    cls_tokens: int = 1

    @property
    def grid_side(self) -> int:
        """Patches per row and column: 7 (v1, CLIP ViT-B/32 on 224), 8 (3v, SigLIP2 patch 32 on 256)."""
        return math.isqrt(self.image_tokens - self.cls_tokens)

    @property
    def n_layers(self) -> int:
        return self.weights.shape[0]

    def image_weights(self) -> torch.Tensor:
        """[layers, heads, queries, image_tokens]: v1 the weights on CLS then the 49 patches, 3v on the 64 patches."""
        if self.image_start is None:
            raise ValueError("the inspected sequence holds no image placeholder")
        return self.weights[..., self.image_start:self.image_start + self.image_tokens]

    def image_share(self) -> torch.Tensor:
        """[layers]: the share of attention that goes to the image positions (the rest goes to text), averaged
        over heads and the query positions."""
        return self.image_weights().sum(-1).mean(dim=(1, 2))

    def patch_grid(self, layer: Optional[int] = None, query: Optional[int] = None) -> torch.Tensor:
        """[7, 7] (3v: [8, 8]): the attention weight on each patch, averaged over heads, and over all layers unless
        `layer` is given and all query positions unless `query` (an index into query_positions) is given."""
        w = self.image_weights()[..., self.cls_tokens:]  # drop CLS (v1)
        w = w[layer:layer + 1] if layer is not None else w
        w = w[:, :, query:query + 1] if query is not None else w
        return w.mean(dim=(0, 1, 2)).reshape(self.grid_side, self.grid_side)

    def cls_weight(self, layer: Optional[int] = None, query: Optional[int] = None) -> float:
        """The weight on the CLS position, averaged like patch_grid (0.0 for 3v, which has none)."""
        if not self.cls_tokens:
            return 0.0
        w = self.image_weights()[..., 0]
        w = w[layer:layer + 1] if layer is not None else w
        w = w[:, :, query:query + 1] if query is not None else w
        return float(w.mean())


def explicit_attention(attention: Attention, x: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What Attention.forward computes for a whole causal sequence x [B, T, dim] (no cache), written out:
    (its output [B, T, dim], the attention weights [B, heads, T, T] in float32)."""
    B, T, _ = x.shape
    q, k, v = attention.rotated_qkv(x, (cos, sin))
    group = attention.n_heads // attention.n_kv_heads  # query head h reads kv head h // group
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    q, k, v = q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float()
    scores = q @ k.transpose(-2, -1) / math.sqrt(attention.head_dim)
    future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    out = (weights @ v).to(x.dtype).transpose(1, 2).reshape(B, T, -1)
    return attention.wo(out), weights


@torch.no_grad()
def inspect_attention(model: MiniMindVLM, input_ids: torch.Tensor, image_features: Optional[torch.Tensor] = None,
                      query_positions: Optional[Sequence[int]] = None) -> AttentionMaps:
    """Run one sequence input_ids [T] or [1, T] (with its image features, as the normal forward takes them)
    through the model with explicit attention; keep the weights of query_positions (default: all)."""
    if model.training:
        raise ValueError("inspect_attention needs the model in eval mode (dropout would change the weights)")
    ids = input_ids.reshape(1, -1).to(model.image_ids.device)
    T = ids.shape[1]
    queries = list(range(T)) if query_positions is None else [int(p) for p in query_positions]
    bad = [p for p in queries if not 0 <= p < T]
    if bad:
        raise ValueError(f"query positions {bad} are outside the sequence of {T} tokens")
    v3 = model.config.generation == "3v"
    # the first image: v1's 50-id span, or 3v's first run of <|image_pad|>
    _, starts = find_image_runs(ids, int(model.image_ids[0]))[:2] if v3 else model.find_image_spans(ids)
    image_start = int(starts[0]) if image_features is not None and starts.numel() else None

    h = model.splice_images(model.embed(ids), ids, image_features)
    cos, sin = rope_tables(model.config.head_dim, T, model.config.rope_theta, ids.device,
                           yarn=model.config.rope_yarn if v3 else None)  # the tables the model's forward uses
    kept = []
    index = torch.tensor(queries, device=ids.device)
    for block in model.layers:  # Block.forward, with the attention written out
        out, weights = explicit_attention(block.attention, block.attention_norm(h), cos, sin)
        kept.append(weights[0].index_select(1, index))
        h = h + out
        h = h + block.feed_forward(block.ffn_norm(h))
    logits = model.output(model.norm(h))[0]
    return AttentionMaps(torch.stack(kept), queries, image_start, logits, model.config.image_tokens,
                         0 if v3 else 1)


def answer_query_positions(prompt_len: int, n_answer: int) -> list[int]:
    """The query positions that produced each of n_answer tokens following a prompt of prompt_len tokens."""
    return list(range(prompt_len - 1, prompt_len - 1 + n_answer))


def inspect_answer(model: MiniMindVLM, prompt_ids: Sequence[int], answer_ids: Sequence[int],
                   image_features: Optional[torch.Tensor]) -> AttentionMaps:
    """Attention of the positions that produced each answer token (teacher-forced on prompt + answer)."""
    if not answer_ids:
        raise ValueError("the answer is empty: there is no answer token to inspect")
    ids = torch.tensor([*prompt_ids, *answer_ids[:-1]])  # the last answer token is produced, never read
    return inspect_attention(model, ids, image_features, answer_query_positions(len(prompt_ids), len(answer_ids)))

