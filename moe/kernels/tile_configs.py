"""Which tile sizes each Triton GEMM runs with: the fixed defaults, a small candidate list, and a tuned table.

Shape legend: rows the plan rows a kernel walks (the reduction of a weight gradient), k its reduction width
(for a weight gradient: P, the weight's rows), n its output width (Q, the weight's columns).

A kernel call resolves its tiles with `tiles_for(kernel, blocks, like, rows, k, n)`:
  1. the caller's `GemmBlocks` (every public function takes `blocks=`; the tests pass small ones), else
  2. the entry of the tuned table for (device name, kernel, dtype, shape bucket), else
  3. the fixed defaults (gemm_tiles.GPU_BLOCKS / GPU_BLOCKS_FP32, INTERPRETER_BLOCKS under the interpreter).
Nothing is benchmarked at call time (triton.autotune would time every candidate on the first call of each shape,
inside a training step): tuning is a separate command (moe.kernels.autotune) whose result is a JSON file kept in
the repository, moe/kernels/tuned_configs.json, or the file named by $SWITCHYARD_TUNED_CONFIGS.

The shape bucket is (rows rounded up to a power of two, k, n): k and n are model widths, fixed for a model, while
rows (T·k minus drops) moves with the batch. A lookup takes the exact bucket, else the entry for the same
(device, kernel, dtype, k, n) whose rows bucket is nearest in log2. Table format (one object per tuned choice):

    {"format": 1, "entries": [{"device": "NVIDIA H200", "kernel": "up_glu", "dtype": "bfloat16",
                               "rows": 32768, "k": 1024, "n": 2048,
                               "blocks": {"block_m": 128, "block_n": 128, "block_k": 64, "num_warps": 8,
                                          "num_stages": 3, "group_m": 8},
                               "ms": 0.41, "default_ms": 0.57}]}     # ms fields are a record, not read back

A weight-gradient entry's "blocks" may also hold "split_rows" (WgradBlocks: split-K, moe.kernels.weight_grad);
another kernel's entry with it is refused.

Candidates (`candidates(kernel, dtype, device)`): the defaults plus 128×128×64 at 3 and 4 stages and 128×256×64
at 3 stages, 8 warps (32-wide K chunks for fp32), pruned where the pipelined operand tiles exceed the device's
shared memory (nominally an H100's 227 KB off the GPU, so the interpreter tests run what sm_90 would) or where
register_estimate passes REGISTER_BUDGET (the tiles that spilled when compiled for sm_90: issue 20's audit);
then the largest survivor again with the persistent grid (row-tiled kernels) and with TMA descriptors (the weights
of up, down, grad x; the operands read in plan order of the weight gradients), both off unless a measurement picks
them. For the weight gradients, given the expert loads (`expert_rows`, which the tuner knows offline), also the
largest survivor with split-K (WgradBlocks.split_rows) at S = the power of two at or above the mean rows per expert
(at least 4 block_k) and 4 S, each kept only where the busiest expert spans at least two chunks: an even load gets
no split candidate, a skewed one (the tail split-K is for) gets up to two.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from moe.kernels import next_pow2
from moe.kernels.combine import INTERPRETED
from moe.kernels.gemm_tiles import GPU_BLOCKS, GPU_BLOCKS_FP32, INTERPRETER_BLOCKS, GemmBlocks

TABLE_PATH = Path(__file__).with_name("tuned_configs.json")
TABLE_ENV = "SWITCHYARD_TUNED_CONFIGS"  # a path that replaces the repository's table (the GPU check sets it)
TABLE_FORMAT = 1
HOPPER_SHARED_BYTES = 232448  # 227 KB per block on sm_90: the budget assumed where no GPU can be asked


@dataclass(frozen=True)
class WgradBlocks(GemmBlocks):
    """GemmBlocks plus the weight gradients' split-K (moe.kernels.weight_grad). Passed as `blocks=` to the whole
    MLP, the row-tiled kernels read only the GemmBlocks fields."""

    # Plan rows per split-K chunk of an expert's reduction (a multiple of block_k): each chunk's partial tile goes
    # to an fp32 workspace, summed per expert in chunk order by a second pass. 0 or None: no split (the default).
    split_rows: Optional[int] = 0

    def __post_init__(self):
        super().__post_init__()
        s = self.split_rows
        if s is not None and (not isinstance(s, int) or s < 0 or s % self.block_k):
            raise ValueError(f"WgradBlocks.split_rows must be 0 or None (no split) or a positive multiple of "
                             f"block_k ({self.block_k}), got {s!r}")


def split_rows(blocks: GemmBlocks) -> int:
    """The split-K chunk of `blocks` (0: none; a plain GemmBlocks never splits)."""
    return (blocks.split_rows or 0) if isinstance(blocks, WgradBlocks) else 0


@dataclass(frozen=True)
class KernelShape:
    """What one K-loop iteration of a kernel keeps in shared memory and registers, per tile."""

    a_tiles: int  # BLOCK_M × BLOCK_K operand tiles loaded per iteration
    b_tiles: int  # BLOCK_K × BLOCK_N operand tiles loaded per iteration
    accumulators: int  # BLOCK_M × BLOCK_N fp32 accumulators
    # BLOCK_M × BLOCK_N fp32 tiles live at once at the peak (accumulators plus what the epilogue loads: bias,
    # saved pre-activations, the activation backward's operands), fitted to the sm_90 compiles (register_estimate)
    live_tiles: float = 1.0
    fragments: bool = True  # one stage's operand fragments count too (row-tiled kernels; not the weight gradients)


# The kernels by name (the table's "kernel" field). Row-tiled: M = plan rows, K = reduction, N = output columns.
# Weight gradients: M = P (weight rows), N = Q (weight columns), K = BLOCK_R plan rows per iteration.
KERNELS = {
    "up": KernelShape(1, 1, 1, 1.5),  # gather + x @ w_up (+ bias, activation)
    "up_glu": KernelShape(1, 2, 2, 2.5),  # the gate shares the x tile: two weight tiles, two accumulators
    "down": KernelShape(1, 1, 1, 1.5),  # h @ w_down, scaled, to token-major slots
    "grad_h": KernelShape(1, 1, 1, 1.5),  # gathered grad_y @ w_down^T
    "grad_h_act": KernelShape(1, 1, 1, 3.0),  # ... with the activation backward in the epilogue (expert_mlp)
    "grad_x": KernelShape(1, 1, 1, 1.5),  # grad_u @ w_up^T
    "grad_x_glu": KernelShape(2, 2, 1, 1.5),  # grad_u @ w_up^T + grad_g @ w_gate^T into one accumulator
    "wgrad_up": KernelShape(1, 1, 1, 1.0, False),  # x^T @ grad_u per expert
    "wgrad_up_glu": KernelShape(1, 2, 2, 2.0, False),  # ... and x^T @ grad_g, sharing the x tile
    "wgrad_down": KernelShape(1, 1, 1, 1.0, False),  # h^T @ (s grad_y) per expert
}
# What register_estimate may reach: above it the sm_90 compiles of issue 20's audit spilled (or sat at 255).
REGISTER_BUDGET = 128

ROW_TILED = ("up", "up_glu", "down", "grad_h", "grad_h_act", "grad_x", "grad_x_glu")  # GemmBlocks.persistent
WGRAD = ("wgrad_up", "wgrad_up_glu", "wgrad_down")  # WgradBlocks.split_rows; TMA for their plan-order operands
# GemmBlocks.tma: operands through descriptors (weights, and rows read in plan order)
TMA_KERNELS = ("up", "up_glu", "down", "grad_h", "grad_h_act", "grad_x", "grad_x_glu") + WGRAD
_BIG = dict(num_warps=8, group_m=8)
_CANDIDATES_16 = (GPU_BLOCKS, GemmBlocks(128, 128, 64, num_stages=3, **_BIG),
                  GemmBlocks(128, 128, 64, num_stages=4, **_BIG), GemmBlocks(128, 256, 64, num_stages=3, **_BIG))
_CANDIDATES_32 = (GPU_BLOCKS_FP32, GemmBlocks(128, 128, 32, num_stages=3, **_BIG),
                  GemmBlocks(128, 128, 32, num_stages=4, **_BIG), GemmBlocks(128, 256, 32, num_stages=3, **_BIG))


def check_kernel(kernel: str) -> KernelShape:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}: the tiled kernels are {sorted(KERNELS)}")
    return KERNELS[kernel]


def default_blocks(dtype: torch.dtype) -> GemmBlocks:
    """The fixed tiles used where the table has no entry (interpreter, GPU fp32, GPU 16-bit)."""
    if INTERPRETED:
        return INTERPRETER_BLOCKS
    return GPU_BLOCKS_FP32 if dtype == torch.float32 else GPU_BLOCKS


def elementwise_block(blocks: Optional[GemmBlocks], dtype: torch.dtype) -> int:
    """Elements per program of the elementwise kernels (activation backward, token sum): not tuned."""
    return (blocks or default_blocks(dtype)).block_elementwise


def shared_bytes(kernel: str, blocks: GemmBlocks, dtype: torch.dtype) -> int:
    """Shared memory of the pipelined operand tiles: num_stages copies of one iteration's A and B tiles."""
    shape, b = check_kernel(kernel), blocks
    per_stage = shape.a_tiles * b.block_m * b.block_k + shape.b_tiles * b.block_k * b.block_n
    return b.num_stages * per_stage * torch.empty((), dtype=dtype).element_size()


