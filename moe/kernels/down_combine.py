"""The Triton down projection + weighted combine, and its backward.

Shape legend: T tokens, d model width, f expert hidden width, E experts, N plan rows sorted by expert, row_token
[N] the token each row carries, row_weight [N] its combine weight.

    grouped_down_combine(h[N,f], w_down[E,f,d], b_down|None, offsets, row_weight, row_token, T) -> y[T,d]
        y[t] = sum over rows r of token t of row_weight[r] * (h[r] @ w_down[e_r] + b_down[e_r])

- The combine is fused and deterministic: the down kernel's epilogue (`rows_to_slots_kernel`) adds the bias,
  multiplies by the combine weight in fp32 and writes row r, rounded once to the activation dtype, to its
  token-major slot (moe.kernels.combine.TokenOrder); a segmented sum then adds each token's rows in a fixed order,
  accumulating in fp32 (one more rounding at the end: y's bf16 is within an ulp or two of an fp32-row sum). The up
  projection's backward reuses the same kernel for the gradient of x (moe.kernels.up_projection).
- grad of the combine weight: <grad_y[t_r], h[r] @ w_down[e] + b_down[e]> = <grad_y[t_r] @ w_down[e]^T, h[r]> +
  <grad_y[t_r], b_down[e]>. The first factor is exactly the un-scaled grad of h, so the grad-h kernel's
  epilogue produces it with no extra GEMM: each column tile writes its partial dot product to a
  [N, column tiles] buffer that is summed afterwards (a fixed-order sum, not an atomic).
- Not fused: the token-major order (a stable torch.sort, a scatter and a searchsorted, or for a dropless plan
  TokenOrder.from_dropless without the sort; built once per layer when the caller passes `token_order`, as
  moe.dispatch.triton does, else here) and the per-token sum.
- Launchers of their own (launch_down, launch_grad_h, launch_grad_h_act: the grad-h GEMM with the activation
  backward in its epilogue, used by moe.kernels.expert_mlp) serve benchmarks and moe.kernels.autotune.
Tiles, precision and block sizes: moe.kernels.gemm_tiles and moe.kernels.tile_configs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from moe.kernels.activations import mlp_backward, mlp_value
from moe.kernels.combine import TokenOrder, round_to, segment_sum
from moe.kernels.gemm_tiles import (GemmBlocks, cast_weight, check_device, col_offsets, expert_weight, load_row_block,
                                    load_rows, mma, row_launch, row_operand, row_tile, swizzle, tile_counts,
                                    tile_table_arg, weight_operand)
from moe.kernels.tile_configs import elementwise_block, tiles_for
from moe.kernels.tile_table import TileTables
from moe.kernels.weight_grad import grouped_wgrad


@triton.jit
def rows_to_slots_kernel(
    a1_ptr, a2_ptr, offsets_ptr, w1_ptr, w2_ptr, bias_ptr, scale_ptr, slot_ptr, out_ptr,
    E, K, NOUT, M_TILES, TILES,
    stride_am, stride_we, stride_wk, stride_wn, stride_be, stride_om, tiles_ptr,
    TWO: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_POW2: tl.constexpr,
    W_DESC: tl.constexpr, W_TRANS: tl.constexpr,
):
    """out[slot[r], cols] = scale[r] * (a1[r] @ w1[e] (+ a2[r] @ w2[e]) + bias[e]) in fp32.
    W_DESC: w1_ptr / w2_ptr are TMA descriptors (gemm_tiles.weight_operand; W_TRANS: of the transposed weights).
    a1_ptr / a2_ptr may be TMA descriptors of their rows (gemm_tiles.row_operand: they are in expert order, so a
    row tile is one box). tiles_ptr: the tile table of a persistent launch (moe.kernels.tile_table), or None.
    Forward down projection + combine: a1 = h, w1 = w_down, scale = row_weight.
    Backward of the up projection: a1, a2 = grad of the up / gate pre-activations, w1, w2 = w_up, w_gate read
    transposed through their strides (no transposed copy)."""
    # One tile per program (grid = TILES: one trip), or persistent (fewer programs, ~one per SM): each program
    # takes tiles pid, pid + programs, ... of the swizzled order, up to the tile table's count.
    m_tiles, tiles = tile_counts(tiles_ptr, M_TILES, TILES, tl.cdiv(NOUT, BLOCK_N))
    for pid in range(tl.program_id(0), tiles, tl.num_programs(0)):
        pid_m, pid_n = swizzle(pid, m_tiles, tl.cdiv(NOUT, BLOCK_N), GROUP_M)
        e, row_start, row_end = row_tile(pid_m, offsets_ptr, tiles_ptr, E, BLOCK_M, E_POW2)
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        cols = col_offsets(pid_n, BLOCK_N)
        col_mask = cols < NOUT
        k_stop = tl.where(row_start < row_end, K, 0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        a_off = rows.to(tl.int64)[:, None] * stride_am
        w_off = e.to(tl.int64) * stride_we + cols[None, :] * stride_wn
        for k0 in range(0, k_stop, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = load_row_block(a1_ptr, a_off, row_start, k0, ks, row_mask, K, EVEN_K)
            w = expert_weight(w1_ptr, w_off, stride_wk, e, k0, pid_n, ks, K, cols, NOUT, EVEN_K, EVEN_N, W_DESC,
                              W_TRANS, BLOCK_K, BLOCK_N)
            acc = mma(a, w, acc, PRECISION, INTERPRETED)
            if TWO:  # GLU backward: both products land in the same accumulator (grad x = gu wu^T + gg wg^T)
                a = load_row_block(a2_ptr, a_off, row_start, k0, ks, row_mask, K, EVEN_K)
                w = expert_weight(w2_ptr, w_off, stride_wk, e, k0, pid_n, ks, K, cols, NOUT, EVEN_K, EVEN_N, W_DESC,
                                  W_TRANS, BLOCK_K, BLOCK_N)
                acc = mma(a, w, acc, PRECISION, INTERPRETED)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + e * stride_be + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_SCALE:  # the combine weight, applied in fp32 before any rounding
            acc *= tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        slot = tl.load(slot_ptr + rows, mask=row_mask, other=0).to(tl.int64)  # token-major position of each row
        out = round_to(acc, out_ptr.dtype.element_ty, INTERPRETED)
        tl.store(out_ptr + slot[:, None] * stride_om + cols[None, :], out, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _down_grad_h_kernel(
    gy_ptr, row_token_ptr, offsets_ptr, w_ptr, b_ptr, h_ptr, pg_ptr, rw_ptr, gh_ptr, gg_ptr, part_ptr,
    E, D, F, M_TILES, TILES,
    stride_gt, stride_we, stride_wf, stride_wd, stride_be, stride_hn, stride_pn, tiles_ptr,
    HAS_BIAS: tl.constexpr, FUSE_ACT: tl.constexpr, GLU: tl.constexpr, ACT: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_POW2: tl.constexpr,
):
    """g = grad_y[t_r] @ w_down[e]^T for one (row tile, f tile); writes grad h = row_weight * g and the partial
    grad of row_weight <g, h[r]> (+ <grad_y[t_r], b_down[e]> in column tile 0) into part[r, column tile].
    FUSE_ACT: h_ptr / pg_ptr hold the pre-activations u / g instead of h, h is recomputed from them in fp32, and
    the activation backward runs in the epilogue: gh_ptr / gg_ptr receive the gradients of u / g (grad h itself
    is never written).
    w_ptr may be a TMA descriptor of w_down's transposed tiles (gemm_tiles.weight_operand); grad_y's rows are
    gathered through row_token, so they keep pointer loads (Hopper's TMA has no row gather). tiles_ptr: the tile
    table of a persistent launch (moe.kernels.tile_table), or None."""
    # One tile per program (grid = TILES: one trip), or persistent (fewer programs, ~one per SM): each program
    # takes tiles pid, pid + programs, ... of the swizzled order, up to the tile table's count.
    m_tiles, tiles = tile_counts(tiles_ptr, M_TILES, TILES, tl.cdiv(F, BLOCK_N))
    for pid in range(tl.program_id(0), tiles, tl.num_programs(0)):
        pid_m, pid_n = swizzle(pid, m_tiles, tl.cdiv(F, BLOCK_N), GROUP_M)
        e, row_start, row_end = row_tile(pid_m, offsets_ptr, tiles_ptr, E, BLOCK_M, E_POW2)
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        tok = tl.load(row_token_ptr + rows, mask=row_mask, other=0).to(tl.int64)  # gather grad_y rows via row_token
        cols = col_offsets(pid_n, BLOCK_N)  # columns of f
        col_mask = cols < F
        k_stop = tl.where(row_start < row_end, D, 0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        bias_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
        w_off = e.to(tl.int64) * stride_we + cols[None, :] * stride_wf
        for k0 in range(0, k_stop, BLOCK_K):  # reduce over d
            ks = k0 + tl.arange(0, BLOCK_K)
            g = load_rows(gy_ptr + tok[:, None] * stride_gt + ks[None, :], row_mask, ks, D, EVEN_K)
            w = expert_weight(w_ptr, w_off, stride_wd, e, k0, pid_n, ks, D, cols, F, EVEN_K, EVEN_N,
                              isinstance(w_ptr, tl.tensor_descriptor), True, BLOCK_K, BLOCK_N)
            acc = mma(g, w, acc, PRECISION, INTERPRETED)  # w_down[e] read transposed: [d chunk, f tile]
            if HAS_BIAS:
                b = tl.load(b_ptr + e * stride_be + ks, mask=ks < D, other=0.0).to(tl.float32)
                bias_dot += tl.sum(g.to(tl.float32) * b[None, :], 1)
        out_mask = row_mask[:, None] & col_mask[None, :]
        out_off = rows.to(tl.int64)[:, None] * stride_hn + cols[None, :]
        h = tl.load(h_ptr + out_off, mask=out_mask, other=0.0).to(tl.float32)  # FUSE_ACT: the pre-activation u
        if FUSE_ACT:
            u = h
            g = u
            if GLU:
                g = tl.load(pg_ptr + out_off, mask=out_mask, other=0.0).to(tl.float32)
            h = mlp_value(u, g, GLU, ACT)
        part = tl.sum(acc * h, 1)  # <g, h[r]> over this f tile
        if HAS_BIAS:
            part += tl.where(pid_n == 0, bias_dot, 0.0)  # the bias term is counted once, by the first f tile
        tl.store(part_ptr + rows.to(tl.int64) * stride_pn + pid_n, part, mask=row_mask)
        rw = tl.load(rw_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        grad_h = acc * rw[:, None]
        if FUSE_ACT:  # grad h stays in registers (fp32): straight to the gradients of the pre-activations
            grad_u, grad_g = mlp_backward(grad_h, u, g, GLU, ACT)
            tl.store(gh_ptr + out_off, round_to(grad_u, gh_ptr.dtype.element_ty, INTERPRETED), mask=out_mask)
            if GLU:
                tl.store(gg_ptr + out_off, round_to(grad_g, gg_ptr.dtype.element_ty, INTERPRETED), mask=out_mask)
        else:
            tl.store(gh_ptr + out_off, round_to(grad_h, gh_ptr.dtype.element_ty, INTERPRETED), mask=out_mask)


def launch_down(h: Tensor, w_down: Tensor, b_down: Optional[Tensor], offsets: Tensor, row_weight: Tensor,
                slot: Tensor, blocks: Optional[GemmBlocks] = None, tile_tables: Optional[TileTables] = None) -> Tensor:
    """The down kernel alone: rows [N, d] in h's dtype, row r = row_weight[r] (h[r] @ w_down[e] + b_down[e]) (in
    fp32, rounded once) written to slot[r] (token-major; moe.kernels.combine.segment_sum then sums each token's
    rows in fp32). Under blocks.tma h (rows in expert order) and w_down come through descriptors. tile_tables: the
    layer call's tile tables (persistent launches), if any."""
    (N, f), (E, _, d) = h.shape, w_down.shape
    blocks = tiles_for("down", blocks, h, N, f, d)
    # Token-major rows in h's dtype (bf16: half the traffic of fp32 rows, as ScatterMoE's and TransformerEngine's
    # unpermute); the k-way sum of a token's rows is then kept in fp32 inside the combine.
    rows = torch.empty(N, d, device=h.device, dtype=h.dtype)
    if N > 0:
        grid, tiles = row_launch(h, blocks, N, E, f, d)
        wd, desc = weight_operand(w_down, blocks, False)
        a = row_operand(h, blocks)
        rows_to_slots_kernel[grid](
            a, a, offsets, wd, wd, rows if b_down is None else b_down, row_weight, slot, rows,
            E, f, d, tiles.pop("M_TILES"), tiles.pop("TILES"),
            h.stride(0), w_down.stride(0), w_down.stride(1), w_down.stride(2), d, rows.stride(0),
            TWO=False, HAS_BIAS=b_down is not None, HAS_SCALE=True, W_DESC=desc, W_TRANS=False,
            tiles_ptr=tile_table_arg(blocks, offsets, N, tile_tables), **tiles)
    return rows


