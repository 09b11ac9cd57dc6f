"""Greedy top-k selection over the expert axis with a fixed tie rule: each row's k largest scores, best first, the
lowest expert index first among equal values, on every device (the fused Triton gating's rule, so torch and triton
routers make the same plan).

Shape legend: T tokens (rows), E experts (columns), k choices per row.

torch.topk documents no tie rule, and on CPU its partial sort returns tied experts in another order (a
zero-initialised gate, every logit tied, routed differently under sorted and triton). Two implementations of the
rule, equal on every input (tests/routing/test_selection_passes.py):

- `select_topk_by_key`: one topk of an exact, unique int64 key (the float's order-preserving integer image in the
  high bits, the reversed expert index in the low bits). On CPU topk sorts every row, and the key costs four
  integer passes over [T, E] plus a copy to int64: 8-14 ms at T = 2,048, E = 256, k = 8 (at load 7-12).
- `select_topk` (what routers run): k passes of "row max, then the first column that holds it, then mask it",
  each pass three vectorised float sweeps over the scores and two reductions without indices (on CPU a max
  with indices, or any integer reduction, costs 5-10x a float amax). 1.4x (E = 4) to 8x (E = 64, k = 2) faster
  than the key, 3x at E = 256, k = 8 (docs/benchmarks.md, "Router cost (issues 16, 21)").

The order is that of the floats with two exceptions of `select_topk_by_key` that `select_topk` does not keep:
-inf ties with -3.4028235e38 (the most negative float), and every NaN ranks as +inf, tied with it (the key ranked
a positive NaN above +inf and one with the sign bit below -inf). A row of NaN still gets k distinct experts.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

FLOAT_MIN = -3.4028234663852886e38  # the most negative finite fp32: the passes mask chosen columns with -inf below it
# Below this many experts the passes run on CPU on the expert-major copy [E, T], where every step is a sweep
# along T: reductions along rows shorter than a few AVX-512 vectors of fp32 run short loops (an amax over
# [2048, 8] costs 4x one over its transpose). Measured at T = 2,048: expert-major 0.6x token-major's time at
# E = 4-16, 1.1x at E = 32, 1.2-1.4x at E = 64-256.
EXPERT_MAJOR_BELOW = 32
# Token-major passes run over blocks of rows of at most this many scores (512 KiB of fp32), so that the k passes
# over a block find it in the core's L2 instead of streaming [T, E] from L3 2k times: at T = 2,048, E = 256,
# k = 8, blocks of 512 rows take 0.46x the time of one sweep over all rows (E <= 128 is a single block here).
CHUNK_ELEMENTS = 1 << 17


def select_topk(scores: Tensor, k: int) -> Tensor:
    """scores [T, E] float -> [T, k] long: each row's k largest, best first, the lowest index first among equal
    values. Not differentiable (routers gather their weights with the indices)."""
    T, E = scores.shape
    if not 0 <= k <= E:
        raise ValueError(f"select_topk: k={k} must be in [0, {E}], the scores' columns (for a router: "
                         f"model.moe.router.top_k <= moe.num_experts)")
    s = scores.detach().float()
    if k == 0 or T == 0:
        return torch.zeros(T, k, dtype=torch.long, device=s.device)
    if E < EXPERT_MAJOR_BELOW and s.device.type == "cpu":
        return _passes(s.t(), k, axis=0).t().contiguous()  # [E, T] sweeps, back to [T, k]
    rows = min(max(CHUNK_ELEMENTS // E, 1) if s.device.type == "cpu" else T, T)
    # one working copy and one hit buffer for every block: a fresh 512 KiB buffer per block would be fresh pages
    buffers = (s.new_empty(rows, E), s.new_empty(rows, E))
    return torch.cat([_passes(s[i:i + rows], k, axis=1, buffers=buffers) for i in range(0, T, rows)])


def _passes(s: Tensor, k: int, axis: int, buffers: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """The k passes over one block of scores whose expert axis is `axis` -> [k, T'] (axis 0) or [T', k] (axis 1).
    buffers: two tensors of at least s's rows (axis 1) to work in; None: fresh ones."""
    E = s.shape[axis]
    if buffers is None:
        work = torch.empty_like(s, memory_format=torch.contiguous_format)  # s may be a transposed view
        hit = torch.empty_like(work)
    else:
        work, hit = buffers[0][:s.shape[0]], buffers[1][:s.shape[0]]
    # The working copy: every NaN ranked as +inf and -inf lifted to FLOAT_MIN, so that the -inf written over a
    # chosen column is below every score left (a pass never picks a column twice, whatever the row holds).
    torch.nan_to_num(s, nan=float("inf"), posinf=float("inf"), neginf=FLOAT_MIN, out=work)
    rev = torch.arange(E, 0, -1, dtype=work.dtype, device=work.device)  # E - e: the lowest hit scores highest
    rev = rev[:, None] if axis == 0 else rev  # broadcast along the expert axis
    picks = []
    for j in range(k):
        best = work.amax(axis, keepdim=True)  # [1, T'] or [T', 1]
        torch.eq(work, best, out=hit)  # 1.0 where a column holds the row's max (ties included), else 0.0
        hit.mul_(rev)
        pick = (E - hit.amax(axis, keepdim=True)).long()  # the lowest such column; exact: E < 2**24
        picks.append(pick)
        if j + 1 < k:
            work.scatter_(axis, pick, float("-inf"))
    return torch.cat(picks, dim=axis)


def select_topk_by_key(scores: Tensor, k: int) -> Tensor:
    """select_topk's rule as one torch.topk of an exact int64 key (the implementation before issues 16/21, kept as
    the reference the passes are tested against). scores [T, E] float -> [T, k] long."""
    E = scores.shape[-1]
    bits = (scores.detach().float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0, equal to torch too
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats reversed: integer order is float order
    shift = max(E - 1, 1).bit_length()  # 31 + shift < 63 for any E < 2**31: no overflow of the int64 key
    rank = torch.arange(E - 1, -1, -1, device=scores.device)  # a lower index gets a larger key
    return ((ordered.to(torch.int64) << shift) | rank).topk(k, dim=-1).indices
