"""ALiBi (Press et al. 2022, "Train Short, Test Long"): no position embeddings; each head adds -m_h * distance to its
attention scores, with a geometric sequence of slopes m_h (BLOOM, MPT).

Shape legend: H query heads, S new tokens, P cached slots (keys are P+S slots).

The bias depends only on the distance between a query's slot and a key's slot, -m_h * (i - j). BLOOM adds
m_h * j instead (its key's position); the two differ by -m_h * i, the same for every key of a query, which the
softmax cancels, so logits agree to round-off. The relative form needs no positions: a left-padded row's
distances are its slots' distances, and a KV cache adds nothing to remember.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def alibi_slopes(n_head: int, device: torch.device | None = None) -> Tensor:
    """[H] fp32: 2^(-8 h / n) for h = 1..n with n the largest power of two <= H; the heads beyond it take every
    other slope of the sequence for 2n (the paper's rule for head counts that are not powers of two, as BLOOM)."""
    n = 2 ** math.floor(math.log2(n_head))
    slopes = [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]
    if n != n_head:
        slopes += [2.0 ** (-8.0 * h / (2 * n)) for h in range(1, 2 * (n_head - n), 2)]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def alibi_bias(slopes: Tensor, past: int, new: int) -> Tensor:
    """slopes [H] -> the additive score bias [H, S, P+S] fp32 of S queries at slots P..P+S-1 over keys 0..P+S-1:
    -m_h * (i - j); above the diagonal (j > i) it is positive, and the causal mask removes it."""
    q = torch.arange(past, past + new, device=slopes.device, dtype=torch.float32)  # [S]
    k = torch.arange(past + new, device=slopes.device, dtype=torch.float32)  # [P+S]
    return -slopes[:, None, None] * (q[:, None] - k[None, :])[None]
