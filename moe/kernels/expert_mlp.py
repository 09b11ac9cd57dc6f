"""The whole Triton expert MLP of a layer as one autograd function: gather + up + activation, down + combine.

Shape legend: T tokens, d model width, f expert hidden width, E experts, N plan rows sorted by expert (the
segment of expert e is rows offsets[e]:offsets[e+1]), row_token [N] the token each row carries, row_weight [N]
its combine weight.

    grouped_expert_mlp(x[T,d], row_token, offsets, row_weight, w_up, w_gate|None, b_up|None, b_gate|None,
                       w_down, b_down|None, activation) -> y[T,d]
      = grouped_down_combine(gather_grouped_up(x, ...), w_down, b_down, offsets, row_weight, row_token, T)

The same kernels as the two functions chained (moe.kernels.up_projection, moe.kernels.down_combine); what one
function gains is what only it can see:
- the token-major order is built once (or passed in as `token_order`: moe.dispatch.triton derives a dropless
  plan's without a sort, TokenOrder.from_dropless) for the combine and grad x's token sum;
- the persistent grid's tile tables (moe.kernels.tile_table) are built once per BLOCK_M for all four row-tiled
  GEMMs, forward and backward;
- h never needs a gradient of its own, so the grad-h GEMM's epilogue runs the activation backward
  (down_combine.launch_grad_h_act): grad h stays in registers in fp32, and the separate elementwise pass over
  five [N, f] tensors (read grad h, u, g; write grad u, grad g) becomes part of the GEMM (read u, g; write grad u,
  grad g), with h recomputed there from u, g for grad row_weight;
- `grouped_expert_rows` (one row per token, weight 1: the expert-parallel local step) needs no order at all: the
  down GEMM and grad x's GEMM store straight to each row's own position, with no per-token sum.
Saved for backward: x, h, the pre-activations u, g and the order (h is the A operand of w_down's gradient).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moe.kernels.activations import ACTIVATIONS
from moe.kernels.combine import TokenOrder, segment_sum
from moe.kernels.down_combine import launch_down, launch_grad_h_act
from moe.kernels.gemm_tiles import GemmBlocks, cast_weight, check_device
from moe.kernels.tile_configs import elementwise_block
from moe.kernels.tile_table import TileTables
from moe.kernels.up_projection import launch_grad_x, launch_up
from moe.kernels.weight_grad import grouped_wgrad


class _GroupedExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, row_token: Tensor, offsets: Tensor, row_weight: Tensor, w_up: Tensor,
                w_gate: Optional[Tensor], b_up: Optional[Tensor], b_gate: Optional[Tensor], w_down: Tensor,
                b_down: Optional[Tensor], activation: str, blocks: Optional[GemmBlocks], slot: Optional[Tensor],
                token_offsets: Optional[Tensor], permutation: bool) -> Tensor:
        if slot is None:
            slot, token_offsets = TokenOrder.build(row_token, x.shape[0]).astuple()
        # The persistent launches' tile tables, one per BLOCK_M, shared by the four row-tiled GEMMs of this call
        # (built on first use: none when no launch is persistent).
        tables = TileTables(offsets, row_token.numel())
        h, pre_u, pre_g = launch_up(x, row_token, offsets, w_up, w_gate, b_up, b_gate, activation,
                                    any(ctx.needs_input_grad), blocks, tables)
        rows = launch_down(h, w_down, b_down, offsets, row_weight, slot, blocks, tables)  # [N, d] token-major
        # A permutation (one row per token): the token-major rows are y itself, no per-token sum.
        y = rows if permutation else segment_sum(rows, token_offsets, x.dtype, elementwise_block(blocks, x.dtype))
        ctx.save_for_backward(x, row_token, offsets, row_weight, w_up, w_gate, w_down, b_down, h, pre_u, pre_g,
                              slot, token_offsets)
        ctx.activation, ctx.blocks, ctx.permutation, ctx.tables = activation, blocks, permutation, tables
        ctx.has_bias = (b_up is not None, b_gate is not None)
        return y

    @staticmethod
    @once_differentiable  # the backward kernels are not themselves differentiated
    def backward(ctx, grad_y: Tensor):
        x, row_token, offsets, row_weight, w_up, w_gate, w_down, b_down, h, pre_u, pre_g, slot, token_offsets = \
            ctx.saved_tensors
        blocks, E, need = ctx.blocks, w_up.shape[0], ctx.needs_input_grad
        grad_y = grad_y.contiguous()  # a reduction's gradient arrives expanded (stride 0)
        grad_u, grad_g, grad_weight = launch_grad_h_act(grad_y, row_token, offsets, w_down, b_down, pre_u, pre_g,
                                                        row_weight, ctx.activation, blocks, ctx.tables)
        grad_x = None
        if need[0]:
            rows = launch_grad_x(grad_u, grad_g, offsets, w_up, w_gate, slot, blocks, ctx.tables)  # [N, d]
            grad_x = rows if ctx.permutation else segment_sum(rows, token_offsets, x.dtype,
                                                               elementwise_block(blocks, x.dtype))
        grad_wu = grad_wg = grad_bu = grad_bg = grad_wd = grad_bd = None
        if any(need[4:8]):
            grad_wu, grad_wg, grad_bu, grad_bg = grouped_wgrad(x, row_token, grad_u, grad_g, None, None, offsets, E,
                                                               any(ctx.has_bias), blocks)
            grad_bu = grad_bu if ctx.has_bias[0] else None
            grad_bg = grad_bg if ctx.has_bias[1] else None
        if need[8] or need[9]:
            grad_wd, _, grad_bd, _ = grouped_wgrad(h, None, grad_y, None, row_token, row_weight, offsets, E,
                                                   b_down is not None, blocks)
        return (grad_x, None, None, grad_weight.to(row_weight.dtype), grad_wu, grad_wg, grad_bu, grad_bg, grad_wd,
                grad_bd, None, None, None, None, None)


def grouped_expert_mlp(x: Tensor, row_token: Tensor, offsets: Tensor, row_weight: Tensor, w_up: Tensor,
                       w_gate: Optional[Tensor], b_up: Optional[Tensor], b_gate: Optional[Tensor], w_down: Tensor,
                       b_down: Optional[Tensor], activation: str, *, blocks: Optional[GemmBlocks] = None,
                       token_order: Optional[TokenOrder] = None) -> Tensor:
    """x [T, d], row_token [N], offsets [E+1], row_weight [N] fp32, w_up/w_gate [E, d, f], b_up/b_gate [E, f],
    w_down [E, f, d], b_down [E, d] -> y [T, d] in x's dtype (w_gate None: no GLU). Differentiable in x,
    row_weight, the weights and the biases. blocks: the tiles of every kernel (default: tuned or default per
    kernel, moe.kernels.tile_configs); token_order: TokenOrder.build(row_token, T) if the caller has it."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: the Triton kernels support {ACTIVATIONS}")
    check_device(x)
    dt = x.dtype
    return _GroupedExpertMLP.apply(x.contiguous(), row_token.contiguous(), offsets.contiguous(),
                                   row_weight.contiguous(), cast_weight(w_up, dt), cast_weight(w_gate, dt),
                                   cast_weight(b_up, dt), cast_weight(b_gate, dt), cast_weight(w_down, dt),
                                   cast_weight(b_down, dt), activation, blocks, *TokenOrder.unpack(token_order),
                                   False)


