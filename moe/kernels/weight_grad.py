"""The weight gradients of the Triton grouped GEMMs: per expert, a[rows of e]^T @ (s b)[rows of e].

Shape legend: E experts, N plan rows sorted by expert, P x Q one expert's weight, row_token [N] the token of
each row, C split-K chunks (at most cdiv(N, S) + E - 1 for chunks of S rows).

One program per (expert, weight tile) loops over that expert's rows, gathering x (or grad_y) rows through
row_token inside the kernel; the bias gradient is the column sum of the same tiles, fused in and computed only by
the programs of the first P tile (the ones that store it). The combine weight s scales the A side (rows of h),
which the MMA may take from registers. An empty expert runs zero iterations and writes zeros.
Up projection: a = x (gathered), b1, b2 = gradients of the up / gate pre-activations.
Down projection: a = h, b1 = grad_y (gathered), s = the combine weight.

Split-K (WgradBlocks.split_rows = S > 0, off by default, unmeasured on a GPU): the reduction of expert e runs over
its n_e rows, so under skewed routing one busy expert's programs loop far longer than the rest (the tail). With a
split, each expert's rows are cut into chunks of at most S rows, numbered expert after expert (cdiv(n_e, S) per
expert, none for an empty one); one program per (chunk, weight tile) writes its fp32 partial tile to a workspace
row, and moe.kernels.combine.segment_sum adds each expert's chunks in chunk order and rounds once: a fixed order
and no atomics, so results are bitwise repeatable (they differ from the unsplit kernel's only by the fp32
reassociation of the row sum). A chunk finds its expert and rows from `offsets` inside the kernel
(gemm_tiles.expert_tile, with S-row "tiles"); `chunk_offsets` gives the reduction the same numbering with torch
ops on the device: nothing waits on the host. Cost: the workspace, C x P x Q fp32 (bound by shapes alone:
cdiv(N, S) + E - 1 rows, each P x Q x 4 bytes, twice for GLU), written once and read once more than without the
split. Spare chunk programs (past the real chunk count, unknown on the host) store nothing.

TMA (GemmBlocks.tma, off by default, unmeasured): an operand read in plan order (a = h of the down projection,
b1 / b2 = the pre-activation gradients of the up projection) is loaded through a TMA tensor descriptor of its
[N, width] rows (gemm_tiles.row_operand, in [block_k rows, tile width] boxes), with pointer loads as the fallback
where this Triton, the device (< sm_90) or the strides do not allow one. Gathered operands (a_index / b_index given: x or
grad_y read through row_token) keep pointer loads: Hopper's TMA copies boxes of consecutive rows and has no row
gather (the tiled gather of TMA is Blackwell's). A descriptor box may run past the expert's last row into the
next expert's rows: those rows are zeroed in registers (a select), so that neither the product (0 x inf) nor the
bias sums see them; what lies past N or the width the descriptor zero-fills.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from moe.kernels.combine import round_to, segment_sum
from moe.kernels.gemm_tiles import GemmBlocks, expert_tile, launch_opts, mma, pow2, row_operand
from moe.kernels.tile_configs import elementwise_block, split_rows, tiles_for


@triton.jit
def _load_row_block(ptr, index_ptr, rows, r_mask, r0, cols, col_mask, c0, stride,
                    GATHER: tl.constexpr, DESC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """An operand tile [rows r0.., columns c0..]: through the TMA descriptor `ptr` (DESC; rows past the segment
    zeroed), else by pointer loads of rows index[r] (GATHER) or r; masked rows and columns read 0."""
    if DESC:
        # tl.cast: r0 is a tensor when compiled, an int when interpreted; TMA coordinates are 32-bit
        tile = ptr.load([tl.cast(r0, tl.int32), c0])
        tile = tl.where(r_mask[:, None], tile, tl.zeros_like(tile))  # the next expert's rows (module docstring)
    else:
        if GATHER:
            src = tl.load(index_ptr + rows, mask=r_mask, other=0).to(tl.int64)
        else:
            src = rows
        tile = tl.load(ptr + src[:, None] * stride + cols[None, :], mask=r_mask[:, None] & col_mask[None, :],
                       other=0.0)
    return tile


@triton.jit
def _wgrad_rows(a_ptr, a_index_ptr, b1_ptr, b2_ptr, b_index_ptr, scale_ptr, dw1_ptr, dw2_ptr, db1_ptr, db2_ptr,
                lo, hi, out, tile, P, Q, stride_am, stride_bm, stride_we, stride_wp, stride_be,
                A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr, TWO: tl.constexpr,
                HAS_BIAS: tl.constexpr, A_DESC: tl.constexpr, B_DESC: tl.constexpr, STORE_EMPTY: tl.constexpr,
                PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr):
    """Weight tile `tile` (P tile major) of the sum over plan rows lo..hi, stored as row `out` of dw1 / dw2 (and of
    db1 / db2 for the first P tile). STORE_EMPTY: an empty row range still stores its zeros."""
    n_q = tl.cdiv(Q, BLOCK_Q)
    p_tile = tile // n_q
    ps = p_tile * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = tl.max_contiguous(tl.multiple_of((tile % n_q) * BLOCK_Q + tl.arange(0, BLOCK_Q), BLOCK_Q), BLOCK_Q)
    p_mask = ps < P
    q_mask = qs < Q
    acc1 = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    db1 = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    db2 = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_R):  # this expert's (or chunk's) rows only; none for an empty one
        rows = r0 + tl.arange(0, BLOCK_R)
        r_mask = rows < hi
        a = _load_row_block(a_ptr, a_index_ptr, rows, r_mask, r0, ps, p_mask, p_tile * BLOCK_P, stride_am,
                            A_GATHER, A_DESC, BLOCK_R, BLOCK_P)  # [rows, P tile]
        if HAS_SCALE:
            # The combine weight scales the A side (fp32, back to the operand dtype): the MMA's A operand may come
            # from registers on Hopper, where a scaled B tile would go back through shared memory every iteration.
            s = tl.load(scale_ptr + rows, mask=r_mask, other=0.0).to(tl.float32)
            a = round_to(a.to(tl.float32) * s[:, None], a.dtype, INTERPRETED)
        b1 = _load_row_block(b1_ptr, b_index_ptr, rows, r_mask, r0, qs, q_mask, (tile % n_q) * BLOCK_Q, stride_bm,
                             B_GATHER, B_DESC, BLOCK_R, BLOCK_Q)  # [rows, Q tile]
        acc1 = mma(tl.trans(a), b1, acc1, PRECISION, INTERPRETED)
        if TWO:  # GLU: the gate's gradient shares the loaded x tile
            b2 = _load_row_block(b2_ptr, b_index_ptr, rows, r_mask, r0, qs, q_mask, (tile % n_q) * BLOCK_Q,
                                 stride_bm, B_GATHER, B_DESC, BLOCK_R, BLOCK_Q)
            acc2 = mma(tl.trans(a), b2, acc2, PRECISION, INTERPRETED)
        if HAS_BIAS:
            if p_tile == 0:  # only the first P tile's programs store the bias sums, so only they compute them
                b1f = b1.to(tl.float32)
                if HAS_SCALE:
                    b1f = b1f * s[:, None]
                db1 += tl.sum(b1f, 0)
                if TWO:
                    db2 += tl.sum(b2.to(tl.float32), 0)
    # Row-vector forms of the scalar conditions keep the interpreter's masks boolean.
    keep = q_mask
    if not STORE_EMPTY:  # a spare split-K chunk (no rows): its workspace row is never read
        keep = keep & ((tl.zeros((BLOCK_Q,), dtype=tl.int64) + (hi - lo)) > 0)
    w_off = out.to(tl.int64) * stride_we + ps[:, None] * stride_wp + qs[None, :]
    w_mask = p_mask[:, None] & keep[None, :]
    tl.store(dw1_ptr + w_off, round_to(acc1, dw1_ptr.dtype.element_ty, INTERPRETED), mask=w_mask)
    if TWO:
        tl.store(dw2_ptr + w_off, round_to(acc2, dw2_ptr.dtype.element_ty, INTERPRETED), mask=w_mask)
    if HAS_BIAS:
        # Only the first P tile's programs write it.
        b_mask = keep & ((tl.zeros((BLOCK_Q,), dtype=tl.int32) + p_tile) == 0)
        b_off = out.to(tl.int64) * stride_be + qs
        tl.store(db1_ptr + b_off, round_to(db1, db1_ptr.dtype.element_ty, INTERPRETED), mask=b_mask)
        if TWO:
            tl.store(db2_ptr + b_off, round_to(db2, db2_ptr.dtype.element_ty, INTERPRETED), mask=b_mask)


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr, a_index_ptr, b1_ptr, b2_ptr, b_index_ptr, scale_ptr, offsets_ptr, dw1_ptr, dw2_ptr, db1_ptr, db2_ptr,
    P, Q,
    stride_am, stride_bm, stride_we, stride_wp, stride_be,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr, TWO: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The default path: dw[e] = sum over rows r of e of a[ia(r)]^T (s_r b[ib(r)]), one (P tile, Q tile) of one
    expert; db[e] the column sums of s_r b[ib(r)]. ia / ib are row_token when gathering, else r; s is the combine
    weight or 1. Pointer loads only, no split."""
    e = tl.program_id(1)
    lo = tl.load(offsets_ptr + e).to(tl.int64)
    hi = tl.load(offsets_ptr + e + 1).to(tl.int64)
    _wgrad_rows(a_ptr, a_index_ptr, b1_ptr, b2_ptr, b_index_ptr, scale_ptr, dw1_ptr, dw2_ptr, db1_ptr, db2_ptr,
                lo, hi, e, tl.program_id(0), P, Q, stride_am, stride_bm, stride_we, stride_wp, stride_be,
                A_GATHER, B_GATHER, HAS_SCALE, TWO, HAS_BIAS, False, False, True, PRECISION, INTERPRETED,
                BLOCK_P, BLOCK_Q, BLOCK_R)


