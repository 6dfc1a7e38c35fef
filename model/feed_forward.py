"""The blocks' feed-forward layers: SwiGLU (FeedForward) and its mixture-of-experts form (MOEFeedForward, routed
by MoEGate), with the v1 parameter names.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import LMConfig


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
        self.normalise_single = config.generation == "3v"  # 3v divides by the sum for top-1 too (weight 1)
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, T, dim] -> (expert index [N, k], weight [N, k], aux loss) for N = B*T tokens."""
        B, T, _ = x.shape
        scores = F.linear(x.reshape(-1, x.shape[-1]), self.weight).softmax(dim=-1)
        weight, index = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.norm_topk_prob and (self.top_k > 1 or self.normalise_single):
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
