"""The weight gradients of the Triton grouped GEMMs: per expert, a[rows of e]^T @ (s b)[rows of e].

Shape legend: E experts, N plan rows sorted by expert, P x Q one expert's weight, row_token [N] the token of
each row.

One program per (expert, weight tile) loops over that expert's rows, gathering x (or grad_y) rows through
row_token inside the kernel; the bias gradient is the column sum of the same tiles, fused in and computed only by
the programs of the first P tile (the ones that store it). The combine weight s scales the A side (rows of h),
which the MMA may take from registers. An empty expert runs zero iterations and writes zeros.
Up projection: a = x (gathered), b1, b2 = gradients of the up / gate pre-activations.
Down projection: a = h, b1 = grad_y (gathered), s = the combine weight.
"""
from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from moe.kernels.combine import round_to
from moe.kernels.gemm_tiles import GemmBlocks, launch_opts, mma
from moe.kernels.tile_configs import tiles_for


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr, a_index_ptr, b1_ptr, b2_ptr, b_index_ptr, scale_ptr, offsets_ptr, dw1_ptr, dw2_ptr, db1_ptr, db2_ptr,
    P, Q,
    stride_am, stride_bm, stride_we, stride_wp, stride_be,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr, TWO: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dw[e] = sum over rows r of e of a[ia(r)]^T (s_r b[ib(r)]), one (P tile, Q tile) of one expert; db[e] the
    column sums of s_r b[ib(r)]. ia / ib are row_token when gathering, else r; s is the combine weight or 1.
    Up projection: a = x (gathered), b1, b2 = grad of the up / gate pre-activations.
    Down projection: a = h, b1 = grad_y (gathered), s = row_weight."""
    e = tl.program_id(1)
    n_q = tl.cdiv(Q, BLOCK_Q)
    p_tile = tl.program_id(0) // n_q
    ps = p_tile * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = tl.max_contiguous(tl.multiple_of((tl.program_id(0) % n_q) * BLOCK_Q + tl.arange(0, BLOCK_Q), BLOCK_Q),
                           BLOCK_Q)
    p_mask = ps < P
    q_mask = qs < Q
    lo = tl.load(offsets_ptr + e).to(tl.int64)
    hi = tl.load(offsets_ptr + e + 1).to(tl.int64)
    acc1 = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    db1 = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    db2 = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_R):  # this expert's rows only; none for an empty expert
        rows = r0 + tl.arange(0, BLOCK_R)
        r_mask = rows < hi
        if A_GATHER:
            a_rows = tl.load(a_index_ptr + rows, mask=r_mask, other=0).to(tl.int64)
        else:
            a_rows = rows
        if B_GATHER:
            b_rows = tl.load(b_index_ptr + rows, mask=r_mask, other=0).to(tl.int64)
        else:
            b_rows = rows
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ps[None, :], mask=r_mask[:, None] & p_mask[None, :],
                    other=0.0)  # [rows, P tile]
        if HAS_SCALE:
            # The combine weight scales the A side (fp32, back to the operand dtype): the MMA's A operand may come
            # from registers on Hopper, where a scaled B tile would go back through shared memory every iteration.
            s = tl.load(scale_ptr + rows, mask=r_mask, other=0.0).to(tl.float32)
            a = round_to(a.to(tl.float32) * s[:, None], a_ptr.dtype.element_ty, INTERPRETED)
        b_mask = r_mask[:, None] & q_mask[None, :]
        b1 = tl.load(b1_ptr + b_rows[:, None] * stride_bm + qs[None, :], mask=b_mask, other=0.0)
        acc1 = mma(tl.trans(a), b1, acc1, PRECISION, INTERPRETED)
        if TWO:  # GLU: the gate's gradient shares the loaded x tile
            b2 = tl.load(b2_ptr + b_rows[:, None] * stride_bm + qs[None, :], mask=b_mask, other=0.0)
            acc2 = mma(tl.trans(a), b2, acc2, PRECISION, INTERPRETED)
        if HAS_BIAS:
            if p_tile == 0:  # only the first P tile's programs store the bias sums, so only they compute them
                b1f = b1.to(tl.float32)
                if HAS_SCALE:
                    b1f = b1f * s[:, None]
                db1 += tl.sum(b1f, 0)
                if TWO:
                    db2 += tl.sum(b2.to(tl.float32), 0)
    w_off = e.to(tl.int64) * stride_we + ps[:, None] * stride_wp + qs[None, :]
    w_mask = p_mask[:, None] & q_mask[None, :]
    tl.store(dw1_ptr + w_off, round_to(acc1, dw1_ptr.dtype.element_ty, INTERPRETED), mask=w_mask)
    if TWO:
        tl.store(dw2_ptr + w_off, round_to(acc2, dw2_ptr.dtype.element_ty, INTERPRETED), mask=w_mask)
    if HAS_BIAS:
        # Only the first P tile's programs write it (the row-vector form keeps the interpreter's mask boolean).
        b_mask = q_mask & ((tl.zeros((BLOCK_Q,), dtype=tl.int32) + p_tile) == 0)
        tl.store(db1_ptr + e * stride_be + qs, round_to(db1, db1_ptr.dtype.element_ty, INTERPRETED), mask=b_mask)
        if TWO:
            db2 = round_to(db2, db2_ptr.dtype.element_ty, INTERPRETED)
            tl.store(db2_ptr + e * stride_be + qs, db2, mask=b_mask)


def grouped_wgrad(a: Tensor, a_index: Optional[Tensor], b1: Tensor, b2: Optional[Tensor], b_index: Optional[Tensor],
                  scale: Optional[Tensor], offsets: Tensor, num_experts: int, with_bias: bool,
                  blocks: Optional[GemmBlocks] = None
                  ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """dw1[e] = a[rows of e]^T @ (s b1)[rows of e] (and dw2 from b2), db = column sums: [E, P, Q], [E, Q].
    Tiles (block_m × block_n of the weight, block_k plan rows per iteration): the caller's, else tuned/default."""
    P, Q, E = a.shape[1], b1.shape[1], num_experts
    kernel = "wgrad_up_glu" if b2 is not None else "wgrad_up" if a_index is not None else "wgrad_down"
    index = a_index if a_index is not None else b_index
    n_rows = index.numel() if index is not None else a.shape[0]  # plan rows N (gathered operands have T rows)
    blocks = tiles_for(kernel, blocks, a, n_rows, P, Q)
    dw1 = a.new_empty(E, P, Q)
    dw2 = a.new_empty(E, P, Q) if b2 is not None else None
    db1 = a.new_empty(E, Q) if with_bias else None
    db2 = a.new_empty(E, Q) if with_bias and b2 is not None else None
    grid = (triton.cdiv(P, blocks.block_m) * triton.cdiv(Q, blocks.block_n), E)
    _grouped_wgrad_kernel[grid](
        a, a if a_index is None else a_index, b1, b1 if b2 is None else b2, b1 if b_index is None else b_index,
        b1 if scale is None else scale, offsets, dw1, dw1 if dw2 is None else dw2,
        dw1 if db1 is None else db1, dw1 if db2 is None else db2,
        P, Q, a.stride(0), b1.stride(0), dw1.stride(0), dw1.stride(1), Q,
        A_GATHER=a_index is not None, B_GATHER=b_index is not None, HAS_SCALE=scale is not None,
        TWO=b2 is not None, HAS_BIAS=with_bias,
        BLOCK_P=blocks.block_m, BLOCK_Q=blocks.block_n, BLOCK_R=blocks.block_k, **launch_opts(a, blocks))
    return dw1, dw2, db1, db2
