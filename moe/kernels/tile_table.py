"""The row-tile table of the persistent grouped GEMMs: each row tile's expert and rows, written on the device.

Shape legend: E experts, N plan rows sorted by expert (expert e's segment is rows offsets[e]:offsets[e+1]),
BLOCK_M rows per tile, M_BOUND = cdiv(N, BLOCK_M) + E - 1 (the most row tiles N rows over E experts can need,
known from shapes alone), BLOCK_T tiles written per program.

A row-tiled GEMM cuts each expert's segment into cdiv(n_e, BLOCK_M) tiles, numbered expert after expert (a tile
never straddles two experts: moe.kernels.gemm_tiles). A one-tile-per-program launch finds its tile by a prefix
sum over the E offsets (gemm_tiles.expert_tile), once per program. A persistent launch (GemmBlocks.persistent,
~one program per SM looping over many tiles) reads this table instead: one load per tile, and the loop runs to
the table's tile count (read on the device: no host sync) instead of to M_BOUND.

Layout, one int64 tensor [1 + 3 * M_BOUND]:
    table[0]            the number of row tiles, sum_e cdiv(n_e, BLOCK_M)
    table[1 + 3i]       the expert of row tile i
    table[2 + 3i]       its first row
    table[3 + 3i]       the end of its expert's segment (the rows of the tile at or past it are masked)
Entries past the count are empty tiles (expert E-1, first row = end = N).

Which BLOCK_M: the table is only valid for the BLOCK_M it was written with, and BLOCK_M is chosen per kernel at
its launch (moe.kernels.tile_configs.tiles_for: the up, down, grad-h and grad-x GEMMs may take different tuned
tiles), after the router's sort has run (and a RoutingPlan carries the counts, not the sort's buffers). So the
table is built on demand, per BLOCK_M, from the offsets, by one small kernel (M_BOUND entries, ~microseconds), and
kept in a `TileTables` that lives as long as one layer call: moe.kernels.expert_mlp makes one per forward and its
backward reuses it, so a layer whose four GEMMs share a BLOCK_M builds a single table. sort_by_expert
(moe.kernels.sort) writes the same table right after its scan when given the BLOCK_M (`tile_block_m`), for
callers that launch straight after the sort.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moe.kernels import next_pow2

FIELDS = 3  # int64 values per tile: expert, first row, segment end


@triton.jit
def _tile_table_kernel(offsets_ptr, table_ptr, N, E, M_BOUND,
                       BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, BLOCK_T: tl.constexpr):
    """Program p writes tiles p*BLOCK_T .. p*BLOCK_T + BLOCK_T - 1 of the table (and program 0 the count); each
    program redoes the E-wide prefix sum, which is cheaper than a second launch."""
    ex = tl.arange(0, E_POW2)
    lo = tl.load(offsets_ptr + ex, mask=ex < E, other=0).to(tl.int64)  # segment starts (0 past E)
    hi = tl.load(offsets_ptr + ex + 1, mask=ex < E, other=0).to(tl.int64)  # segment ends
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M  # [E_POW2] row tiles per expert; 0 for an empty one
    tile_end = tl.cumsum(tiles, 0)  # one past each expert's last tile
    count = tl.sum(tiles, 0)
    i = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] tile numbers
    # expert of tile i: how many experts end at or before it ([BLOCK_T, E_POW2] compare; E_POW2 past the last tile)
    e = tl.sum((tile_end[None, :] <= i[:, None]).to(tl.int32), 1)
    sel = ex[None, :] == e[:, None]  # [BLOCK_T, E_POW2] one-hot of e (all False past the last tile)
    first_tile = tl.sum(tl.where(sel, (tile_end - tiles)[None, :], 0), 1)
    start = tl.sum(tl.where(sel, lo[None, :], 0), 1) + (i - first_tile) * BLOCK_M
    end = tl.sum(tl.where(sel, hi[None, :], 0), 1)
    used = i < count
    expert = tl.where(used, e, E - 1).to(tl.int64)
    start = tl.where(used, start, N)
    end = tl.where(used, end, N)
    at = table_ptr + 1 + i.to(tl.int64) * 3
    in_table = i < M_BOUND
    tl.store(at, expert, mask=in_table)
    tl.store(at + 1, start, mask=in_table)
    tl.store(at + 2, end, mask=in_table)
    if tl.program_id(0) == 0:
        tl.store(table_ptr, count)


def tile_bound(n_rows: int, num_experts: int, block_m: int) -> int:
    """M_BOUND: sum_e cdiv(n_e, BLOCK_M) <= cdiv(N, BLOCK_M) + E - 1 for any split of N rows (at least 1)."""
    return max(1, triton.cdiv(n_rows, block_m) + num_experts - 1)


def tile_table(offsets: Tensor, n_rows: int, block_m: int) -> Tensor:
    """offsets [E+1] (int32 or int64, offsets[E] = n_rows) -> the table [1 + 3 * M_BOUND] int64 for BLOCK_M =
    block_m (module docstring). One launch, no host sync."""
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"tile_table: block_m must be a power of two >= 1, got {block_m!r}")
    E = offsets.numel() - 1
    bound = tile_bound(n_rows, E, block_m)
    table = torch.empty(1 + FIELDS * bound, dtype=torch.int64, device=offsets.device)
    block_t = min(next_pow2(bound), max(16, (1 << 14) // next_pow2(max(E, 1))))  # [BLOCK_T, E_POW2] per program
    _tile_table_kernel[(triton.cdiv(bound, block_t),)](offsets, table, n_rows, E, bound, BLOCK_M=block_m,
                                                       E_POW2=max(2, next_pow2(E)), BLOCK_T=block_t)
    return table


class TileTables:
    """The tile tables of one plan's offsets, one per BLOCK_M, each written on first use (module docstring: why per
    BLOCK_M and on demand). Lives as long as one layer call."""

    def __init__(self, offsets: Tensor, n_rows: int):
        self.offsets = offsets  # [E+1] the plan's segment offsets
        self.n_rows = n_rows  # N, offsets[E] known from shapes (never read back from the device)
        self._tables: dict[int, Tensor] = {}

    def get(self, block_m: int) -> Tensor:
        if block_m not in self._tables:
            self._tables[block_m] = tile_table(self.offsets, self.n_rows, block_m)
        return self._tables[block_m]

    def __len__(self) -> int:
        return len(self._tables)


__all__ = ["TileTables", "tile_bound", "tile_table"]