def launch_grad_h(grad_y: Tensor, row_token: Tensor, offsets: Tensor, w_down: Tensor, b_down: Optional[Tensor],
                  h: Tensor, row_weight: Tensor, blocks: Optional[GemmBlocks] = None,
                  tile_tables: Optional[TileTables] = None) -> tuple[Tensor, Tensor]:
    """The grad-h kernel alone: grad h [N, f] and grad row_weight [N] fp32 (a fixed-order sum over f tiles)."""
    grad_h, _, grad_weight = _grad_h(grad_y, row_token, offsets, w_down, b_down, h, None, row_weight, None, blocks,
                                     tile_tables)
    return grad_h, grad_weight


def launch_grad_h_act(grad_y: Tensor, row_token: Tensor, offsets: Tensor, w_down: Tensor, b_down: Optional[Tensor],
                      pre_u: Tensor, pre_g: Optional[Tensor], row_weight: Tensor, activation: str,
                      blocks: Optional[GemmBlocks] = None, tile_tables: Optional[TileTables] = None
                      ) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """The grad-h kernel with the activation backward in its epilogue: from the saved pre-activations u, g [N, f]
    (g None without GLU) straight to their gradients [N, f], and grad row_weight [N] fp32; no grad h round trip."""
    return _grad_h(grad_y, row_token, offsets, w_down, b_down, pre_u, pre_g, row_weight, activation, blocks,
                   tile_tables)


