"""Fused top-k gating: router logits -> (probs, combine weights, chosen experts) in one Triton kernel.

Shape legend: T tokens, E experts, k choices per token, BLOCK_T rows per program, BLOCK_E = E padded to a power
of two (the padding columns are masked to -inf, so they never win and add nothing to the softmax).

`fused_topk_gating(logits, top_k, order, renormalize)` has the signature and results of routing.topk.topk_gating,
so a router runs it as its RouterKernels.topk (MoELayer passes it when its dispatcher resolves to `triton`):

    probs  [T, E] fp32  softmax over all experts (the load-balancing loss and the statistics need it)
    weight [T, k] fp32  "topk_softmax": softmax over the k chosen logits (Mixtral);
                        "softmax_topk": the chosen probs, divided by their sum when renormalize (GShard, Switch)
    index  [T, k] long  chosen experts, best first

One program reads a block of rows once and does the softmax, the k selection passes and the weights in registers;
torch's version makes ~6 passes over [T, E] (softmax, topk, gather, second softmax) plus their launches.

Selection and ties: both orders select on the logits (softmax is monotonic, so the choice is the same as a top-k of
the probs, except where two different logits round to the same probability). Among equal values the lowest expert
index wins, i.e. the order of torch.sort(descending=True, stable=True). torch.topk has no documented tie rule: on
CUDA it returns this order in practice, on CPU its partial sort may return another permutation of the tied experts,
so exact ties (a zero-initialised gate) can pick different experts than torch's CPU top-k, with the same weights.
NaN logits are not supported (torch ranks NaN above everything; here a NaN row gives undefined choices).

Autograd: weight and probs are differentiable w.r.t. the logits; the backward is plain torch math on the saved
probs (a few [T, E] elementwise ops, no kernel), the index output is not differentiable.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moe.kernels import INSTALL_HINT, interpret_mode, next_pow2

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - the dispatcher checks triton_status() before importing this module
    raise ImportError(f"moe.kernels.gating needs triton: {INSTALL_HINT}") from e

ORDERS = ("topk_softmax", "softmax_topk")


@triton.jit
def _topk_gating_kernel(
    logits_ptr, probs_ptr, weight_ptr, index_ptr,
    T, E, stride_t,
    K: tl.constexpr, K_PAD: tl.constexpr, SOFTMAX_FIRST: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    cols = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    row_ok = rows < T
    col_ok = cols < E
    # Rows past T read row T-1 (their results are never stored): no -inf-only rows, so no NaN from -inf - -inf.
    safe_rows = tl.minimum(rows, T - 1)
    x = tl.load(logits_ptr + safe_rows[:, None] * stride_t + cols[None, :], mask=col_ok[None, :],
                other=float("-inf"))  # [BLOCK_T, BLOCK_E]

    # softmax over the E experts (padding columns are -inf: exp gives 0)
    m = tl.max(x, axis=1)  # [BLOCK_T]
    ex = tl.exp(x - m[:, None])
    p = ex / tl.sum(ex, axis=1)[:, None]
    out_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(probs_ptr + rows[:, None] * E + cols[None, :], p, mask=out_mask)

    # k selection passes: the best remaining logit, lowest column among ties, then take it out of `avail`.
    kcols = tl.arange(0, K_PAD)  # [K_PAD]
    avail = col_ok[None, :] & (rows[:, None] >= 0)  # [BLOCK_T, BLOCK_E] (the second term only broadcasts)
    sel_index = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    sel_value = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)  # exp(logit - max) or the chosen prob
    total = tl.zeros([BLOCK_T], dtype=tl.float32)
    for j in tl.static_range(K):
        xm = tl.where(avail, x, float("-inf"))
        best = tl.max(xm, axis=1)  # [BLOCK_T]
        is_best = avail & (xm == best[:, None])
        choice = tl.min(tl.where(is_best, cols[None, :], BLOCK_E), axis=1)  # [BLOCK_T] int32
        chosen = cols[None, :] == choice[:, None]
        avail = avail & (~chosen)
        if SOFTMAX_FIRST:
            value = tl.sum(tl.where(chosen, p, 0.0), axis=1)
        else:
            value = tl.exp(best - m)  # softmax over the k chosen logits; the first chosen is the row max
        total += value
        here = kcols[None, :] == j
        sel_index = tl.where(here, choice[:, None], sel_index)
        sel_value = tl.where(here, value[:, None], sel_value)

    if SOFTMAX_FIRST:
        if RENORMALIZE:
            sel_value = sel_value / total[:, None]
    else:
        sel_value = sel_value / total[:, None]
    k_mask = row_ok[:, None] & (kcols[None, :] < K)
    tl.store(weight_ptr + rows[:, None] * K + kcols[None, :], sel_value, mask=k_mask)
    tl.store(index_ptr + rows[:, None] * K + kcols[None, :], sel_index.to(tl.int64), mask=k_mask)


def _block_rows(T: int, block_e: int) -> int:
    # ~8K live fp32 values per program on a GPU; the interpreter pays per program, so it takes far bigger blocks.
    budget = 1 << 18 if interpret_mode() else 1 << 13
    return max(1, min(next_pow2(T), budget // block_e))


def topk_gating_forward(logits: Tensor, top_k: int, order: str, renormalize: bool,
                        block_t: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel alone, no autograd: logits [T, E] fp32 -> probs [T, E], weight [T, k], index [T, k].
    block_t (a power of two) overrides the rows per program (tests use it to cover several programs)."""
    if order not in ORDERS:
        raise ValueError(f"model.moe.router.order={order!r} must be one of {ORDERS}")
    if logits.dim() != 2:
        raise ValueError(f"router logits must be [T, E], got shape {tuple(logits.shape)}")
    T, E = logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"model.moe.router.top_k={top_k} must be between 1 and the number of experts {E}")
    logits = logits.float()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    probs = logits.new_empty(T, E)
    weight = logits.new_empty(T, top_k)
    index = torch.empty(T, top_k, dtype=torch.long, device=logits.device)
    if T == 0:
        return probs, weight, index
    block_e = next_pow2(E)
    block_t = block_t or _block_rows(T, block_e)
    grid = (triton.cdiv(T, block_t),)
    _topk_gating_kernel[grid](
        logits, probs, weight, index, T, E, logits.stride(0),
        K=top_k, K_PAD=next_pow2(top_k), SOFTMAX_FIRST=order == "softmax_topk", RENORMALIZE=bool(renormalize),
        BLOCK_T=block_t, BLOCK_E=block_e,
    )
    return probs, weight, index