def grouped_expert_rows(x: Tensor, row_index: Tensor, offsets: Tensor, w_up: Tensor, w_gate: Optional[Tensor],
                        b_up: Optional[Tensor], b_gate: Optional[Tensor], w_down: Tensor, b_down: Optional[Tensor],
                        activation: str, *, blocks: Optional[GemmBlocks] = None) -> Tensor:
    """Each row of x through one expert, back in its own place: x [M, d], row_index [M] a permutation (row r of
    expert order is x row row_index[r]), offsets [E+1] -> out [M, d], out[row_index[r]] = expert_{e_r}(x[row_index[r]]).

    The expert-parallel dispatcher's local step (rows arrive in source-rank order): no token-major sort (the slot
    of row r is row_index[r]), no combine weight, no per-token sum; the down GEMM stores straight to the arrival
    row, and in backward grad x's GEMM likewise. row_index must be a permutation of 0..M-1 (not checked: that
    would read it on the host)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: the Triton kernels support {ACTIVATIONS}")
    check_device(x)
    dt, M = x.dtype, x.shape[0]
    ones = torch.ones(M, device=x.device, dtype=torch.float32)
    token_offsets = torch.arange(M + 1, device=x.device)
    return _GroupedExpertMLP.apply(x.contiguous(), row_index.contiguous(), offsets.contiguous(), ones,
                                   cast_weight(w_up, dt), cast_weight(w_gate, dt), cast_weight(b_up, dt),
                                   cast_weight(b_gate, dt), cast_weight(w_down, dt), cast_weight(b_down, dt),
                                   activation, blocks, row_index.contiguous(), token_offsets, True)