def accumulator_registers(kernel: str, blocks: GemmBlocks) -> int:
    """fp32 accumulator values per thread (the rest of the 255 registers hold addresses, operands, masks)."""
    return check_kernel(kernel).accumulators * blocks.block_m * blocks.block_n // (32 * blocks.num_warps)


def register_estimate(kernel: str, blocks: GemmBlocks, dtype: torch.dtype) -> int:
    """32-bit registers per thread for values that scale with the tiles: live_tiles fp32 [BM, BN] tiles and (row-
    tiled kernels) one stage's operand fragments. An empirical fit, not a model of the compiler: over the 2 x 10
    kernels at the defaults and candidates compiled for sm_90 (experiments/spill_audit.py, docs/benchmarks.md),
    every build above REGISTER_BUDGET spilled or sat at 255 registers, and those at or below it did not spill but
    for one (grad_x fp32 128x128x32 at 4 stages, 8 bytes). The rest of the 255 hold addresses, masks, indices."""
    shape, b = check_kernel(kernel), blocks
    threads = 32 * b.num_warps
    values = shape.live_tiles * b.block_m * b.block_n / threads
    if shape.fragments:
        operand = shape.a_tiles * b.block_m * b.block_k + shape.b_tiles * b.block_k * b.block_n
        values += operand * torch.empty((), dtype=dtype).element_size() / 4 / threads
    return math.ceil(values)


