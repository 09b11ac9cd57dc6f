"""Causal self-attention with grouped-query heads, through scaled_dot_product_attention.

Shape legend: B batch, S sequence (new tokens), P cached slots, d model width, H query heads, G key/value heads,
hd head width.

Generation (moe.generation) passes a LayerKV (moe.kv_cache): the new keys and values are appended to it and the
queries attend to all P+S filled slots. Keys are cached after RoPE, so a cached key keeps the rotation of its own
position and a step rotates only its new keys. GQA caches the G key/value heads, not H: the cache is H/G times
smaller, and scaled_dot_product_attention repeats the heads itself (enable_gqa).
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from moe.config import ModelConfig
from moe.kv_cache import LayerKV
from moe.rope import apply_rotary


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

    def forward(self, x: Tensor, rope: Optional[tuple[Tensor, Tensor]] = None, kv: Optional[LayerKV] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        """x [B, S, d]; rope: cos, sin [S, hd] or [B, 1, S, hd] (per-row positions); kv: the layer's cache, appended
        to; mask [B or 1, 1, S, P+S] bool (True: may attend), None: causal without a cache, every cached slot for
        one new token (moe.kv_cache.positions_and_mask decides)."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_head, self.hd).transpose(1, 2)  # [B, H, S, hd]
        k = self.k_proj(x).view(B, S, self.n_kv, self.hd).transpose(1, 2)  # [B, G, S, hd]
        v = self.v_proj(x).view(B, S, self.n_kv, self.hd).transpose(1, 2)  # [B, G, S, hd]
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        past = 0
        if kv is not None:
            past = kv.length
            k, v = kv.append(k, v)  # [B, G, P+S, hd]
        # is_causal aligns the mask top-left, right only when queries and keys start together (P = 0); after a
        # past the caller's mask says what a query sees (None for one query: every slot).
        causal = mask is None and past == 0 and S > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv != self.n_head,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.n_head * self.hd))