def _grad_h(grad_y, row_token, offsets, w_down, b_down, h_or_u, pre_g, row_weight, activation, blocks, tile_tables):
    (N, f), (E, _, d) = h_or_u.shape, w_down.shape
    fuse = activation is not None
    blocks = tiles_for("grad_h_act" if fuse else "grad_h", blocks, h_or_u, N, d, f)
    out = torch.empty_like(h_or_u)  # grad h, or (fused) grad u
    out_g = torch.empty_like(pre_g) if fuse and pre_g is not None else None
    partial = torch.zeros(N, triton.cdiv(f, blocks.block_n), device=h_or_u.device, dtype=torch.float32)  # per f tile
    if N > 0:
        grid, tiles = row_launch(h_or_u, blocks, N, E, d, f)
        wd = weight_operand(w_down, blocks, True)[0]  # read transposed: [d chunk, f columns]
        _down_grad_h_kernel[grid](
            grad_y, row_token, offsets, wd, h_or_u if b_down is None else b_down, h_or_u,
            h_or_u if pre_g is None else pre_g, row_weight, out, out if out_g is None else out_g, partial,
            E, d, f, tiles.pop("M_TILES"), tiles.pop("TILES"),
            grad_y.stride(0), w_down.stride(0), w_down.stride(1), w_down.stride(2), d, h_or_u.stride(0),
            partial.stride(0), HAS_BIAS=b_down is not None, FUSE_ACT=fuse, GLU=pre_g is not None,
            ACT=activation or "silu", tiles_ptr=tile_table_arg(blocks, offsets, N, tile_tables), **tiles)
    return out, out_g, partial.sum(1)  # fixed-order reduction over f tiles