class _TopKGating(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, top_k: int, order: str, renormalize: bool):
        probs, weight, index = topk_gating_forward(logits, top_k, order, renormalize)
        ctx.save_for_backward(probs, weight, index)
        ctx.order, ctx.renormalize = order, renormalize
        ctx.mark_non_differentiable(index)
        return probs, weight, index

    @staticmethod
    def backward(ctx, g_probs, g_weight, _g_index):
        probs, weight, index = ctx.saved_tensors
        # d softmax: grad_in = p * (g - <g, p>), row by row.
        if ctx.order == "topk_softmax":
            # weight = softmax(logits[index]): its gradient lands on the k chosen logits only.
            grad = torch.zeros_like(probs)
            if g_weight is not None:
                g_sel = weight * (g_weight - (g_weight * weight).sum(-1, keepdim=True))
                grad.scatter_add_(1, index, g_sel)
            if g_probs is not None:
                grad += probs * (g_probs - (g_probs * probs).sum(-1, keepdim=True))
            return grad, None, None, None
        # softmax_topk: weight = probs[index] (/ their sum): gradient to probs, then through the softmax.
        g_p = torch.zeros_like(probs) if g_probs is None else g_probs.clone()
        if g_weight is not None:
            if ctx.renormalize:
                total = probs.gather(1, index).sum(-1, keepdim=True)
                g_sel = (g_weight - (g_weight * weight).sum(-1, keepdim=True)) / total
            else:
                g_sel = g_weight
            g_p.scatter_add_(1, index, g_sel)
        return probs * (g_p - (g_p * probs).sum(-1, keepdim=True)), None, None, None


def fused_topk_gating(logits: Tensor, top_k: int, order: str, renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """logits [T, E] fp32 -> (probs [T, E], weight [T, k], expert_idx [T, k]); routing.topk.topk_gating's contract."""
    return _TopKGating.apply(logits, top_k, order, renormalize)


__all__ = ["fused_topk_gating", "topk_gating_forward"]
