"""Normalisation layers of the backbone: RMSNorm (Llama family; Gemma's (1 + w) form) and LayerNorm (GPT-2, OPT)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama family); computed in fp32 for stability like the reference models.

    unit_offset: scale by (1 + weight) with the weight initialised to 0 (Gemma), so that a zero weight is the
    identity scale; Gemma multiplies in fp32 before casting back, Llama casts first (the order matters in bf16)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


def make_norm(kind: str, dim: int, eps: float, unit_offset: bool = False) -> nn.Module:
    return RMSNorm(dim, eps, unit_offset) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)
