"""Stacked projections, swapped into a loaded model from the outside: the layers of a block that read the same input
(an attention's wq, wk, wv; a SwiGLU's w1, w3) become one layer each, in modules of the same interface.

One matrix-vector product over the stacked weights streams them faster than two or three small ones, and it is one
call instead of several (each eager call has a fixed cost). Each output is the same dot product as before, so the
logits are those of the plain model up to summation order. The network (model/) knows nothing of this: each
Attention becomes a StackedQKVAttention (its rotated_qkv runs one stacked linear) and each FeedForward, MoE experts
included, a StackedSwiGLU (its forward runs one stacked linear); everything else of the module is shared with the
module it replaces.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.decoder import Attention, apply_rope
from model.feed_forward import FeedForward

Swap = tuple[nn.Module, str, nn.Module, nn.Module]  # (parent, attribute, module as loaded, its stacked form)


def _like(module: nn.Module, cls: type) -> nn.Module:
    """A new `cls` holding what `module` holds (its attributes, and its own dicts of parameters, buffers and
    children, copied one level so that changing the new one leaves `module` as it was)."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, (dict, set)) else v) for k, v in module.__dict__.items()})
    return new


def stack_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One bias-free linear whose output is the outputs of `linears` one after the other (inference only)."""
    if any(lin.bias is not None for lin in linears):
        raise ValueError("stacked projections take linear layers without a bias")
    # built on the meta device: no weight is allocated and initialised only to be replaced
    stacked = nn.Linear(linears[0].in_features, sum(lin.out_features for lin in linears), bias=False, device="meta")
    with torch.no_grad():
        stacked.weight = nn.Parameter(torch.cat([lin.weight for lin in linears]), requires_grad=False)
    return stacked


class StackedQKVAttention(Attention):
    """Attention whose queries, keys and values come from one stacked linear, wqkv."""

    @classmethod
    def from_attention(cls, attention: Attention) -> "StackedQKVAttention":
        new = _like(attention, cls)
        new.wqkv = stack_linears([attention.wq, attention.wk, attention.wv])
        for name in ("wq", "wk", "wv"):
            del new._modules[name]
        return new

    def rotated_qkv(self, x: torch.Tensor, rope: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        kv_width = self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim, kv_width, kv_width], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        # the rest as Attention.rotated_qkv: per-head norms where the generation has them, then the rotation
        if getattr(self, "q_norm", None) is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        rotate = getattr(self, "rope", apply_rope)
        return rotate(q, *rope), rotate(k, *rope), v


class StackedSwiGLU(FeedForward):
    """SwiGLU whose gate and up projections come from one stacked linear, w13."""

    @classmethod
    def from_feed_forward(cls, ffn: FeedForward) -> "StackedSwiGLU":
        new = _like(ffn, cls)
        new.w13 = stack_linears([ffn.w1, ffn.w3])
        for name in ("w1", "w3"):
            del new._modules[name]
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.dropout(self.w2(F.silu(gate) * up))


def _stacked_form(module: nn.Module):
    """The stacked form of an attention or SwiGLU whose projections are still separate plain linears, else None."""
    if type(module) is Attention and all(isinstance(getattr(module, p, None), nn.Linear) for p in ("wq", "wk", "wv")):
        return StackedQKVAttention.from_attention(module)
    if type(module) is FeedForward and all(isinstance(getattr(module, p, None), nn.Linear) for p in ("w1", "w3")):
        return StackedSwiGLU.from_feed_forward(module)
    return None


def stacked_swaps(model: nn.Module) -> list[Swap]:
    """(parent, attribute, module, a stacked form of it) for every attention and SwiGLU of the blocks (MoE experts
    included; a module stacked already gets a copy of itself that shares its layers); nothing is swapped yet.
    Builds each stacked weight, so it holds a copy of those projections."""
    swaps = []
    for parent in list(model.layers.modules()):
        for name, child in parent.named_children():
            stacked = _stacked_form(child)
            if stacked is None and isinstance(child, (StackedQKVAttention, StackedSwiGLU)):
                stacked = _like(child, type(child))
            if stacked is not None:
                swaps.append((parent, name, child, stacked))
    return swaps


def stack_projections(model: nn.Module) -> None:
    """Swap every attention and SwiGLU of the blocks for its stacked form, in place, one module at a time (each
    separate weight is released as its stacked copy takes over)."""
    for parent in list(model.layers.modules()):
        for name, child in list(parent.named_children()):
            stacked = _stacked_form(child)
            if stacked is not None:
                setattr(parent, name, stacked)


def is_stacked(model: nn.Module) -> bool:
    """Whether the blocks run stacked projections."""
    return any(isinstance(m, (StackedQKVAttention, StackedSwiGLU)) for m in model.layers.modules())
