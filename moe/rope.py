"""Rotary position embeddings (Su et al. 2021) in the Hugging Face Llama layout."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """RoPE in the Hugging Face Llama layout (the two halves of each head are rotated together)."""

    def __init__(self, head_dim: int, theta: float, linear_factor: float = 1.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        inv_freq = inv_freq / linear_factor  # linear scaling: position p rotates as p / factor did
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)  # derived from config, not saved

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [S] or [B, S] (per row, generation of left-padded rows) -> cos, sin [..., head_dim] in fp32."""
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, S, hd]; rotation in fp32, result in x's dtype."""
    h = x.float()
    x1, x2 = h.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (h * cos + rotated * sin).to(x.dtype)
