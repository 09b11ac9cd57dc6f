"""Sorting assignments by expert on the device: histogram, scan and a stable scatter, with no host synchronisation.

Shape legend: T tokens, k choices per token, A = T*k assignments, E experts, BLOCK_A assignments per program,
NB = ceil(A / BLOCK_A) blocks, BLOCK_E = E padded to a power of two.

The order is routing.capacity.assign's with capacity=None: assignments are flattened choice-major (a = j*T + t,
so every first choice outranks every second choice) and sorted by expert, stably. Three Triton kernels:

    1. histogram  hist[b, e]  = assignments of block b that chose expert e            (NB programs)
    2. scan       counts[e]   = sum_b hist[b, e];  offsets = exclusive cumsum of counts  (one program)
                  base[b, e]  = offsets[e] + sum_{b' < b} hist[b', e]   (where block b's rows of e start)
    3. scatter    the row of assignment a lands at base[b, e] + (its rank among block b's assignments to e)
                                                                                         (NB programs)

The rank inside a block is a cumulative sum over a [BLOCK_A, BLOCK_E] one-hot tile, so blocks shrink as E grows.
Nothing reads a count on the host: the output sizes are A and E, known from the shapes. Where the kernels cannot
run (no triton, or CPU tensors outside TRITON_INTERPRET=1) `sort_by_expert` takes a pure-torch path that stays on
the device too (a stable argsort and a scatter_add histogram; torch.bincount would sync on CUDA).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from moe.kernels import interpret_mode, next_pow2, triton_status
from routing.counts import count_ids

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path below still works
    triton = None


class ExpertSort(NamedTuple):
    """Assignments sorted by expert (stable, choice-major). The first four fields are the contract of a router's
    RouterKernels.sort (routing.router)."""

    order: Tensor  # [A] long, the choice-major assignment a = j*T + t of each sorted row
    token_index: Tensor  # [A] long, its token t = a mod T
    expert_index: Tensor  # [A] long, its expert, non-decreasing
    counts: Tensor  # [E] long, assignments per expert
    offsets: Tensor  # [E+1] long, start of each expert's segment (offsets[E] = A)
    # [1 + 3 * M_BOUND] long, the row-tile table of the persistent GEMMs for one BLOCK_M (moe.kernels.tile_table),
    # written right after the scan when sort_by_expert is given tile_block_m; else None
    tile_table: Optional[Tensor] = None


if triton is not None:

    @triton.jit
    def _load_experts(expert_ptr, a, T, stride_t, stride_k, mask):
        # choice-major a = j*T + t without materialising expert_idx.t()
        t = a % T
        j = a // T
        return tl.load(expert_ptr + t * stride_t + j * stride_k, mask=mask, other=-1).to(tl.int32)

    @triton.jit
    def _histogram_kernel(expert_ptr, hist_ptr, T, A, E, stride_t, stride_k,
                          BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr):
        b = tl.program_id(0)
        a = b * BLOCK_A + tl.arange(0, BLOCK_A)
        e = _load_experts(expert_ptr, a, T, stride_t, stride_k, a < A)  # [BLOCK_A], -1 past A
        cols = tl.arange(0, BLOCK_E)
        hit = (e[:, None] == cols[None, :]).to(tl.int32)  # [BLOCK_A, BLOCK_E] one-hot
        tl.store(hist_ptr + b * E + cols, tl.sum(hit, axis=0), mask=cols < E)

    @triton.jit
    def _scan_kernel(hist_ptr, base_ptr, counts_ptr, offsets_ptr, NB, E,
                     BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
        cols = tl.arange(0, BLOCK_E)
        col_ok = cols < E
        blocks = tl.arange(0, BLOCK_B)
        # pass 1: totals per expert, then their exclusive cumsum
        total = tl.zeros([BLOCK_E], dtype=tl.int32)
        for start in range(0, NB, BLOCK_B):
            rows = start + blocks
            m = (rows[:, None] < NB) & col_ok[None, :]
            total += tl.sum(tl.load(hist_ptr + rows[:, None] * E + cols[None, :], mask=m, other=0), axis=0)
        inclusive = tl.cumsum(total, axis=0)
        tl.store(counts_ptr + cols, total.to(tl.int64), mask=col_ok)
        tl.store(offsets_ptr + 1 + cols, inclusive.to(tl.int64), mask=col_ok)
        tl.store(offsets_ptr + cols, tl.zeros([BLOCK_E], dtype=tl.int64), mask=cols == 0)
        # pass 2: where each block's rows of each expert start
        running = inclusive - total
        for start in range(0, NB, BLOCK_B):
            rows = start + blocks
            m = (rows[:, None] < NB) & col_ok[None, :]
            h = tl.load(hist_ptr + rows[:, None] * E + cols[None, :], mask=m, other=0)  # [BLOCK_B, BLOCK_E]
            tl.store(base_ptr + rows[:, None] * E + cols[None, :], tl.cumsum(h, axis=0) - h + running[None, :], mask=m)
            running += tl.sum(h, axis=0)

    @triton.jit
    def _scatter_kernel(expert_ptr, base_ptr, order_ptr, token_ptr, expert_out_ptr, T, A, E, stride_t, stride_k,
                        BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr):
        b = tl.program_id(0)
        a = b * BLOCK_A + tl.arange(0, BLOCK_A)
        valid = a < A
        e = _load_experts(expert_ptr, a, T, stride_t, stride_k, valid)
        cols = tl.arange(0, BLOCK_E)
        hit = (e[:, None] == cols[None, :]).to(tl.int32)  # [BLOCK_A, BLOCK_E]
        # rank of each assignment among this block's earlier assignments to its expert (stable by construction)
        rank = tl.sum(hit * tl.cumsum(hit, axis=0), axis=1) - 1  # [BLOCK_A]
        start = tl.load(base_ptr + b * E + e, mask=valid, other=0)
        pos = start + rank
        tl.store(order_ptr + pos, a.to(tl.int64), mask=valid)
        tl.store(token_ptr + pos, (a % T).to(tl.int64), mask=valid)
        tl.store(expert_out_ptr + pos, e.to(tl.int64), mask=valid)


def _block_assignments(A: int, block_e: int) -> int:
    # The one-hot tile is BLOCK_A x BLOCK_E int32: ~8K values per program on a GPU, far more in the interpreter,
    # which pays per program.
    budget = 1 << 18 if interpret_mode() else 1 << 13
    return max(16, min(next_pow2(A), budget // block_e))


def _sort_triton(expert_idx: Tensor, num_experts: int, block_a: Optional[int] = None) -> ExpertSort:
    T, k = expert_idx.shape
    A, E = T * k, num_experts
    dev = expert_idx.device
    block_e = next_pow2(E)
    block_a = block_a or _block_assignments(A, block_e)
    nb = triton.cdiv(A, block_a)
    hist = torch.empty(nb, E, dtype=torch.int32, device=dev)
    base = torch.empty(nb, E, dtype=torch.int32, device=dev)
    counts = torch.empty(E, dtype=torch.long, device=dev)
    offsets = torch.empty(E + 1, dtype=torch.long, device=dev)
    order = torch.empty(A, dtype=torch.long, device=dev)
    token_index = torch.empty(A, dtype=torch.long, device=dev)
    expert_index = torch.empty(A, dtype=torch.long, device=dev)
    st, sk = expert_idx.stride()
    _histogram_kernel[(nb,)](expert_idx, hist, T, A, E, st, sk, BLOCK_A=block_a, BLOCK_E=block_e)
    block_b = max(1, min(next_pow2(nb), (1 << 13) // block_e, block_a))  # block_a: tests shrink both
    _scan_kernel[(1,)](hist, base, counts, offsets, nb, E, BLOCK_B=block_b, BLOCK_E=block_e)
    _scatter_kernel[(nb,)](expert_idx, base, order, token_index, expert_index, T, A, E, st, sk,
                           BLOCK_A=block_a, BLOCK_E=block_e)
    return ExpertSort(order, token_index, expert_index, counts, offsets)


def _sort_torch(expert_idx: Tensor, num_experts: int) -> ExpertSort:
    T, k = expert_idx.shape
    flat = expert_idx.t().reshape(T * k)
    order = torch.argsort(flat, stable=True)
    counts = count_ids(flat, num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return ExpertSort(order, order % T if T else order, flat[order], counts, offsets)


def sort_by_expert(expert_idx: Tensor, num_experts: int, use_triton: Optional[bool] = None,
                   block_a: Optional[int] = None, tile_block_m: Optional[int] = None) -> ExpertSort:
    """expert_idx [T, k] (values in [0, E)) -> ExpertSort; the Triton kernels where they can run (use_triton=None),
    else the torch path. Either way no host synchronisation, and the result equals routing.capacity.assign's rows
    with capacity=None. block_a (a power of two >= 16) overrides the assignments per program (tests use it to
    cover several blocks). tile_block_m: also write the row-tile table of that BLOCK_M from the scan's offsets
    (one more small kernel: moe.kernels.tile_table; it needs the Triton kernels to be runnable)."""
    if expert_idx.dim() != 2:
        raise ValueError(f"expert_idx must be [T, k], got shape {tuple(expert_idx.shape)}")
    if use_triton is None:
        use_triton = triton is not None and triton_status(expert_idx.device)[0]
    if use_triton and triton is None:
        raise ValueError("sort_by_expert(use_triton=True) needs triton; install the triton extra")
    if expert_idx.numel() == 0 or not use_triton:
        rows = _sort_torch(expert_idx, num_experts)
    else:
        rows = _sort_triton(expert_idx, num_experts, block_a)
    if tile_block_m is None:
        return rows
    from moe.kernels.tile_table import tile_table  # imports triton

    return rows._replace(tile_table=tile_table(rows.offsets, rows.order.numel(), tile_block_m))


def sort_impl(expert_idx: Tensor, num_experts: int) -> ExpertSort:
    """The RouterKernels.sort a router runs (routing.router): sort_by_expert with the automatic choice."""
    return sort_by_expert(expert_idx, num_experts)


__all__ = ["ExpertSort", "sort_by_expert", "sort_impl"]