@triton.jit
def _chunked_wgrad_kernel(
    a_ptr, a_index_ptr, b1_ptr, b2_ptr, b_index_ptr, scale_ptr, offsets_ptr, dw1_ptr, dw2_ptr, db1_ptr, db2_ptr,
    P, Q, E,
    stride_am, stride_bm, stride_we, stride_wp, stride_be,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr, TWO: tl.constexpr,
    HAS_BIAS: tl.constexpr, A_DESC: tl.constexpr, B_DESC: tl.constexpr, SPLIT_ROWS: tl.constexpr,
    E_POW2: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The options: operands through TMA descriptors (A_DESC / B_DESC) and, with SPLIT_ROWS > 0, one program per
    (chunk of at most SPLIT_ROWS rows, weight tile) storing fp32 partials as row `chunk` of the workspaces
    dw1 / dw2 / db1 / db2 (spare chunks store nothing); SPLIT_ROWS = 0: one program per (expert, tile), as above."""
    c = tl.program_id(1)
    if SPLIT_ROWS > 0:
        _, lo, end = expert_tile(c, offsets_ptr, E, SPLIT_ROWS, E_POW2)  # chunks numbered expert after expert
        hi = tl.minimum(lo + SPLIT_ROWS, end)
    else:
        lo = tl.load(offsets_ptr + c).to(tl.int64)
        hi = tl.load(offsets_ptr + c + 1).to(tl.int64)
    _wgrad_rows(a_ptr, a_index_ptr, b1_ptr, b2_ptr, b_index_ptr, scale_ptr, dw1_ptr, dw2_ptr, db1_ptr, db2_ptr,
                lo, hi, c, tl.program_id(0), P, Q, stride_am, stride_bm, stride_we, stride_wp, stride_be,
                A_GATHER, B_GATHER, HAS_SCALE, TWO, HAS_BIAS, A_DESC, B_DESC, SPLIT_ROWS == 0, PRECISION,
                INTERPRETED, BLOCK_P, BLOCK_Q, BLOCK_R)


def chunk_bound(n_rows: int, split: int, num_experts: int) -> int:
    """Workspace rows of a split into chunks of `split` rows: sum_e cdiv(n_e, S) <= cdiv(N, S) + E - 1, from shapes
    alone (at least 1, so that the launch grid is never empty)."""
    return max(1, triton.cdiv(n_rows, split) + num_experts - 1)


def chunk_offsets(offsets: Tensor, split: int) -> Tensor:
    """[E+1]: expert e's chunks are workspace rows chunk_offsets[e]:chunk_offsets[e+1] (cdiv(n_e, S) of them), the
    numbering the kernel's expert_tile gives; device-side torch ops, no host synchronisation."""
    chunks = (offsets[1:] - offsets[:-1] + split - 1) // split
    return torch.cat([offsets.new_zeros(1), chunks.cumsum(0)]).to(torch.int64)


def _row_blocks(ts: tuple[Tensor, ...], blocks: GemmBlocks, block_rows: int, block_cols: int
                ) -> tuple[tuple[object, ...], bool]:
    """(what the kernel gets for operands ts, each [N, width] read in plan order, whether they are TMA
    descriptors): descriptors of boxes [block_rows, block_cols] for all of them, or (fallback) the tensors."""
    if not blocks.tma or any(t.shape[0] == 0 or t.dim() != 2 for t in ts):
        return ts, False
    # gemm_tiles.row_operand checks what a descriptor needs (this Triton, sm_90+, contiguity, 16-byte rows and
    # base); its boxes are [block_m, block_k], here [block_rows plan rows, block_cols columns of the tile].
    box = GemmBlocks(block_m=block_rows, block_k=block_cols, tma=True)
    made = tuple(row_operand(t, box) for t in ts)
    if any(d is t for d, t in zip(made, ts)):  # one fell back: pointer loads for all (one DESC flag per side)
        return ts, False
    return made, True


def grouped_wgrad(a: Tensor, a_index: Optional[Tensor], b1: Tensor, b2: Optional[Tensor], b_index: Optional[Tensor],
                  scale: Optional[Tensor], offsets: Tensor, num_experts: int, with_bias: bool,
                  blocks: Optional[GemmBlocks] = None
                  ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """dw1[e] = a[rows of e]^T @ (s b1)[rows of e] (and dw2 from b2), db = column sums: [E, P, Q], [E, Q].
    Tiles (block_m × block_n of the weight, block_k plan rows per iteration; WgradBlocks.split_rows, tma): the
    caller's, else tuned/default."""
    P, Q, E = a.shape[1], b1.shape[1], num_experts
    kernel = "wgrad_up_glu" if b2 is not None else "wgrad_up" if a_index is not None else "wgrad_down"
    index = a_index if a_index is not None else b_index
    n_rows = index.numel() if index is not None else a.shape[0]  # plan rows N (gathered operands have T rows)
    blocks = tiles_for(kernel, blocks, a, n_rows, P, Q)
    split = split_rows(blocks)
    (a_op,), a_desc = _row_blocks((a,), blocks, blocks.block_k, blocks.block_m) if a_index is None else ((a,), False)
    bs = (b1,) if b2 is None else (b1, b2)
    b_ops, b_desc = _row_blocks(bs, blocks, blocks.block_k, blocks.block_n) if b_index is None else (bs, False)
    # Split: fp32 partials, one workspace row per chunk; else the gradients themselves, one row per expert.
    rows_out, out_dtype = (chunk_bound(n_rows, split, E), torch.float32) if split else (E, a.dtype)
    dw1 = a.new_empty(rows_out, P, Q, dtype=out_dtype)
    dw2 = a.new_empty(rows_out, P, Q, dtype=out_dtype) if b2 is not None else None
    db1 = a.new_empty(rows_out, Q, dtype=out_dtype) if with_bias else None
    db2 = a.new_empty(rows_out, Q, dtype=out_dtype) if with_bias and b2 is not None else None
    grid = (triton.cdiv(P, blocks.block_m) * triton.cdiv(Q, blocks.block_n), rows_out)
    args = (a_op, a if a_index is None else a_index, b_ops[0], b_ops[-1], b1 if b_index is None else b_index,
            b1 if scale is None else scale, offsets, dw1, dw1 if dw2 is None else dw2,
            dw1 if db1 is None else db1, dw1 if db2 is None else db2)
    strides = (a.stride(0), b1.stride(0), dw1.stride(0), dw1.stride(1), Q)
    flags = dict(A_GATHER=a_index is not None, B_GATHER=b_index is not None, HAS_SCALE=scale is not None,
                 TWO=b2 is not None, HAS_BIAS=with_bias)
    tiles = dict(BLOCK_P=blocks.block_m, BLOCK_Q=blocks.block_n, BLOCK_R=blocks.block_k, **launch_opts(a, blocks))
    if split or a_desc or b_desc:
        _chunked_wgrad_kernel[grid](*args, P, Q, E, *strides, **flags, A_DESC=a_desc, B_DESC=b_desc,
                                    SPLIT_ROWS=split, E_POW2=pow2(E), **tiles)
    else:
        _grouped_wgrad_kernel[grid](*args, P, Q, *strides, **flags, **tiles)
    if not split:
        return dw1, dw2, db1, db2
    # The second pass: each expert's chunks added in chunk order in fp32, rounded once to the activation dtype.
    order, width = chunk_offsets(offsets, split), elementwise_block(blocks, a.dtype)

    def reduce(ws: Optional[Tensor]) -> Optional[Tensor]:
        if ws is None:
            return None
        return segment_sum(ws.view(rows_out, -1), order, a.dtype, width).view(E, *ws.shape[1:])

    return reduce(dw1), reduce(dw2), reduce(db1), reduce(db2)
