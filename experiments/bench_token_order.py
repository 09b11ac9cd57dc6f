"""python -m experiments.bench_token_order [--tokens T] [--reps N]

The token-major order of a dropless plan two ways, side by side in one process (moe.kernels.combine.TokenOrder):
build (a stable torch.sort of row_token, a scatter, a searchsorted) and from_dropless (a [T, E] table of the
chosen pairs, its running sum along E, a gather: no sort). Both are torch ops on the plan's device; the result is
the same order (tests/moe/kernels/test_token_order.py). Per repetition the two run round-robin, the first
rotating; reported: the median of each and the ratio build / from_dropless per (k, E). On CUDA each timing is
synchronised wall time around 20 back-to-back calls; on CPU it is this thread's CPU time (time.thread_time, torch
held to one thread) around 3 calls, so that other processes on a shared machine slow neither side.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from moe.kernels.combine import TokenOrder
from routing.capacity import assign


def dropless_rows(T: int, k: int, E: int, device: torch.device, seed: int = 0):
    """A dropless top-k plan's rows: each token's k distinct experts by random scores, sorted as assign does."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.rand(T, E, generator=g).topk(k, dim=-1).indices
    token_index, expert_index, *_ = assign(picks, torch.ones(T, k), E, None, "position")
    return token_index.to(device), expert_index.to(device)


def timed(fn, device: torch.device, inner: int) -> float:
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    for _ in range(inner):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (clock() - start) / inner


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384, help="T, tokens per layer call")
    ap.add_argument("--reps", type=int, default=15, help="round-robin repetitions per shape")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inner = 20 if device.type == "cuda" else 3
    if device.type == "cpu":
        torch.set_num_threads(1)  # thread CPU time counts this thread only
    T = args.tokens
    clock = "wall" if device.type == "cuda" else "thread CPU"
    print(f"device {device}, T={T}, {args.reps} reps x {inner} calls, median ms of {clock} time")
    print(f"{'k':>3} {'E':>4} {'build':>9} {'from_dropless':>14} {'ratio':>6}")
    for k, E in [(1, 8), (2, 8), (2, 64), (8, 64), (2, 256), (8, 256)]:
        rows, experts = dropless_rows(T, k, E, device)
        ways = {"build": lambda: TokenOrder.build(rows, T),
                "from_dropless": lambda: TokenOrder.from_dropless(rows, experts, T, k, E)}
        for fn in ways.values():
            fn()  # warm-up
        times = {name: [] for name in ways}
        names = list(ways)
        for rep in range(args.reps):
            for name in names[rep % 2:] + names[:rep % 2]:
                times[name].append(timed(ways[name], device, inner))
        b, f = (statistics.median(times[n]) * 1e3 for n in names)
        print(f"{k:>3} {E:>4} {b:>9.3f} {f:>14.3f} {b / f:>6.2f}")


if __name__ == "__main__":
    main()
