"""Causal self-attention with grouped-query heads, through scaled_dot_product_attention.

Shape legend: B batch, S sequence, d model width, H query heads, G key/value heads, hd head width.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from moe.config import ModelConfig
from moe.layers import apply_rotary


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.kv_heads, cfg.dim_per_head
        qkv_bias = cfg.attn_bias in ("all", "qkv")
        self.q_proj = nn.Linear(cfg.d_model, self.n_head * self.hd, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.d_model, bias=cfg.attn_bias == "all")
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, rope: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_head, self.hd).transpose(1, 2)  # [B, H, S, hd]
        k = self.k_proj(x).view(B, S, self.n_kv, self.hd).transpose(1, 2)  # [B, G, S, hd]
        v = self.v_proj(x).view(B, S, self.n_kv, self.hd).transpose(1, 2)  # [B, G, S, hd]
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv != self.n_head
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.n_head * self.hd))
