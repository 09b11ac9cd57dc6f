"""Fused Triton grouped GEMMs for the expert feed-forward: gather + up-projection + activation, and
down-projection + weighted combine, with their backward passes.

Shape legend: T tokens, d model width, f expert hidden width, E experts, N plan rows sorted by expert (the
segment of expert e is rows offsets[e]:offsets[e+1]), row_token [N] the token each row carries, row_weight [N]
its combine weight.

    gather_grouped_up(x[T,d], row_token, offsets, w_up[E,d,f], w_gate|None, b_up|None, b_gate|None, act) -> h[N,f]
        h[r] = act(x[t_r] @ w_gate[e_r] + b_gate[e_r]) * (x[t_r] @ w_up[e_r] + b_up[e_r])      (GLU)
        h[r] = act(x[t_r] @ w_up[e_r] + b_up[e_r])                                             (no GLU)
    grouped_down_combine(h[N,f], w_down[E,f,d], b_down|None, offsets, row_weight, row_token, T) -> y[T,d]
        y[t] = sum over rows r of token t of row_weight[r] * (h[r] @ w_down[e_r] + b_down[e_r])

How the kernels are laid out, and why:
- Row-tiled kernels (the up GEMM, the down GEMM, their input-gradient GEMMs) launch one program per (row tile,
  column tile). Each expert's segment is cut into cdiv(n_e, BLOCK_M) tiles numbered expert after expert, and a
  program finds its expert by a prefix sum over `offsets` inside the kernel (`_expert_tile`). A tile therefore
  never straddles two experts, and the grid is the fixed upper bound cdiv(N, BLOCK_M) + E - 1 programs, known
  from shapes alone: nothing waits for per-expert counts to reach the host. Spare programs find an empty row
  range and do nothing.
- The gather is fused: the up kernel loads rows of x through row_token (no permuted [N, d] copy of x), and
  the epilogue adds the bias, applies the activation and the GLU product. When a gradient will be needed the
  epilogue also stores the pre-activations (saved instead of recomputed in backward: 2·N·f more memory, one
  GEMM less).
- The combine is fused and deterministic: the down kernel's epilogue adds the bias, multiplies by the combine
  weight in fp32 and writes row r to its token-major slot (moe.kernels.combine.TokenOrder); a segmented sum
  then adds each token's rows in a fixed order. No atomics anywhere, so forward and backward are bitwise
  reproducible on CUDA (the input gradient of x takes the same slot + segmented-sum route).
- Weight gradients (`_grouped_wgrad_kernel`) launch one program per (expert, weight tile) and loop over that
  expert's rows, gathering x (or grad_y) rows through row_token inside the kernel; the bias gradient is the
  column sum of the same tiles, fused in. An empty expert runs zero iterations and writes zeros.
- grad of the combine weight: <grad_y[t_r], h[r] @ w_down[e] + b_down[e]> = <grad_y[t_r] @ w_down[e]^T, h[r]> +
  <grad_y[t_r], b_down[e]>. The first factor is exactly the un-scaled grad of h, so the grad-h kernel's
  epilogue produces it with no extra GEMM: each column tile writes its partial dot product to a
  [N, column tiles] buffer that is summed afterwards (a fixed-order sum, not an atomic).
- Products accumulate in fp32; outputs come back in the activation dtype. fp32 inputs use IEEE fp32 dot
  products unless torch allows TF32 (torch.backends.cuda.matmul.allow_tf32), matching torch's own matmuls.
  Weights in another dtype (fp32 masters under autocast) are cast to the activation dtype before the call.

Not fused (separate launches): the activation gradient (one elementwise kernel writing the [N, f] gradients of
the pre-activations, read by the input- and weight-gradient GEMMs), the per-token segmented sums, and the
token-major order (a stable torch.sort, a scatter and a searchsorted; built in the combine's forward and again
in the up projection's backward).

Block sizes are a `GemmBlocks` argument: GPU defaults are fixed (not autotuned: autotuning benchmarks every
config on the first call of each shape, and with no GPU in CI its configs could not be tested here); the
Triton interpreter (TRITON_INTERPRET=1, CPU tensors, used by the tests) gets large blocks because its cost
grows with the number of program instances, not with their size. The interpreter also needs two workarounds
(see `_mma` and moe.kernels.combine.round_to): its bf16 dot multiplies the raw bits, and its fp32 -> bf16
cast truncates instead of rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from moe.kernels import next_pow2
from moe.kernels.combine import INTERPRETED, TokenOrder, round_to, segment_sum

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


@dataclass(frozen=True)
class GemmBlocks:
    """Tile sizes. Row-tiled kernels use (block_m rows, block_n output columns, block_k reduction chunk);
    the weight-gradient kernel uses a block_m × block_n weight tile and reduces over block_k plan rows."""

    block_m: int = 64  # plan rows per tile (GPU: 64 keeps two fp32 GLU accumulators in registers)
    block_n: int = 128  # output columns per tile
    block_k: int = 64  # reduction chunk per loop iteration (>= 16: tl.dot's minimum on GPU)
    block_elementwise: int = 1024  # elements per program of the activation-gradient kernel and the token sum
    num_warps: int = 4
    num_stages: int = 3  # software pipelining depth of the K loop (GPU only)


GPU_BLOCKS = GemmBlocks()
# fp32 operands take twice the shared memory per stage: a 32-wide K chunk keeps the GLU kernels (two weight
# tiles per stage) near 100 KB, under the A100's 164 KB as well as the H100's 227 KB.
GPU_BLOCKS_FP32 = GemmBlocks(block_k=32)
# The interpreter runs program instances one after another in numpy: few large tiles are fastest.
INTERPRETER_BLOCKS = GemmBlocks(block_m=64, block_n=64, block_k=64, block_elementwise=1 << 16,
                                num_warps=1, num_stages=1)


def _blocks_for(blocks: Optional[GemmBlocks], dtype: torch.dtype) -> GemmBlocks:
    if blocks is not None:
        return blocks
    if INTERPRETED:
        return INTERPRETER_BLOCKS
    return GPU_BLOCKS_FP32 if dtype == torch.float32 else GPU_BLOCKS


def _check_device(t: Tensor) -> None:
    if t.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the Triton grouped GEMM runs on CUDA tensors, or on {t.device.type} tensors under "
                         "the Triton interpreter: set TRITON_INTERPRET=1 before triton is first imported")


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 operands get TF32 only where torch allows it for its own matmuls; for bf16 /
    fp16 operands Triton ignores the setting, and "tf32" is its default, so they keep the default."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _pow2(n: int) -> int:
    return max(2, next_pow2(n))  # tl.arange needs a power of two, and at least 2 here


# ---------------------------------------------------------------------------------------------- device helpers


@triton.jit
def _expert_tile(pid, offsets_ptr, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """Row tile `pid` -> (expert e, first row, end of e's segment). Tiles are numbered expert after expert,
    cdiv(n_e, BLOCK_M) per expert; a pid past the last tile gets an empty range (first row >= end)."""
    ex = tl.arange(0, E_POW2)
    lo = tl.load(offsets_ptr + ex, mask=ex < E, other=0).to(tl.int64)  # segment starts (0 past E)
    hi = tl.load(offsets_ptr + ex + 1, mask=ex < E, other=0).to(tl.int64)  # segment ends
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M  # row tiles per expert; 0 for an empty expert
    tile_end = tl.cumsum(tiles, 0)  # one past each expert's last tile
    e = tl.sum((tile_end <= pid).to(tl.int32), 0)  # experts whose tiles all come before pid
    sel = ex == e  # one-hot of e (all False past the last expert: everything below sums to 0)
    first_tile = tl.sum(tl.where(sel, tile_end - tiles, 0), 0)
    row_start = tl.sum(tl.where(sel, lo, 0), 0) + (pid - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(sel, hi, 0), 0)
    return tl.minimum(e, E - 1), row_start, row_end  # clamp e so that masked pointer arithmetic stays sane


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc += a @ b. Under the interpreter (INTERPRETED) a bf16 dot multiplies the raw uint16 storage, so the
    operands go to fp32 first, which gives the GPU's result (products of bf16 values are exact in fp32)."""
    if INTERPRETED:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _act(z, ACT: tl.constexpr):
    """Activation of fp32 z (tanh written through sigmoid: tl has no tanh of its own)."""
    if ACT == "gelu":  # exact GELU, torch's default
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        out = 0.5 * z * (2.0 * tl.sigmoid(2.0 * inner))  # 1 + tanh(u) = 2 sigmoid(2u)
    elif ACT == "relu":
        out = tl.maximum(z, 0.0)
    else:  # silu
        out = z * tl.sigmoid(z)
    return out


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """d act / dz of fp32 z."""
    if ACT == "gelu":  # Phi(z) + z phi(z)
        out = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == "gelu_tanh":
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        th = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        out = 0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACT == "relu":
        out = tl.where(z > 0.0, 1.0, 0.0)  # torch's relu has gradient 0 at 0
    else:  # silu
        s = tl.sigmoid(z)
        out = s * (1.0 + z * (1.0 - s))
    return out


# ------------------------------------------------------------------------------------------------ the kernels


@triton.jit
def _gather_up_kernel(
    x_ptr, row_token_ptr, offsets_ptr, wu_ptr, wg_ptr, bu_ptr, bg_ptr, h_ptr, pu_ptr, pg_ptr,
    E, D, F,
    stride_xt, stride_xd, stride_we, stride_wd, stride_wf, stride_be, stride_hn,
    GLU: tl.constexpr, HAS_BU: tl.constexpr, HAS_BG: tl.constexpr, ACT: tl.constexpr, SAVE_PRE: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_POW2: tl.constexpr,
):
    """h[r, cols] = act(x[t_r] @ wg[e] + bg) * (x[t_r] @ wu[e] + bu) for one (row tile, column tile)."""
    e, row_start, row_end = _expert_tile(tl.program_id(0), offsets_ptr, E, BLOCK_M, E_POW2)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    tok = tl.load(row_token_ptr + rows, mask=row_mask, other=0).to(tl.int64)  # the gather: x rows via row_token
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < F
    k_stop = tl.where(row_start < row_end, D, 0)  # an empty tile skips the K loop entirely
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_off = e.to(tl.int64) * stride_we + cols[None, :] * stride_wf
    for k0 in range(0, k_stop, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D
        a = tl.load(x_ptr + tok[:, None] * stride_xt + ks[None, :] * stride_xd,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        wu = tl.load(wu_ptr + w_off + ks[:, None] * stride_wd, mask=w_mask, other=0.0)
        acc_u = _mma(a, wu, acc_u, PRECISION, INTERPRETED)
        if GLU:  # the gate shares the x tile: one load of x feeds both products
            wg = tl.load(wg_ptr + w_off + ks[:, None] * stride_wd, mask=w_mask, other=0.0)
            acc_g = _mma(a, wg, acc_g, PRECISION, INTERPRETED)
    # Epilogue: bias, activation, GLU product, all in fp32.
    if HAS_BU:
        acc_u += tl.load(bu_ptr + e * stride_be + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if GLU:
        if HAS_BG:
            acc_g += tl.load(bg_ptr + e * stride_be + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        h = _act(acc_g, ACT) * acc_u
    else:
        h = _act(acc_u, ACT)
    out_off = rows.to(tl.int64)[:, None] * stride_hn + cols[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    tl.store(h_ptr + out_off, round_to(h, h_ptr.dtype.element_ty, INTERPRETED), mask=out_mask)
    if SAVE_PRE:  # pre-activations for backward (in the activation dtype, like torch autograd would keep them)
        tl.store(pu_ptr + out_off, round_to(acc_u, pu_ptr.dtype.element_ty, INTERPRETED), mask=out_mask)
        if GLU:
            tl.store(pg_ptr + out_off, round_to(acc_g, pg_ptr.dtype.element_ty, INTERPRETED), mask=out_mask)


@triton.jit
def _rows_to_slots_kernel(
    a1_ptr, a2_ptr, offsets_ptr, w1_ptr, w2_ptr, bias_ptr, scale_ptr, slot_ptr, out_ptr,
    E, K, NOUT,
    stride_am, stride_we, stride_wk, stride_wn, stride_be, stride_om,
    TWO: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_POW2: tl.constexpr,
):
    """out[slot[r], cols] = scale[r] * (a1[r] @ w1[e] (+ a2[r] @ w2[e]) + bias[e]) in fp32.
    Forward down projection + combine: a1 = h, w1 = w_down, scale = row_weight.
    Backward of the up projection: a1, a2 = grad of the up / gate pre-activations, w1, w2 = w_up, w_gate read
    transposed through their strides (no transposed copy)."""
    e, row_start, row_end = _expert_tile(tl.program_id(0), offsets_ptr, E, BLOCK_M, E_POW2)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < NOUT
    k_stop = tl.where(row_start < row_end, K, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_off = rows.to(tl.int64)[:, None] * stride_am
    w_off = e.to(tl.int64) * stride_we + cols[None, :] * stride_wn
    for k0 in range(0, k_stop, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a_mask = row_mask[:, None] & k_mask[None, :]
        w_mask = k_mask[:, None] & col_mask[None, :]
        a = tl.load(a1_ptr + a_off + ks[None, :], mask=a_mask, other=0.0)
        w = tl.load(w1_ptr + w_off + ks[:, None] * stride_wk, mask=w_mask, other=0.0)
        acc = _mma(a, w, acc, PRECISION, INTERPRETED)
        if TWO:  # GLU backward: both products land in the same accumulator (grad x = gu wu^T + gg wg^T)
            a = tl.load(a2_ptr + a_off + ks[None, :], mask=a_mask, other=0.0)
            w = tl.load(w2_ptr + w_off + ks[:, None] * stride_wk, mask=w_mask, other=0.0)
            acc = _mma(a, w, acc, PRECISION, INTERPRETED)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e * stride_be + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:  # the combine weight, applied in fp32 before any rounding
        acc *= tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    slot = tl.load(slot_ptr + rows, mask=row_mask, other=0).to(tl.int64)  # token-major position of each row
    out = round_to(acc, out_ptr.dtype.element_ty, INTERPRETED)
    tl.store(out_ptr + slot[:, None] * stride_om + cols[None, :], out, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _down_grad_h_kernel(
    gy_ptr, row_token_ptr, offsets_ptr, w_ptr, b_ptr, h_ptr, rw_ptr, gh_ptr, part_ptr,
    E, D, F,
    stride_gt, stride_we, stride_wf, stride_wd, stride_be, stride_hn, stride_pn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_POW2: tl.constexpr,
):
    """g = grad_y[t_r] @ w_down[e]^T for one (row tile, f tile); writes grad h = row_weight * g and the partial
    grad of row_weight <g, h[r]> (+ <grad_y[t_r], b_down[e]> in column tile 0) into part[r, column tile]."""
    pid_n = tl.program_id(1)
    e, row_start, row_end = _expert_tile(tl.program_id(0), offsets_ptr, E, BLOCK_M, E_POW2)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    tok = tl.load(row_token_ptr + rows, mask=row_mask, other=0).to(tl.int64)  # gather grad_y rows via row_token
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of f
    col_mask = cols < F
    k_stop = tl.where(row_start < row_end, D, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    w_off = e.to(tl.int64) * stride_we + cols[None, :] * stride_wf
    for k0 in range(0, k_stop, BLOCK_K):  # reduce over d
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D
        g = tl.load(gy_ptr + tok[:, None] * stride_gt + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + w_off + ks[:, None] * stride_wd, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = _mma(g, w, acc, PRECISION, INTERPRETED)  # w_down[e] read transposed: [d chunk, f tile]
        if HAS_BIAS:
            b = tl.load(b_ptr + e * stride_be + ks, mask=k_mask, other=0.0).to(tl.float32)
            bias_dot += tl.sum(g.to(tl.float32) * b[None, :], 1)
    out_mask = row_mask[:, None] & col_mask[None, :]
    h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_hn + cols[None, :], mask=out_mask, other=0.0)
    part = tl.sum(acc * h.to(tl.float32), 1)  # <g, h[r]> over this f tile
    if HAS_BIAS:
        part += tl.where(pid_n == 0, bias_dot, 0.0)  # the bias term is counted once, by the first f tile
    tl.store(part_ptr + rows.to(tl.int64) * stride_pn + pid_n, part, mask=row_mask)
    rw = tl.load(rw_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(gh_ptr + rows.to(tl.int64)[:, None] * stride_hn + cols[None, :],
             round_to(acc * rw[:, None], gh_ptr.dtype.element_ty, INTERPRETED), mask=out_mask)


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
    ps = (tl.program_id(0) // n_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = (tl.program_id(0) % n_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
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
        b_mask = r_mask[:, None] & q_mask[None, :]
        b1 = tl.load(b1_ptr + b_rows[:, None] * stride_bm + qs[None, :], mask=b_mask, other=0.0)
        if HAS_SCALE:  # scale in fp32, then back to the operand dtype for the tensor-core product
            b1f = b1.to(tl.float32) * tl.load(scale_ptr + rows, mask=r_mask, other=0.0).to(tl.float32)[:, None]
            b1 = round_to(b1f, b1_ptr.dtype.element_ty, INTERPRETED)
        else:
            b1f = b1.to(tl.float32)
        if HAS_BIAS:
            db1 += tl.sum(b1f, 0)
        acc1 = _mma(tl.trans(a), b1, acc1, PRECISION, INTERPRETED)
        if TWO:  # GLU: the gate's gradient shares the loaded x tile
            b2 = tl.load(b2_ptr + b_rows[:, None] * stride_bm + qs[None, :], mask=b_mask, other=0.0)
            if HAS_BIAS:
                db2 += tl.sum(b2.to(tl.float32), 0)
            acc2 = _mma(tl.trans(a), b2, acc2, PRECISION, INTERPRETED)
    w_off = e.to(tl.int64) * stride_we + ps[:, None] * stride_wp + qs[None, :]
    w_mask = p_mask[:, None] & q_mask[None, :]
    tl.store(dw1_ptr + w_off, round_to(acc1, dw1_ptr.dtype.element_ty, INTERPRETED), mask=w_mask)
    if TWO:
        tl.store(dw2_ptr + w_off, round_to(acc2, dw2_ptr.dtype.element_ty, INTERPRETED), mask=w_mask)
    if HAS_BIAS:
        # Only the first P tile's programs write it (the row-vector form keeps the interpreter's mask boolean).
        p_tile = tl.zeros((BLOCK_Q,), dtype=tl.int32) + tl.program_id(0) // n_q
        b_mask = q_mask & (p_tile == 0)
        tl.store(db1_ptr + e * stride_be + qs, round_to(db1, db1_ptr.dtype.element_ty, INTERPRETED), mask=b_mask)
        if TWO:
            db2 = round_to(db2, db2_ptr.dtype.element_ty, INTERPRETED)
            tl.store(db2_ptr + e * stride_be + qs, db2, mask=b_mask)


@triton.jit
def _act_backward_kernel(gh_ptr, pu_ptr, pg_ptr, gu_ptr, gg_ptr, numel,
                         GLU: tl.constexpr, ACT: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK: tl.constexpr):
    """Elementwise over [N, f]: GLU  gu = gh act(pg), gg = gh pu act'(pg);  no GLU  gu = gh act'(pu)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    gh = tl.load(gh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(pu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GLU:
        g = tl.load(pg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(gu_ptr + offs, round_to(gh * _act(g, ACT), gu_ptr.dtype.element_ty, INTERPRETED), mask=mask)
        gg = round_to(gh * u * _act_grad(g, ACT), gg_ptr.dtype.element_ty, INTERPRETED)
        tl.store(gg_ptr + offs, gg, mask=mask)
    else:
        tl.store(gu_ptr + offs, round_to(gh * _act_grad(u, ACT), gu_ptr.dtype.element_ty, INTERPRETED), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers


def _row_grid(n_rows: int, num_experts: int, n_cols: int, blocks: GemmBlocks) -> tuple[int, int]:
    # sum_e cdiv(n_e, BLOCK_M) <= cdiv(N, BLOCK_M) + E - 1: a bound from shapes alone (no host sync).
    return triton.cdiv(n_rows, blocks.block_m) + num_experts - 1, triton.cdiv(n_cols, blocks.block_n)


def _launch_opts(x: Tensor, blocks: GemmBlocks) -> dict:
    return dict(PRECISION=_precision(x.dtype), INTERPRETED=INTERPRETED,
                num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _wgrad(a: Tensor, a_index: Optional[Tensor], b1: Tensor, b2: Optional[Tensor], b_index: Optional[Tensor],
           scale: Optional[Tensor], offsets: Tensor, num_experts: int, with_bias: bool,
           blocks: GemmBlocks) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """dw1[e] = a[rows of e]^T @ (s b1)[rows of e] (and dw2 from b2), db = column sums: [E, P, Q], [E, Q]."""
    P, Q, E = a.shape[1], b1.shape[1], num_experts
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
        BLOCK_P=blocks.block_m, BLOCK_Q=blocks.block_n, BLOCK_R=blocks.block_k, **_launch_opts(a, blocks))
    return dw1, dw2, db1, db2


# ------------------------------------------------------------------------------------ autograd functions


class _GatherGroupedUp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, row_token: Tensor, offsets: Tensor, w_up: Tensor, w_gate: Optional[Tensor],
                b_up: Optional[Tensor], b_gate: Optional[Tensor], activation: str, blocks: GemmBlocks) -> Tensor:
        (_, d), (E, _, f), N = x.shape, w_up.shape, row_token.numel()
        glu = w_gate is not None
        save_pre = any(ctx.needs_input_grad)
        h = x.new_empty(N, f)
        pre_u = x.new_empty(N, f) if save_pre else None  # pre-activations kept for backward
        pre_g = x.new_empty(N, f) if save_pre and glu else None
        if N > 0:
            _gather_up_kernel[_row_grid(N, E, f, blocks)](
                x, row_token, offsets, w_up, w_up if w_gate is None else w_gate,
                h if b_up is None else b_up, h if b_gate is None else b_gate,
                h, h if pre_u is None else pre_u, h if pre_g is None else pre_g,
                E, d, f, x.stride(0), x.stride(1), w_up.stride(0), w_up.stride(1), w_up.stride(2), f, h.stride(0),
                GLU=glu, HAS_BU=b_up is not None, HAS_BG=b_gate is not None, ACT=activation, SAVE_PRE=save_pre,
                BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k, E_POW2=_pow2(E),
                **_launch_opts(x, blocks))
        ctx.save_for_backward(x, row_token, offsets, w_up, w_gate, pre_u, pre_g)
        ctx.activation, ctx.blocks = activation, blocks
        ctx.has_bias = (b_up is not None, b_gate is not None)
        return h

    @staticmethod
    @once_differentiable  # the backward kernels are not themselves differentiated
    def backward(ctx, grad_h: Tensor):
        x, row_token, offsets, w_up, w_gate, pre_u, pre_g = ctx.saved_tensors
        blocks, glu = ctx.blocks, w_gate is not None
        (T, d), (E, _, f), N = x.shape, w_up.shape, row_token.numel()
        grad_h = grad_h.contiguous()  # a reduction's gradient arrives expanded (stride 0)
        # Gradients of the pre-activations, elementwise: [N, f] each, in the activation dtype.
        grad_u = torch.empty_like(pre_u)
        grad_g = torch.empty_like(pre_g) if glu else None
        if N > 0:
            block = min(blocks.block_elementwise, triton.next_power_of_2(N * f))
            _act_backward_kernel[(triton.cdiv(N * f, block),)](
                grad_h, pre_u, pre_u if pre_g is None else pre_g, grad_u, grad_u if grad_g is None else grad_g,
                N * f, GLU=glu, ACT=ctx.activation, INTERPRETED=INTERPRETED, BLOCK=block,
                num_warps=blocks.num_warps)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # grad rows [N, d] = gu @ w_up[e]^T (+ gg @ w_gate[e]^T), written token-major in fp32 and summed per
            # token in a fixed order: deterministic, no atomics.
            order = TokenOrder.build(row_token, T)
            rows = torch.empty(N, d, device=x.device, dtype=torch.float32)
            if N > 0:
                _rows_to_slots_kernel[_row_grid(N, E, d, blocks)](
                    grad_u, grad_u if grad_g is None else grad_g, offsets, w_up, w_up if w_gate is None else w_gate,
                    rows, rows, order.slot, rows,
                    E, f, d, grad_u.stride(0), w_up.stride(0), w_up.stride(2), w_up.stride(1), 0, rows.stride(0),
                    TWO=glu, HAS_BIAS=False, HAS_SCALE=False,
                    BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k, E_POW2=_pow2(E),
                    **_launch_opts(x, blocks))
            grad_x = segment_sum(rows, order.token_offsets, x.dtype, blocks.block_elementwise)
        grad_wu = grad_wg = grad_bu = grad_bg = None
        if any(ctx.needs_input_grad[3:7]):
            with_bias = any(ctx.has_bias)
            grad_wu, grad_wg, grad_bu, grad_bg = _wgrad(x, row_token, grad_u, grad_g, None, None, offsets, E,
                                                        with_bias, blocks)
            grad_bu = grad_bu if ctx.has_bias[0] else None
            grad_bg = grad_bg if ctx.has_bias[1] else None
        return grad_x, None, None, grad_wu, grad_wg, grad_bu, grad_bg, None, None


class _GroupedDownCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, w_down: Tensor, b_down: Optional[Tensor], offsets: Tensor, row_weight: Tensor,
                row_token: Tensor, num_tokens: int, blocks: GemmBlocks) -> Tensor:
        (N, f), (E, _, d) = h.shape, w_down.shape
        order = TokenOrder.build(row_token, num_tokens)
        # Token-major rows in fp32: a token's k contributions are added before the one rounding to h's dtype.
        rows = torch.empty(N, d, device=h.device, dtype=torch.float32)
        if N > 0:
            _rows_to_slots_kernel[_row_grid(N, E, d, blocks)](
                h, h, offsets, w_down, w_down, rows if b_down is None else b_down, row_weight, order.slot, rows,
                E, f, d, h.stride(0), w_down.stride(0), w_down.stride(1), w_down.stride(2), d, rows.stride(0),
                TWO=False, HAS_BIAS=b_down is not None, HAS_SCALE=True,
                BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k, E_POW2=_pow2(E),
                **_launch_opts(h, blocks))
        y = segment_sum(rows, order.token_offsets, h.dtype, blocks.block_elementwise)
        ctx.save_for_backward(h, w_down, b_down, offsets, row_weight, row_token)
        ctx.blocks = blocks
        return y

    @staticmethod
    @once_differentiable  # the backward kernels are not themselves differentiated
    def backward(ctx, grad_y: Tensor):
        h, w_down, b_down, offsets, row_weight, row_token = ctx.saved_tensors
        blocks = ctx.blocks
        (N, f), (E, _, d) = h.shape, w_down.shape
        grad_y = grad_y.contiguous()
        grad_h = torch.empty_like(h)
        n_ftiles = triton.cdiv(f, blocks.block_n)
        partial = torch.zeros(N, n_ftiles, device=h.device, dtype=torch.float32)  # per f tile grad row_weight
        if N > 0:
            _down_grad_h_kernel[_row_grid(N, E, f, blocks)](
                grad_y, row_token, offsets, w_down, h if b_down is None else b_down, h, row_weight, grad_h, partial,
                E, d, f, grad_y.stride(0), w_down.stride(0), w_down.stride(1), w_down.stride(2), d, h.stride(0),
                partial.stride(0), HAS_BIAS=b_down is not None,
                BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k, E_POW2=_pow2(E),
                **_launch_opts(h, blocks))
        grad_weight = partial.sum(1).to(row_weight.dtype)  # fixed-order reduction over f tiles
        grad_w = grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_w, _, grad_b, _ = _wgrad(h, None, grad_y, None, row_token, row_weight, offsets, E,
                                          b_down is not None, blocks)
        return grad_h, grad_w, grad_b, None, grad_weight, None, None, None


# ------------------------------------------------------------------------------------------------ public API


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    # Under autocast the master weights stay fp32 while activations are bf16: cast outside the kernel (a
    # differentiable .to, so the weight gradient comes back in the master dtype), as Experts._weights does.
    return None if t is None else t.to(dtype).contiguous()


def gather_grouped_up(x: Tensor, row_token: Tensor, offsets: Tensor, w_up: Tensor, w_gate: Optional[Tensor],
                      b_up: Optional[Tensor], b_gate: Optional[Tensor], activation: str, *,
                      blocks: Optional[GemmBlocks] = None) -> Tensor:
    """x [T, d], row_token [N], offsets [E+1], w_up/w_gate [E, d, f], b_up/b_gate [E, f] -> h [N, f] in x's
    dtype (w_gate None: no GLU). Differentiable in x, the weights and the biases."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: the Triton kernels support {ACTIVATIONS}")
    _check_device(x)
    dt = x.dtype
    return _GatherGroupedUp.apply(x.contiguous(), row_token.contiguous(), offsets.contiguous(), _cast(w_up, dt),
                                  _cast(w_gate, dt), _cast(b_up, dt), _cast(b_gate, dt), activation,
                                  _blocks_for(blocks, dt))


def grouped_down_combine(h: Tensor, w_down: Tensor, b_down: Optional[Tensor], offsets: Tensor, row_weight: Tensor,
                         row_token: Tensor, num_tokens: int, *, blocks: Optional[GemmBlocks] = None) -> Tensor:
    """h [N, f], w_down [E, f, d], b_down [E, d], offsets [E+1], row_weight [N] fp32, row_token [N] -> y [T, d]
    in h's dtype. Differentiable in h, w_down, b_down and row_weight."""
    _check_device(h)
    dt = h.dtype
    return _GroupedDownCombine.apply(h.contiguous(), _cast(w_down, dt), _cast(b_down, dt), offsets.contiguous(),
                                     row_weight.contiguous(), row_token.contiguous(), num_tokens,
                                     _blocks_for(blocks, dt))