def device_shared_bytes(device: Optional[torch.device] = None) -> int:
    """The most shared memory one program may use on `device`; the sm_90 budget off the GPU."""
    if device is None or torch.device(device).type != "cuda":
        return HOPPER_SHARED_BYTES
    import triton

    index = torch.device(device).index
    props = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device() if index is None
                                                                       else index)
    return int(props["max_shared_mem"])


def candidates(kernel: str, dtype: torch.dtype, device: Optional[torch.device] = None,
               expert_rows: Optional[Sequence[int]] = None) -> list[GemmBlocks]:
    """The tiles autotuning tries for `kernel`, pruned by shared memory and accumulator registers (defaults first;
    the default always stays, so a list is never empty). expert_rows: the plan rows of each expert, for the
    weight gradients' split-K candidates (none without it)."""
    default = GPU_BLOCKS_FP32 if dtype == torch.float32 else GPU_BLOCKS
    budget = device_shared_bytes(device)
    keep = [default]
    for b in _CANDIDATES_32 if dtype == torch.float32 else _CANDIDATES_16:
        if (b != default and shared_bytes(kernel, b, dtype) <= budget
                and register_estimate(kernel, b, dtype) <= REGISTER_BUDGET):
            keep.append(b)
    # The largest tiles once more with the persistent grid and (where the kernel reads weights through them) TMA
    # descriptors: unmeasured options, so the tuner measures them instead of anyone guessing.
    if kernel in ROW_TILED:
        keep.append(replace(keep[-1], persistent=True))
    largest = keep[-2] if kernel in ROW_TILED else keep[-1]
    if kernel in TMA_KERNELS:
        keep.append(replace(largest, tma=True))
    if kernel in WGRAD and expert_rows:
        keep += [WgradBlocks(**asdict(largest), split_rows=s) for s in split_candidates(expert_rows, largest.block_k)]
    return keep


def split_candidates(expert_rows: Sequence[int], block_k: int) -> list[int]:
    """Split-K chunk sizes worth timing for these expert loads (module docstring): S and 4 S, S the power of two at
    or above the mean rows per expert (>= 4 block_k), where the busiest expert spans at least two chunks."""
    rows = [int(n) for n in expert_rows]
    base = max(4 * block_k, next_pow2(max(1, math.ceil(sum(rows) / len(rows)))))
    return [s for s in (base, 4 * base) if max(rows) >= 2 * s]


