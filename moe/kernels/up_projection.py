"""The Triton gather + up projection + activation, and its backward.

Shape legend: T tokens, d model width, f expert hidden width, E experts, N plan rows sorted by expert (the
segment of expert e is rows offsets[e]:offsets[e+1]), row_token [N] the token each row carries.

    gather_grouped_up(x[T,d], row_token, offsets, w_up[E,d,f], w_gate|None, b_up|None, b_gate|None, act) -> h[N,f]
        h[r] = act(x[t_r] @ w_gate[e_r] + b_gate[e_r]) * (x[t_r] @ w_up[e_r] + b_up[e_r])      (GLU)
        h[r] = act(x[t_r] @ w_up[e_r] + b_up[e_r])                                             (no GLU)

- The gather is fused: the up kernel loads rows of x through row_token (no permuted [N, d] copy of x), and
  the epilogue adds the bias, applies the activation and the GLU product. When a gradient will be needed the
  epilogue also stores the pre-activations (saved instead of recomputed in backward: 2·N·f more memory, one
  GEMM less).
- Backward: the activation gradient is one elementwise kernel here (`launch_act_backward`: grad h from the
  caller is all this function sees) writing the [N, f] gradients of the pre-activations, read by the
  input-gradient GEMM (`launch_grad_x`: moe.kernels.down_combine's rows_to_slots_kernel with the weights read
  transposed, then the per-token sum) and the weight-gradient GEMM (moe.kernels.weight_grad). The whole-layer
  function moe.kernels.expert_mlp fuses the activation backward into the grad-h GEMM instead.
- Each kernel has a launcher of its own (launch_up, launch_act_backward, launch_grad_x) for benchmarks and
  moe.kernels.autotune; they take contiguous operands in one dtype and resolve their tiles per kernel.
Tiles, precision and block sizes: moe.kernels.gemm_tiles and moe.kernels.tile_configs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from moe.kernels.activations import ACTIVATIONS, mlp_backward, mlp_value
from moe.kernels.combine import INTERPRETED, TokenOrder, round_to, segment_sum
from moe.kernels.down_combine import rows_to_slots_kernel
from moe.kernels.gemm_tiles import (GemmBlocks, cast_weight, check_device, col_offsets, expert_weight, load_rows, mma,
                                    row_launch, row_operand, row_tile, swizzle, tile_counts, tile_table_arg,
                                    weight_operand)
from moe.kernels.tile_configs import elementwise_block, tiles_for
from moe.kernels.tile_table import TileTables
from moe.kernels.weight_grad import grouped_wgrad

@triton.jit
def _gather_up_kernel(
    x_ptr, row_token_ptr, offsets_ptr, wu_ptr, wg_ptr, bu_ptr, bg_ptr, h_ptr, pu_ptr, pg_ptr,
    E, D, F, M_TILES, TILES,
    stride_xt, stride_xd, stride_we, stride_wd, stride_wf, stride_be, stride_hn, tiles_ptr,
    GLU: tl.constexpr, HAS_BU: tl.constexpr, HAS_BG: tl.constexpr, ACT: tl.constexpr, SAVE_PRE: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_POW2: tl.constexpr,
    W_DESC: tl.constexpr,
):
    """h[r, cols] = act(x[t_r] @ wg[e] + bg) * (x[t_r] @ wu[e] + bu) for one (row tile, column tile).
    W_DESC: wu_ptr / wg_ptr are TMA descriptors of the weights (gemm_tiles.weight_operand). x stays a pointer:
    its rows are gathered through row_token, and Hopper's TMA has no row gather. tiles_ptr: the tile table of a
    persistent launch (moe.kernels.tile_table), or None."""
    # One tile per program (grid = TILES: one trip), or persistent (fewer programs, ~one per SM): each program
    # takes tiles pid, pid + programs, ... of the swizzled order, up to the tile table's count.
    m_tiles, tiles = tile_counts(tiles_ptr, M_TILES, TILES, tl.cdiv(F, BLOCK_N))
    for pid in range(tl.program_id(0), tiles, tl.num_programs(0)):
        pid_m, pid_n = swizzle(pid, m_tiles, tl.cdiv(F, BLOCK_N), GROUP_M)
        e, row_start, row_end = row_tile(pid_m, offsets_ptr, tiles_ptr, E, BLOCK_M, E_POW2)
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        tok = tl.load(row_token_ptr + rows, mask=row_mask, other=0).to(tl.int64)  # the gather: x rows via row_token
        cols = col_offsets(pid_n, BLOCK_N)
        col_mask = cols < F
        k_stop = tl.where(row_start < row_end, D, 0)  # an empty tile skips the K loop entirely
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        w_off = e.to(tl.int64) * stride_we + cols[None, :] * stride_wf
        for k0 in range(0, k_stop, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = load_rows(x_ptr + tok[:, None] * stride_xt + ks[None, :] * stride_xd, row_mask, ks, D, EVEN_K)
            wu = expert_weight(wu_ptr, w_off, stride_wd, e, k0, pid_n, ks, D, cols, F, EVEN_K, EVEN_N, W_DESC,
                               False, BLOCK_K, BLOCK_N)
            acc_u = mma(a, wu, acc_u, PRECISION, INTERPRETED)
            if GLU:  # the gate shares the x tile: one load of x feeds both products
                wg = expert_weight(wg_ptr, w_off, stride_wd, e, k0, pid_n, ks, D, cols, F, EVEN_K, EVEN_N, W_DESC,
                                   False, BLOCK_K, BLOCK_N)
                acc_g = mma(a, wg, acc_g, PRECISION, INTERPRETED)
        # Epilogue: bias, activation, GLU product, all in fp32.
        if HAS_BU:
            acc_u += tl.load(bu_ptr + e * stride_be + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if GLU and HAS_BG:
            acc_g += tl.load(bg_ptr + e * stride_be + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        h = mlp_value(acc_u, acc_g, GLU, ACT)
        out_off = rows.to(tl.int64)[:, None] * stride_hn + cols[None, :]
        out_mask = row_mask[:, None] & col_mask[None, :]
        tl.store(h_ptr + out_off, round_to(h, h_ptr.dtype.element_ty, INTERPRETED), mask=out_mask)
        if SAVE_PRE:  # pre-activations for backward (in the activation dtype, like torch autograd would keep them)
            tl.store(pu_ptr + out_off, round_to(acc_u, pu_ptr.dtype.element_ty, INTERPRETED), mask=out_mask)
            if GLU:
                tl.store(pg_ptr + out_off, round_to(acc_g, pg_ptr.dtype.element_ty, INTERPRETED), mask=out_mask)


@triton.jit
def _act_backward_kernel(gh_ptr, pu_ptr, pg_ptr, gu_ptr, gg_ptr, numel,
                         GLU: tl.constexpr, ACT: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK: tl.constexpr):
    """Elementwise over [N, f]: GLU  gu = gh act(pg), gg = gh pu act'(pg);  no GLU  gu = gh act'(pu)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    gh = tl.load(gh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(pu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = u
    if GLU:
        g = tl.load(pg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gu, gg = mlp_backward(gh, u, g, GLU, ACT)
    tl.store(gu_ptr + offs, round_to(gu, gu_ptr.dtype.element_ty, INTERPRETED), mask=mask)
    if GLU:
        tl.store(gg_ptr + offs, round_to(gg, gg_ptr.dtype.element_ty, INTERPRETED), mask=mask)


def launch_up(x: Tensor, row_token: Tensor, offsets: Tensor, w_up: Tensor, w_gate: Optional[Tensor],
              b_up: Optional[Tensor], b_gate: Optional[Tensor], activation: str, save_pre: bool,
              blocks: Optional[GemmBlocks] = None, tile_tables: Optional[TileTables] = None
              ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """The up kernel alone (contiguous operands in one dtype): h [N, f], and when save_pre the pre-activations
    u, g [N, f] (g None without GLU). tile_tables: the layer call's tile tables (persistent launches), if any."""
    (_, d), (E, _, f), N = x.shape, w_up.shape, row_token.numel()
    glu = w_gate is not None
    blocks = tiles_for("up_glu" if glu else "up", blocks, x, N, d, f)
    h = x.new_empty(N, f)
    pre_u = x.new_empty(N, f) if save_pre else None  # pre-activations kept for backward
    pre_g = x.new_empty(N, f) if save_pre and glu else None
    if N > 0:
        grid, tiles = row_launch(x, blocks, N, E, d, f)
        wu, desc = weight_operand(w_up, blocks, False)
        wg = wu if w_gate is None else weight_operand(w_gate, blocks, False)[0]
        _gather_up_kernel[grid](
            x, row_token, offsets, wu, wg,
            h if b_up is None else b_up, h if b_gate is None else b_gate,
            h, h if pre_u is None else pre_u, h if pre_g is None else pre_g,
            E, d, f, tiles.pop("M_TILES"), tiles.pop("TILES"),
            x.stride(0), x.stride(1), w_up.stride(0), w_up.stride(1), w_up.stride(2), f, h.stride(0),
            GLU=glu, HAS_BU=b_up is not None, HAS_BG=b_gate is not None, ACT=activation, SAVE_PRE=save_pre,
            W_DESC=desc, tiles_ptr=tile_table_arg(blocks, offsets, N, tile_tables), **tiles)
    return h, pre_u, pre_g


def launch_act_backward(grad_h: Tensor, pre_u: Tensor, pre_g: Optional[Tensor], activation: str,
                        blocks: Optional[GemmBlocks] = None) -> tuple[Tensor, Optional[Tensor]]:
    """The activation backward alone: grad_h, u, g [N, f] -> gradients of the pre-activations u, g [N, f]."""
    numel = grad_h.numel()
    grad_u = torch.empty_like(pre_u)
    grad_g = torch.empty_like(pre_g) if pre_g is not None else None
    if numel > 0:
        block = min(elementwise_block(blocks, grad_h.dtype), triton.next_power_of_2(numel))
        _act_backward_kernel[(triton.cdiv(numel, block),)](
            grad_h, pre_u, pre_u if pre_g is None else pre_g, grad_u, grad_u if grad_g is None else grad_g,
            numel, GLU=pre_g is not None, ACT=activation, INTERPRETED=INTERPRETED, BLOCK=block,
            num_warps=4)
    return grad_u, grad_g


def launch_grad_x(grad_u: Tensor, grad_g: Optional[Tensor], offsets: Tensor, w_up: Tensor, w_gate: Optional[Tensor],
                  slot: Tensor, blocks: Optional[GemmBlocks] = None, tile_tables: Optional[TileTables] = None
                  ) -> Tensor:
    """The input-gradient GEMM alone: rows [N, d] in grad_u's dtype = gu @ w_up[e]^T (+ gg @ w_gate[e]^T), row r
    written to slot[r] (the token-major order; moe.kernels.combine.segment_sum then sums each token's rows in
    fp32). Under blocks.tma grad u / grad g (rows in expert order) and the weights come through descriptors."""
    (N, f), (E, d, _) = grad_u.shape, w_up.shape
    glu = grad_g is not None
    blocks = tiles_for("grad_x_glu" if glu else "grad_x", blocks, grad_u, N, f, d)
    rows = torch.empty(N, d, device=grad_u.device, dtype=grad_u.dtype)  # bf16 rows: half the traffic of fp32
    if N > 0:
        grid, tiles = row_launch(grad_u, blocks, N, E, f, d)
        wu, desc = weight_operand(w_up, blocks, True)  # read transposed: [f chunk, d columns]
        wg = wu if w_gate is None else weight_operand(w_gate, blocks, True)[0]
        gu = row_operand(grad_u, blocks)
        rows_to_slots_kernel[grid](
            gu, gu if grad_g is None else row_operand(grad_g, blocks), offsets, wu, wg,
            rows, rows, slot, rows, E, f, d, tiles.pop("M_TILES"), tiles.pop("TILES"),
            grad_u.stride(0), w_up.stride(0), w_up.stride(2), w_up.stride(1), 0, rows.stride(0),
            TWO=glu, HAS_BIAS=False, HAS_SCALE=False, W_DESC=desc, W_TRANS=True,
            tiles_ptr=tile_table_arg(blocks, offsets, N, tile_tables), **tiles)
    return rows


class _GatherGroupedUp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, row_token: Tensor, offsets: Tensor, w_up: Tensor, w_gate: Optional[Tensor],
                b_up: Optional[Tensor], b_gate: Optional[Tensor], activation: str,
                blocks: Optional[GemmBlocks], slot: Optional[Tensor], token_offsets: Optional[Tensor]) -> Tensor:
        h, pre_u, pre_g = launch_up(x, row_token, offsets, w_up, w_gate, b_up, b_gate, activation,
                                    any(ctx.needs_input_grad), blocks)
        ctx.save_for_backward(x, row_token, offsets, w_up, w_gate, pre_u, pre_g, slot, token_offsets)
        ctx.activation, ctx.blocks = activation, blocks
        ctx.has_bias = (b_up is not None, b_gate is not None)
        return h

    @staticmethod
    @once_differentiable  # the backward kernels are not themselves differentiated
    def backward(ctx, grad_h: Tensor):
        x, row_token, offsets, w_up, w_gate, pre_u, pre_g, slot, token_offsets = ctx.saved_tensors
        blocks, E = ctx.blocks, w_up.shape[0]
        grad_h = grad_h.contiguous()  # a reduction's gradient arrives expanded (stride 0)
        # Gradients of the pre-activations, elementwise: [N, f] each, in the activation dtype.
        grad_u, grad_g = launch_act_backward(grad_h, pre_u, pre_g, ctx.activation, blocks)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # grad rows [N, d] = gu @ w_up[e]^T (+ gg @ w_gate[e]^T), written token-major in x's dtype and summed
            # per token in fp32 in a fixed order: deterministic, no atomics.
            if slot is None:  # no order shared by the caller: build it (a sort, a scatter, a search)
                slot, token_offsets = TokenOrder.build(row_token, x.shape[0]).astuple()
            rows = launch_grad_x(grad_u, grad_g, offsets, w_up, w_gate, slot, blocks)
            grad_x = segment_sum(rows, token_offsets, x.dtype, elementwise_block(blocks, x.dtype))
        grad_wu = grad_wg = grad_bu = grad_bg = None
        if any(ctx.needs_input_grad[3:7]):
            with_bias = any(ctx.has_bias)
            grad_wu, grad_wg, grad_bu, grad_bg = grouped_wgrad(x, row_token, grad_u, grad_g, None, None, offsets, E,
                                                               with_bias, blocks)
            grad_bu = grad_bu if ctx.has_bias[0] else None
            grad_bg = grad_bg if ctx.has_bias[1] else None
        return grad_x, None, None, grad_wu, grad_wg, grad_bu, grad_bg, None, None, None, None


def gather_grouped_up(x: Tensor, row_token: Tensor, offsets: Tensor, w_up: Tensor, w_gate: Optional[Tensor],
                      b_up: Optional[Tensor], b_gate: Optional[Tensor], activation: str, *,
                      blocks: Optional[GemmBlocks] = None, token_order: Optional[TokenOrder] = None) -> Tensor:
    """x [T, d], row_token [N], offsets [E+1], w_up/w_gate [E, d, f], b_up/b_gate [E, f] -> h [N, f] in x's
    dtype (w_gate None: no GLU). Differentiable in x, the weights and the biases. blocks: the tiles of every
    kernel of the call (default: each kernel's tuned or default tiles, moe.kernels.tile_configs). token_order:
    TokenOrder.build(row_token, T) when the caller has it (the combine needs the same one): grad x reuses it
    instead of building it again."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: the Triton kernels support {ACTIVATIONS}")
    check_device(x)
    dt = x.dtype
    return _GatherGroupedUp.apply(x.contiguous(), row_token.contiguous(), offsets.contiguous(), cast_weight(w_up, dt),
                                  cast_weight(w_gate, dt), cast_weight(b_up, dt), cast_weight(b_gate, dt), activation,
                                  blocks, *TokenOrder.unpack(token_order))
