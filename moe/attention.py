"""Causal self-attention with grouped-query heads, through scaled_dot_product_attention.

Shape legend: B batch, S sequence (new tokens), P cached slots, d model width, H query heads, G key/value heads,
hd head width.

Generation (moe.generation) passes a LayerKV (moe.kv_cache): the new keys and values are appended to it and the
queries attend to all P+S filled slots. Keys are cached after RoPE, so a cached key keeps the rotation of its own
position and a step rotates only its new keys. GQA caches the G key/value heads, not H: the cache is H/G times
smaller, and scaled_dot_product_attention repeats the heads itself (enable_gqa).

Family options (moe.config): qk_norm norms each head's q and k before RoPE (Gemma 3); attn_scale replaces
1/sqrt(hd) (Gemma's query_pre_attn_scalar, GPT-Neo's unscaled scores); attn_softcap squashes the scores with
c * tanh(s / c) before the mask (Gemma 2), which scaled_dot_product_attention cannot do, so those models take
the explicit path (_softcapped), the same arithmetic as transformers' eager attention. Sliding windows and ALiBi
arrive in the mask (moe.attention_masks).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.attention_masks import causal_mask
from moe.config import ModelConfig
from moe.kv_cache import LayerKV
from moe.norms import RMSNorm
from moe.rope import apply_rotary


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.kv_heads, cfg.dim_per_head
        qkv_bias = cfg.attn_bias in ("all", "qkv")
        self.q_proj = nn.Linear(cfg.d_model, self.n_head * self.hd, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.d_model, bias=cfg.attn_bias in ("all", "o"))
        self.q_norm = RMSNorm(self.hd, cfg.norm_eps, cfg.norm_unit_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.norm_eps, cfg.norm_unit_offset) if cfg.qk_norm else None
        self.scale = cfg.attn_scale  # None: scaled_dot_product_attention's 1/sqrt(hd)
        self.softcap = cfg.attn_softcap
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, rope: Optional[tuple[Tensor, Tensor]] = None, kv: Optional[LayerKV] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        """x [B, S, d]; rope: cos, sin [S, hd] or [B, 1, S, hd] (per-row positions); kv: the layer's cache, appended
        to; mask [B or 1, 1 or H, S, P+S], bool (True: may attend) or float (added to the scores: ALiBi), None:
        causal without a cache, every cached slot for one new token (moe.attention_masks decides)."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_head, self.hd).transpose(1, 2)  # [B, H, S, hd]
        k = self.k_proj(x).view(B, S, self.n_kv, self.hd).transpose(1, 2)  # [B, G, S, hd]
        v = self.v_proj(x).view(B, S, self.n_kv, self.hd).transpose(1, 2)  # [B, G, S, hd]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        past = 0
        if kv is not None:
            past = kv.length
            k, v = kv.append(k, v)  # [B, G, P+S, hd]
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)  # scaled_dot_product_attention wants a float mask in the queries' dtype
        if self.softcap is not None:
            y = self._softcapped(q, k, v, mask, past)
        else:
            # is_causal aligns the mask top-left, right only when queries and keys start together (P = 0); after a
            # past the caller's mask says what a query sees (None for one query: every slot).
            causal = mask is None and past == 0 and S > 1
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0,
                scale=self.scale, enable_gqa=self.n_kv != self.n_head,
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.n_head * self.hd))

    def _softcapped(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], past: int) -> Tensor:
        """Attention with soft-capped scores: softmax(c tanh(q k^T scale / c) + mask) v, the softmax in fp32."""
        S = q.shape[2]
        if self.n_kv != self.n_head:  # [B, G, P+S, hd] -> [B, H, P+S, hd]
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        scale = self.scale if self.scale is not None else self.hd ** -0.5
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, S, P+S]
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is None and past == 0 and S > 1:
            mask = causal_mask(0, S, q.device)
        if mask is not None:
            scores = scores + mask if mask.is_floating_point() else scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=self.dropout, training=self.training)
        return torch.matmul(probs, v)  # [B, H, S, hd]
