"""Routing statistics: a fixed schema of detached numbers per MoE layer.

Shape legend: T tokens, E experts, k choices per token.
"""
from __future__ import annotations

import torch
from torch import Tensor

STAT_KEYS = ("tokens_per_expert", "max_load", "dropped_fraction", "router_entropy", "top1_prob", "dead_experts")


@torch.no_grad()
def routing_stats(probs: Tensor, counts: Tensor, kept: Tensor) -> dict[str, Tensor]:
    """probs [T, E] router probabilities, counts [E] rows per expert after capacity, kept [T, k] bool.

    max_load is the busiest expert's share relative to a perfectly even split (1.0 = balanced, E = collapsed).
    """
    counts = counts.float()
    total = counts.sum().clamp(min=1.0)
    entropy = -(probs * torch.log(probs.clamp(min=1e-20))).sum(-1).mean()
    return {
        "tokens_per_expert": counts,
        "max_load": counts.max() * counts.numel() / total,
        "dropped_fraction": 1.0 - kept.float().mean(),
        "router_entropy": entropy,
        "top1_prob": probs.max(dim=-1).values.mean(),
        "dead_experts": (counts == 0).sum().float(),
    }