class _GroupedDownCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, w_down: Tensor, b_down: Optional[Tensor], offsets: Tensor, row_weight: Tensor,
                row_token: Tensor, num_tokens: int, blocks: Optional[GemmBlocks], slot: Optional[Tensor],
                token_offsets: Optional[Tensor]) -> Tensor:
        if slot is None:  # no order shared by the caller: build it (a sort, a scatter, a search)
            slot, token_offsets = TokenOrder.build(row_token, num_tokens).astuple()
        rows = launch_down(h, w_down, b_down, offsets, row_weight, slot, blocks)
        y = segment_sum(rows, token_offsets, h.dtype, elementwise_block(blocks, h.dtype))
        ctx.save_for_backward(h, w_down, b_down, offsets, row_weight, row_token)
        ctx.blocks = blocks
        return y

    @staticmethod
    @once_differentiable  # the backward kernels are not themselves differentiated
    def backward(ctx, grad_y: Tensor):
        h, w_down, b_down, offsets, row_weight, row_token = ctx.saved_tensors
        blocks, E = ctx.blocks, w_down.shape[0]
        grad_y = grad_y.contiguous()
        grad_h, grad_weight = launch_grad_h(grad_y, row_token, offsets, w_down, b_down, h, row_weight, blocks)
        grad_w = grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_w, _, grad_b, _ = grouped_wgrad(h, None, grad_y, None, row_token, row_weight, offsets, E,
                                                 b_down is not None, blocks)
        return grad_h, grad_w, grad_b, None, grad_weight.to(row_weight.dtype), None, None, None, None, None


def grouped_down_combine(h: Tensor, w_down: Tensor, b_down: Optional[Tensor], offsets: Tensor, row_weight: Tensor,
                         row_token: Tensor, num_tokens: int, *, blocks: Optional[GemmBlocks] = None,
                         token_order: Optional[TokenOrder] = None) -> Tensor:
    """h [N, f], w_down [E, f, d], b_down [E, d], offsets [E+1], row_weight [N] fp32, row_token [N] -> y [T, d]
    in h's dtype. Differentiable in h, w_down, b_down and row_weight. blocks: the tiles of every kernel of the
    call (default: each kernel's tuned or default tiles, moe.kernels.tile_configs). token_order:
    TokenOrder.build(row_token, num_tokens) when the caller has it (shared with gather_grouped_up's backward)."""
    check_device(h)
    dt = h.dtype
    return _GroupedDownCombine.apply(h.contiguous(), cast_weight(w_down, dt), cast_weight(b_down, dt),
                                     offsets.contiguous(), row_weight.contiguous(), row_token.contiguous(), num_tokens,
                                     blocks, *TokenOrder.unpack(token_order))
