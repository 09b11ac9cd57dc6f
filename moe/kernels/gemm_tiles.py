"""What the Triton grouped GEMMs share: tile sizes, the launch order, the row tile -> expert map, masked loads.

Shape legend: N plan rows sorted by expert (the segment of expert e is rows offsets[e]:offsets[e+1]), E experts,
K the reduction width, NOUT the output width of a row-tiled GEMM.
The GEMMs themselves: moe.kernels.up_projection (gather + up projection + activation), moe.kernels.down_combine
(down projection + weighted combine), moe.kernels.weight_grad (the weight gradients of both), and the two as one
autograd function, moe.kernels.expert_mlp (what the triton dispatcher runs). Which tile sizes a
kernel runs with: moe.kernels.tile_configs (defaults, the candidate list, the tuned table); how they are tuned:
moe.kernels.autotune.

How the kernels are laid out, and why:
- Row-tiled kernels (the up GEMM, the down GEMM, their input-gradient GEMMs) cut each expert's segment into
  cdiv(n_e, BLOCK_M) row tiles numbered expert after expert; a program finds its expert by a prefix sum over
  `offsets` inside the kernel (`expert_tile`). A row tile therefore never straddles two experts: its tl.dot uses
  one expert's weights, where a straddling tile would run the K loop once per expert it touches, masked (more
  MMA work for the same rows, and a loop whose trip count depends on data). The row tile count has the fixed upper
  bound M_TILES = cdiv(N, BLOCK_M) + E - 1, known from shapes alone: nothing waits for per-expert counts to reach
  the host. Spare row tiles find an empty row range and skip their K loop.
- The grid is 1D over (row tile, column tile) in GROUP_M-swizzled order (`swizzle`, as in Triton's matmul
  tutorial): consecutive programs walk the column tiles of GROUP_M row tiles before moving on, so a group's
  gathered input rows and its experts' weight columns are re-read from L2 instead of HBM. (Row tiles varying
  fastest over the whole grid re-read every input row once per column tile.) Row tiles are numbered expert after
  expert, so a group's tiles mostly share one expert's weights.
- GemmBlocks.persistent (off by default, unmeasured) launches about one program per SM instead, each looping
  over tiles pid, pid + programs, ...: no tail of short-lived programs, at the price of no reordering by the
  hardware scheduler. Each row-tiled kernel loops `for pid in range(program_id, tiles, programs)` either way:
  with one program per tile (the default) that loop makes one trip. A persistent launch reads each tile's expert
  and rows from a tile table written on the device (moe.kernels.tile_table; `tile_counts`, `row_tile`) and
  loops to the table's tile count, instead of searching the offsets per tile up to the shape bound.
- GemmBlocks.tma (off by default, unmeasured) reads the weights (up, down, grad h, grad x) through TMA tensor
  descriptors (`weight_operand`, `load_weight_desc`; their out-of-bounds reads are zero, so tails need no
  mask), and the A operands whose rows are contiguous in expert order (the down GEMM's h, grad x's grad u and
  grad g: `row_operand`, `load_row_block`), falling back to pointer loads where the installed Triton, the device
  or the strides do not allow them. Gathered rows (the up GEMM's x[row_token], grad h's grad_y[row_token]) keep
  pointer loads: Hopper's TMA copies rectangular boxes and has no row gather.
- Variants are told apart at compile time by the arguments' types where a flag would change the kernels'
  signatures: a tile table is a pointer (None: no table), a TMA operand a tensor descriptor (`isinstance`).
- EVEN_K / EVEN_N (K % BLOCK_K == 0, NOUT % BLOCK_N == 0, decided by the launcher) drop the masks along the
  reduction and output columns (`load_rows`, `load_weight`), so the contiguous dimension loads without
  predicates; rows keep their mask (segments end anywhere). Column offsets carry `tl.multiple_of` /
  `tl.max_contiguous` hints (they start at a multiple of the block and run contiguously); integer arguments
  divisible by 16 (strides, widths) are specialised by Triton itself.
- No atomics anywhere: rows reach their tokens through a token-major slot and a fixed-order segmented sum
  (moe.kernels.combine), so forward and backward are bitwise reproducible on CUDA.
- Products accumulate in fp32; outputs come back in the activation dtype. fp32 inputs use IEEE fp32 dot
  products unless torch allows TF32 for its own matmuls (`tf32_allowed`: torch.backends.cuda.matmul.fp32_precision,
  or allow_tf32 on torch < 2.9). Weights in another dtype (fp32 masters under autocast) are cast to the activation
  dtype before the call (`cast_weight`).

Block sizes are a `GemmBlocks` argument. The Triton interpreter (TRITON_INTERPRET=1, CPU tensors, used by the
tests) gets large blocks because its cost grows with the number of program instances, not with their size. The
interpreter also needs two workarounds (see `mma` and moe.kernels.combine.round_to): its bf16 dot multiplies the
raw bits, and its fp32 -> bf16 cast truncates instead of rounding.
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
from moe.kernels.tile_table import TileTables, tile_bound


@dataclass(frozen=True)
class GemmBlocks:
    """Tile sizes. Row-tiled kernels use (block_m rows, block_n output columns, block_k reduction chunk);
    the weight-gradient kernel uses a block_m × block_n weight tile and reduces over block_k plan rows."""

    block_m: int = 64  # plan rows per tile (GPU: 64 keeps two fp32 GLU accumulators in registers)
    block_n: int = 128  # output columns per tile
    block_k: int = 64  # reduction chunk per loop iteration (>= 16: tl.dot's minimum on GPU)
    block_elementwise: int = 1024  # elements per program of the activation-gradient kernel and the token sum
    # 8 warps: 32 fp32 values per thread per 64x128 accumulator. At 4 warps (64) the GLU up projection, the fused
    # grad-h epilogue and most fp32 kernels spill on sm_90 (issue 20's audit, docs/benchmarks.md); at 8 none does.
    num_warps: int = 8
    num_stages: int = 3  # software pipelining depth of the K loop (GPU only)
    group_m: int = 8  # row tiles per swizzle group of the 1D launch order (row-tiled kernels)
    persistent: bool = False  # row-tiled kernels: ~one program per SM looping over a tile table (unmeasured: off)
    tma: bool = False  # weights and contiguous row blocks through TMA tensor descriptors where possible (unmeasured)

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "block_elementwise", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"GemmBlocks.{name} must be a power of two >= 1, got {value!r}")
        for name in ("num_stages", "group_m"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"GemmBlocks.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("persistent", "tma"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GemmBlocks.{name} must be true or false, got {getattr(self, name)!r}")


GPU_BLOCKS = GemmBlocks()
# fp32 operands take twice the shared memory per stage: a 32-wide K chunk keeps the GLU kernels (two weight
# tiles per stage) near 100 KB, under the A100's 164 KB as well as the H100's 227 KB.
GPU_BLOCKS_FP32 = GemmBlocks(block_k=32)
# The interpreter runs program instances one after another in numpy: few large tiles are fastest.
INTERPRETER_BLOCKS = GemmBlocks(block_m=64, block_n=64, block_k=64, block_elementwise=1 << 16,
                                num_warps=1, num_stages=1)


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
def swizzle(pid, M_TILES, N_TILES, GROUP_M: tl.constexpr):
    """Program `pid` of the 1D grid -> (row tile, column tile): GROUP_M row tiles share a group, and the group's
    programs take its column tiles one after another, cycling through the group's row tiles fastest."""
    per_group = GROUP_M * N_TILES
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(M_TILES - first_m, GROUP_M)  # the last group may be short
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def col_offsets(pid_n, BLOCK_N: tl.constexpr):
    """The BLOCK_N output columns of column tile pid_n: contiguous, starting at a multiple of BLOCK_N."""
    return tl.max_contiguous(tl.multiple_of(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), BLOCK_N), BLOCK_N)