def device_name(t: Tensor) -> str:
    """The table's "device" field: torch's name of the GPU, "interpreter" for CPU tensors under TRITON_INTERPRET."""
    return torch.cuda.get_device_name(t.device) if t.device.type == "cuda" else "interpreter"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def rows_bucket(rows: int) -> int:
    return max(16, next_pow2(rows))


def table_path() -> Path:
    return Path(os.environ.get(TABLE_ENV) or TABLE_PATH)


def _blocks_from(entry: dict, where: str) -> GemmBlocks:
    names = {f.name for f in fields(WgradBlocks if entry["kernel"] in WGRAD else GemmBlocks)}
    given = entry["blocks"]
    if not isinstance(given, dict) or not set(given) <= names:
        raise ValueError(f"{where}: 'blocks' must be an object with fields among {sorted(names)}, got {given!r}")
    dtype = getattr(torch, str(entry["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{where}: 'dtype' must name a torch dtype (bfloat16, float16, float32), got "
                         f"{entry['dtype']!r}")
    try:  # fields not given (block_elementwise: not a GEMM tile) keep the defaults
        if "split_rows" in given:
            return WgradBlocks(**{**asdict(default_blocks(dtype)), **given})
        return replace(default_blocks(dtype), **given)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: bad 'blocks': {e}") from e


@lru_cache(maxsize=8)
def load_table(path: Path) -> dict[tuple, GemmBlocks]:
    """(device, kernel, dtype, rows bucket, k, n) -> GemmBlocks from a table file; {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); fix it or delete it to use the default tiles") from e
    if not isinstance(doc, dict) or doc.get("format") != TABLE_FORMAT or not isinstance(doc.get("entries"), list):
        raise ValueError(f"{path}: expected {{\"format\": {TABLE_FORMAT}, \"entries\": [...]}}; rewrite it with "
                         "python -m moe.kernels.autotune --out FILE")
    table = {}
    for i, entry in enumerate(doc["entries"]):
        where = f"{path} entry {i}"
        missing = [k for k in ("device", "kernel", "dtype", "rows", "k", "n", "blocks") if k not in entry]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        if entry["kernel"] not in KERNELS:
            raise ValueError(f"{where}: unknown kernel {entry['kernel']!r}; the tiled kernels are {sorted(KERNELS)}")
        key = (entry["device"], entry["kernel"], entry["dtype"], rows_bucket(int(entry["rows"])), int(entry["k"]),
               int(entry["n"]))
        table[key] = _blocks_from(entry, where)
    return table


def tuned(kernel: str, like: Tensor, rows: int, k: int, n: int, path: Optional[Path] = None) -> Optional[GemmBlocks]:
    """The table's tiles for this call, or None: the exact bucket, else the same (k, n) at the nearest rows."""
    table = load_table(path or table_path())
    if not table:
        return None
    head = (device_name(like), kernel, dtype_name(like.dtype))
    bucket = rows_bucket(rows)
    exact = table.get((*head, bucket, k, n))
    if exact is not None:
        return exact
    near = [(abs(math.log2(key[3] / bucket)), key[3], b) for key, b in table.items()
            if key[:3] == head and key[4:] == (k, n)]
    return min(near, key=lambda c: c[:2])[2] if near else None


def tiles_for(kernel: str, blocks: Optional[GemmBlocks], like: Tensor, rows: int, k: int, n: int) -> GemmBlocks:
    """The tiles of one kernel call: the caller's, else the tuned table's, else the defaults (module docstring)."""
    if blocks is not None:
        return blocks
    return tuned(kernel, like, rows, k, n) or default_blocks(like.dtype)


def table_entry(kernel: str, like: Tensor, rows: int, k: int, n: int, blocks: GemmBlocks, **record) -> dict:
    """One entry of the table file (`record`: timings kept for the reader, never read back)."""
    check_kernel(kernel)
    return dict(device=device_name(like), kernel=kernel, dtype=dtype_name(like.dtype),
                rows=rows_bucket(rows), k=k, n=n, blocks=tuned_fields(blocks), **record)


def tuned_fields(blocks: GemmBlocks) -> dict:
    """The fields a table records (block_elementwise sizes the elementwise kernels, which are not tuned)."""
    return {k: v for k, v in asdict(blocks).items() if k != "block_elementwise"}


__all__ = ["KERNELS", "TABLE_ENV", "TABLE_PATH", "WgradBlocks", "candidates", "default_blocks", "load_table",
           "shared_bytes", "split_rows", "table_entry", "tiles_for", "tuned"]
