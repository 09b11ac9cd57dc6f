"""Auxiliary router losses. Each returns an unscaled scalar; routers scale them by their coefficients.

Shape legend: T tokens, E experts, k choices per token.
"""
from __future__ import annotations

import torch
from torch import Tensor


def load_balancing_loss(probs: Tensor, expert_idx: Tensor, num_experts: int) -> Tensor:
    """Switch Transformer's E * sum_i f_i * P_i.

    probs [T, E] fp32 router probabilities; expert_idx [T, k] chosen experts (before capacity, as in Switch).
    f_i is the fraction of the T*k assignments sent to expert i, P_i the mean probability of expert i.
    Equals 1 under perfect balance, E when one expert takes everything with certainty.
    """
    counts = torch.bincount(expert_idx.reshape(-1), minlength=num_experts).to(probs.dtype)
    f = counts / expert_idx.numel()
    p = probs.mean(dim=0)
    return num_experts * torch.sum(f * p)


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2, keeping router logits small."""
    return torch.logsumexp(logits, dim=-1).square().mean()
