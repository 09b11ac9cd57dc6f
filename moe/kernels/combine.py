"""Deterministic row → token reduction: a token-major order of the plan rows and a segmented sum over it.

Shape legend: T tokens, N plan rows (sorted by expert), D row width, row_token [N] the token each row carries.

Summing the rows of a token with atomics (or `index_add_` on CUDA) makes the result depend on which thread
arrives first: two runs differ in the last bits. Instead the rows are given a token-major order once (a stable
device-side sort of row_token, `TokenOrder.build`; for a dropless plan the same order without a sort,
`TokenOrder.from_dropless`), the grouped GEMM's epilogue writes row r to its token-major slot `slot[r]`, and
one program per token adds that token's 0..k consecutive slots in a fixed order. Every step is a sort, a
search or a plain store, so results are bitwise reproducible on CUDA as on CPU, and nothing synchronises with
the host (the launch grid depends only on T and D, never on how many rows a token has).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


@dataclass
class TokenOrder:
    """Where each plan row goes in the token-major order, and where each token's rows start."""

    slot: Tensor  # [N] long, position of row r in the token-major order (the inverse of the sort permutation)
    token_offsets: Tensor  # [T+1] long, token t's rows are slots token_offsets[t]:token_offsets[t+1]

    @staticmethod
    def build(row_token: Tensor, num_tokens: int) -> "TokenOrder":
        # Stable: rows of one token keep their expert order, so the summation order is fixed by the plan alone.
        sorted_token, perm = torch.sort(row_token, stable=True)
        # slot = perm^-1. perm is a permutation, so every index is written exactly once: deterministic, and a
        # scatter (unlike some index_put_ paths) never synchronises with the host.
        slot = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
        tokens = torch.arange(num_tokens + 1, device=row_token.device, dtype=sorted_token.dtype)
        # First slot whose token is >= t; token_offsets[T] = N because every row's token is < T.
        token_offsets = torch.searchsorted(sorted_token, tokens)
        return TokenOrder(slot=slot, token_offsets=token_offsets)

    @staticmethod
    def from_dropless(row_token: Tensor, row_expert: Tensor, num_tokens: int, top_k: int,
                      num_experts: int) -> "TokenOrder":
        """build()'s order without a sort, for a dropless plan: every token has exactly top_k rows, in top_k
        distinct experts (a token-choice router's plan where nothing dropped; see moe.dispatch.triton).

        Token t's rows are then slots t*k .. t*k+k-1 (token_offsets = arange(T+1) * k, no search), and inside
        them build() keeps plan order, which is expert order because the plan is sorted by expert and a token's
        experts are distinct. So a row's place among its token's rows is the number of experts below its own that
        the token chose: a [T, E] table of the chosen pairs (one scatter of ones, every index distinct), its
        running sum along E, and one gather. O(T*E) elementwise work and no data-dependent size: no host sync,
        and the slots equal build()'s exactly (same summation order, so bitwise the same combine)."""
        T, k, E, N = num_tokens, top_k, num_experts, row_token.numel()
        if N != T * k or row_expert.shape != row_token.shape:
            raise ValueError(f"TokenOrder.from_dropless needs exactly top_k={k} rows per token: got {N} rows for "
                             f"{T} tokens (and {tuple(row_expert.shape)} experts); use TokenOrder.build for plans "
                             "that drop rows")
        dev = row_token.device
        pair = row_token * E + row_expert  # [N] the row's (token, expert) cell of the [T, E] table
        chosen = torch.zeros(T * E, dtype=torch.int8, device=dev).index_fill_(0, pair, 1)
        up_to = chosen.view(T, E).cumsum(1, dtype=torch.int32)  # [T, E] experts <= e the token chose
        rank = up_to.view(-1).gather(0, pair).long() - 1  # [N] place among the token's rows, in expert order
        slot = row_token * k + rank
        token_offsets = torch.arange(T + 1, device=dev, dtype=slot.dtype) * k
        return TokenOrder(slot=slot, token_offsets=token_offsets)

    def astuple(self) -> tuple[Tensor, Tensor]:
        return self.slot, self.token_offsets

    @staticmethod
    def unpack(order: Optional["TokenOrder"]) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(slot, token_offsets), or (None, None): the tensors an autograd Function takes in place of the order."""
        return (None, None) if order is None else order.astuple()


@triton.jit
def round_to(v, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 v -> dtype, rounded to nearest even. The Triton interpreter truncates fp32 -> bf16 (the GPU rounds),
    so under it the rounding is done on the bits first and the cast then drops only zero bits."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16  # the carry may bump the exponent: correct
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _segment_sum_kernel(rows_ptr, token_offsets_ptr, out_ptr, D, stride_rows, stride_out,
                        INTERPRETED: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t, cols] = sum of rows[j, cols] over j in token t's slot range, in slot order, accumulated in fp32.
    One program per (token, BLOCK_D columns), token-major in grid x (`segment_sum_grid`)."""
    col_blocks = tl.cdiv(D, BLOCK_D)
    t = tl.program_id(0) // col_blocks
    cols = (tl.program_id(0) % col_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    lo = tl.load(token_offsets_ptr + t)
    hi = tl.load(token_offsets_ptr + t + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in range(lo, hi):  # 0..k iterations: a token without rows keeps the zeros
        acc += tl.load(rows_ptr + j * stride_rows + cols, mask=col_mask, other=0.0).to(tl.float32)
    out = round_to(acc, out_ptr.dtype.element_ty, INTERPRETED)
    tl.store(out_ptr + t.to(tl.int64) * stride_out + cols, out, mask=col_mask)


# Whether triton.jit gave interpreted kernels (TRITON_INTERPRET=1 when triton was imported): they run on CPU
# tensors, and need the interpreter workarounds (round_to here, fp32 dot operands in gemm_tiles.mma).
INTERPRETED = type(_segment_sum_kernel).__name__ == "InterpretedFunction"


GRID_X_MAX = 2**31 - 1  # CUDA's limit on grid dimension x (y and z: 65,535)


def segment_sum_grid(num_tokens: int, width: int, block_d: int) -> tuple[int]:
    """segment_sum's launch grid: num_tokens x cdiv(width, block_d) programs, all in grid x. A second grid
    dimension for the column blocks would be capped at 65,535 by CUDA, and the split-K weight gradients' second
    pass sums rows of width P*Q (moe.kernels.weight_grad): 4096 x 14336 / 1024 = 57,344 blocks, past the cap at
    wider layers (5120 x 13824: 69,120) or smaller blocks."""
    programs = num_tokens * triton.cdiv(width, block_d)
    if programs > GRID_X_MAX:
        raise ValueError(f"segment_sum: {num_tokens} rows x {triton.cdiv(width, block_d)} column blocks of {block_d} "
                         f"= {programs} programs, past CUDA's grid limit of {GRID_X_MAX}: pass a larger block_d "
                         "(GemmBlocks.block_elementwise)")
    return (programs,)


def segment_sum(rows: Tensor, token_offsets: Tensor, dtype: torch.dtype, block_d: int = 1024) -> Tensor:
    """rows [N, D] in token-major order, token_offsets [T+1] -> [T, D] in `dtype` (rows of a token summed)."""
    num_tokens, width = token_offsets.numel() - 1, rows.shape[1]
    out = torch.empty(num_tokens, width, device=rows.device, dtype=dtype)
    if num_tokens == 0 or width == 0:
        return out
    assert rows.stride(1) == 1, "segment_sum expects rows with contiguous columns"
    block_d = min(block_d, triton.next_power_of_2(width))
    grid = segment_sum_grid(num_tokens, width, block_d)
    _segment_sum_kernel[grid](rows, token_offsets, out, width, rows.stride(0), out.stride(0),
                              INTERPRETED=INTERPRETED, BLOCK_D=block_d)
    return out
