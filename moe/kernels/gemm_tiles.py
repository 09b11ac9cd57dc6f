"""What the Triton grouped GEMMs share: tile sizes, the row tile -> expert map, the product, launch options.

Shape legend: N plan rows sorted by expert (the segment of expert e is rows offsets[e]:offsets[e+1]), E experts.
The GEMMs themselves: moe.kernels.up_projection (gather + up projection + activation), moe.kernels.down_combine
(down projection + weighted combine), moe.kernels.weight_grad (the weight gradients of both).

How the kernels are laid out, and why:
- Row-tiled kernels (the up GEMM, the down GEMM, their input-gradient GEMMs) launch one program per (row tile,
  column tile). Each expert's segment is cut into cdiv(n_e, BLOCK_M) tiles numbered expert after expert, and a
  program finds its expert by a prefix sum over `offsets` inside the kernel (`expert_tile`). A tile therefore
  never straddles two experts, and the grid is the fixed upper bound cdiv(N, BLOCK_M) + E - 1 programs, known
  from shapes alone (`row_grid`): nothing waits for per-expert counts to reach the host. Spare programs find an
  empty row range and do nothing.
- No atomics anywhere: rows reach their tokens through a token-major slot and a fixed-order segmented sum
  (moe.kernels.combine), so forward and backward are bitwise reproducible on CUDA.
- Products accumulate in fp32; outputs come back in the activation dtype. fp32 inputs use IEEE fp32 dot
  products unless torch allows TF32 for its own matmuls (`tf32_allowed`: torch.backends.cuda.matmul.fp32_precision,
  or allow_tf32 on torch < 2.9).
  Weights in another dtype (fp32 masters under autocast) are cast to the activation dtype before the call
  (`cast_weight`).

Block sizes are a `GemmBlocks` argument: GPU defaults are fixed (not autotuned: autotuning benchmarks every
config on the first call of each shape, and with no GPU in CI its configs could not be tested here); the
Triton interpreter (TRITON_INTERPRET=1, CPU tensors, used by the tests) gets large blocks because its cost
grows with the number of program instances, not with their size. The interpreter also needs two workarounds
(see `mma` and moe.kernels.combine.round_to): its bf16 dot multiplies the raw bits, and its fp32 -> bf16
cast truncates instead of rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from moe.kernels import next_pow2
from moe.kernels.combine import INTERPRETED


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


def blocks_for(blocks: Optional[GemmBlocks], dtype: torch.dtype) -> GemmBlocks:
    """The caller's blocks, else the defaults of where the kernels run (interpreter, GPU fp32, GPU 16-bit)."""
    if blocks is not None:
        return blocks
    if INTERPRETED:
        return INTERPRETER_BLOCKS
    return GPU_BLOCKS_FP32 if dtype == torch.float32 else GPU_BLOCKS


def check_device(t: Tensor) -> None:
    """Refuses tensors the kernels cannot run on, saying what to set."""
    if t.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the Triton grouped GEMM runs on CUDA tensors, or on {t.device.type} tensors under "
                         "the Triton interpreter: set TRITON_INTERPRET=1 before triton is first imported")


def tf32_allowed() -> bool:
    """Whether torch lets its own fp32 CUDA matmuls use TF32.

    torch >= 2.9 has `torch.backends.cuda.matmul.fp32_precision` ("tf32" / "ieee"; "none" inherits from
    torch.backends.fp32_precision and reads back resolved), and reading the legacy `allow_tf32` raises once anything
    has set the new API; older torch has only `allow_tf32`. The new attribute is read wherever it exists (the legacy
    setter and torch.set_float32_matmul_precision update it too), the old one only where it is the only one."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 operands get TF32 only where torch allows it for its own matmuls; for bf16 /
    fp16 operands Triton ignores the setting, and "tf32" is its default, so they keep the default."""
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


def pow2(n: int) -> int:
    return max(2, next_pow2(n))  # tl.arange needs a power of two, and at least 2 here


# ---------------------------------------------------------------------------------------------- device helpers


@triton.jit
def expert_tile(pid, offsets_ptr, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
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
def mma(a, b, acc, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc += a @ b. Under the interpreter (INTERPRETED) a bf16 dot multiplies the raw uint16 storage, so the
    operands go to fp32 first, which gives the GPU's result (products of bf16 values are exact in fp32)."""
    if INTERPRETED:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


# ---------------------------------------------------------------------------------------------- launchers


def row_grid(n_rows: int, num_experts: int, n_cols: int, blocks: GemmBlocks) -> tuple[int, int]:
    # sum_e cdiv(n_e, BLOCK_M) <= cdiv(N, BLOCK_M) + E - 1: a bound from shapes alone (no host sync).
    return triton.cdiv(n_rows, blocks.block_m) + num_experts - 1, triton.cdiv(n_cols, blocks.block_n)


def launch_opts(x: Tensor, blocks: GemmBlocks) -> dict:
    return dict(PRECISION=_precision(x.dtype), INTERPRETED=INTERPRETED,
                num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def cast_weight(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    # Under autocast the master weights stay fp32 while activations are bf16: cast outside the kernel (a
    # differentiable .to, so the weight gradient comes back in the master dtype), as Experts._weights does.
    return None if t is None else t.to(dtype).contiguous()