@triton.jit
def load_rows(ptrs, row_mask, ks, K, EVEN_K: tl.constexpr):
    """An A tile [rows, K chunk]: masked rows (and, unless EVEN_K, columns past K) read 0."""
    if EVEN_K:
        tile = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    else:
        tile = tl.load(ptrs, mask=row_mask[:, None] & (ks < K)[None, :], other=0.0)
    return tile


@triton.jit
def load_weight(ptrs, ks, K, cols, NOUT, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    """A weight tile [K chunk, columns]; what lies past K or NOUT reads 0, with no mask where the sizes divide."""
    if EVEN_K and EVEN_N:
        tile = tl.load(ptrs)
    elif EVEN_K:
        tile = tl.load(ptrs, mask=(cols < NOUT)[None, :], other=0.0)
    elif EVEN_N:
        tile = tl.load(ptrs, mask=(ks < K)[:, None], other=0.0)
    else:
        tile = tl.load(ptrs, mask=(ks < K)[:, None] & (cols < NOUT)[None, :], other=0.0)
    return tile


@triton.jit
def load_weight_desc(desc, e, k0, n0, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, TRANS: tl.constexpr):
    """A weight tile [K chunk, columns] of expert e through a TMA descriptor (block [1, BLOCK_K, BLOCK_N], or
    [1, BLOCK_N, BLOCK_K] read as its transpose when TRANS); the descriptor zero-fills what lies past K or NOUT."""
    if TRANS:
        tile = tl.trans(desc.load([e, n0, k0]).reshape(BLOCK_N, BLOCK_K))
    else:
        tile = desc.load([e, k0, n0]).reshape(BLOCK_K, BLOCK_N)
    return tile


@triton.jit
def expert_weight(w, w_off, stride_wk, e, k0, pid_n, ks, K, cols, NOUT, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                  W_DESC: tl.constexpr, W_TRANS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Expert e's weight tile [K chunk k0.., columns of tile pid_n]: through the TMA descriptor w (W_DESC), else by
    pointer loads from w + w_off (expert and column offsets) + ks * stride_wk."""
    if W_DESC:
        tile = load_weight_desc(w, e, k0, pid_n * BLOCK_N, BLOCK_K, BLOCK_N, W_TRANS)
    else:
        tile = load_weight(w + w_off + ks[:, None] * stride_wk, ks, K, cols, NOUT, EVEN_K, EVEN_N)
    return tile


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
def tile_counts(tiles_ptr, M_TILES, TILES, N_TILES):
    """(row tiles, tiles) a row-tiled kernel loops over: with a tile table (tiles_ptr a pointer: a persistent
    launch, moe.kernels.tile_table) its device-side count, so the loop stops at the last real tile; else the shape
    bound M_TILES and TILES = M_TILES * N_TILES (spare tiles find an empty row range). tiles_ptr None (or any
    non-pointer) means no table: told apart at compile time."""
    if isinstance(tiles_ptr, tl.tensor) and tiles_ptr.dtype.is_ptr():
        m_tiles = tl.load(tiles_ptr).to(tl.int32)
        return m_tiles, m_tiles * N_TILES
    else:
        return M_TILES, TILES


@triton.jit
def row_tile(pid_m, offsets_ptr, tiles_ptr, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """Row tile pid_m -> (expert, first row, end of its segment): three loads from the tile table where there is
    one (tiles_ptr a pointer), else the prefix sum over the offsets (`expert_tile`)."""
    if isinstance(tiles_ptr, tl.tensor) and tiles_ptr.dtype.is_ptr():
        at = tiles_ptr + 1 + pid_m.to(tl.int64) * 3
        e = tl.load(at).to(tl.int32)
        row_start = tl.load(at + 1)
        row_end = tl.load(at + 2)
    else:
        e, row_start, row_end = expert_tile(pid_m, offsets_ptr, E, BLOCK_M, E_POW2)
    return e, row_start, row_end


@triton.jit
def load_row_block(a, a_off, row_start, k0, ks, row_mask, K, EVEN_K: tl.constexpr):
    """An A tile [BLOCK_M rows from row_start, K chunk from k0] of an operand whose rows are in expert order (h,
    grad u, grad g): through its TMA descriptor when `a` is one (told apart at compile time; the descriptor reads
    0 past N and K, and rows past the expert's segment are read but never stored: the caller masks them at the
    store), else by masked pointer loads from a + a_off + ks. Gathered rows (x[row_token], grad_y[row_token]) keep
    pointer loads: Hopper's TMA copies boxes, it has no row gather."""
    if isinstance(a, tl.tensor_descriptor):
        tile = a.load([row_start.to(tl.int32), k0])
    else:
        tile = load_rows(a + a_off + ks[None, :], row_mask, ks, K, EVEN_K)
    return tile


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc += a @ b. Under the interpreter (INTERPRETED) a bf16 dot multiplies the raw uint16 storage, so the
    operands go to fp32 first, which gives the GPU's result (products of bf16 values are exact in fp32)."""
    if INTERPRETED:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


# ---------------------------------------------------------------------------------------------- launchers


def row_launch(x: Tensor, blocks: GemmBlocks, n_rows: int, num_experts: int, k: int, n_out: int) -> tuple[tuple, dict]:
    """Grid and launch arguments of a row-tiled kernel over n_rows plan rows, reduction width k, n_out columns
    (the tile table of a persistent launch comes from `tile_table_arg`)."""
    # sum_e cdiv(n_e, BLOCK_M) <= cdiv(N, BLOCK_M) + E - 1: a bound from shapes alone (no host sync).
    m_tiles = tile_bound(n_rows, num_experts, blocks.block_m)
    tiles = m_tiles * triton.cdiv(n_out, blocks.block_n)
    grid = (min(tiles, persistent_programs(x.device)) if blocks.persistent else tiles,)
    return grid, dict(M_TILES=m_tiles, TILES=tiles, GROUP_M=blocks.group_m, EVEN_K=k % blocks.block_k == 0,
                      EVEN_N=n_out % blocks.block_n == 0, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
                      BLOCK_K=blocks.block_k, E_POW2=pow2(num_experts), **launch_opts(x, blocks))


def tile_table_arg(blocks: GemmBlocks, offsets: Tensor, n_rows: int,
                   tables: Optional[TileTables]) -> Optional[Tensor]:
    """A row-tiled kernel's tiles_ptr: for a persistent launch the tile table of its BLOCK_M (from `tables`, the
    layer call's cache, else built now from the offsets), else None (the kernel searches the offsets per tile)."""
    if not blocks.persistent:
        return None
    return (tables if tables is not None else TileTables(offsets, n_rows)).get(blocks.block_m)


def persistent_programs(device: torch.device) -> int:
    """Programs of a persistent launch: one per SM on CUDA (the large tiles leave room for one program per SM);
    under the interpreter 3, so that the tests' programs each loop over several tiles."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 3


def weight_operand(w: Tensor, blocks: GemmBlocks, transposed: bool) -> tuple[object, bool]:
    """(what the kernel gets for weight w [E, P, Q], whether it is a TMA descriptor). A descriptor (tiles
    [1, block_k, block_n], or [1, block_n, block_k] when the kernel reads w transposed) where blocks.tma asks for
    one, this Triton has them, the device is Hopper or newer (or the interpreter) and w is contiguous with 16-byte
    aligned rows and base; otherwise w itself, for the pointer loads (the fallback)."""
    if w.dim() != 3:
        return w, False
    shape = [1, blocks.block_n, blocks.block_k] if transposed else [1, blocks.block_k, blocks.block_n]
    return _descriptor(w, blocks, shape)


def row_operand(a: Tensor, blocks: GemmBlocks) -> object:
    """What a row-tiled kernel gets for an A operand a [N, K] whose rows are in expert order (h for the down GEMM,
    grad u / grad g for grad x): a TMA descriptor of [block_m, block_k] boxes under the conditions of
    `weight_operand`, else a itself (the kernel tells them apart: gemm_tiles.load_row_block)."""
    return _descriptor(a, blocks, [blocks.block_m, blocks.block_k])[0] if a.dim() == 2 else a


def _descriptor(t: Tensor, blocks: GemmBlocks, box: list[int]) -> tuple[object, bool]:
    """(a TMA descriptor of t in `box` tiles, True) where blocks.tma asks for one, this Triton has them, the device is
    Hopper or newer (or the interpreter) and t is contiguous with 16-byte aligned rows and base; else (t, False)."""
    if not blocks.tma or not t.is_contiguous():
        return t, False
    if t.device.type == "cuda" and torch.cuda.get_device_capability(t.device)[0] < 9:
        return t, False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return t, False
    esize = t.element_size()
    if any((s * esize) % 16 for s in t.stride()[:-1]) or t.data_ptr() % 16:
        return t, False
    return TensorDescriptor.from_tensor(t, box), True


def launch_opts(x: Tensor, blocks: GemmBlocks) -> dict:
    return dict(PRECISION=_precision(x.dtype), INTERPRETED=INTERPRETED,
                num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def cast_weight(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    # Under autocast the master weights stay fp32 while activations are bf16: cast outside the kernel (a
    # differentiable .to, so the weight gradient comes back in the master dtype), as Experts._weights does.
    return None if t is None else t.to(dtype).contiguous()
