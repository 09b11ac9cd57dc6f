"""python -m experiments.bench_token_combine [--shape T:d:k] [--dtype fp32|bf16] [--reps 7]

What the expert-parallel dispatcher's deterministic combine costs: moe.dispatch.token_rows (a fixed slot order,
fp32 sum, K gathers of T rows) against the weighted `index_add_` it replaced, forward plus backward of the combine
and of the row gather, side by side in one process (round-robin, the first rotating; min over repetitions).
Rows are a random top-k plan sorted by expert, as a RoutingPlan's. One thread; on CUDA it syncs around each call.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Optional

import torch

from moe.dispatch.token_rows import combine_rows, gather_rows, token_slots

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make(T: int, d: int, k: int, E: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(0)
    expert = torch.rand(T, E, generator=g).topk(k, dim=1).indices.reshape(-1)
    order = torch.argsort(expert, stable=True)
    token_index = (torch.arange(T * k) // k)[order].to(device)
    x = torch.randn(T, d, generator=g).to(device, dtype)
    out = torch.randn(T * k, d, generator=g).to(device, dtype)  # the experts' outputs, returned rows
    weight = torch.rand(T * k, generator=g).to(device)
    gy = torch.randn(T, d, generator=g).to(device, dtype)
    return token_index, x, out, weight, gy


def step(kind: str, token_index, x, out, weight, gy) -> Callable[[], tuple]:
    """One forward + backward of the gather and the combine; returns the gradients of x, out and weight."""
    T = x.shape[0]
    leaves = [t.detach().requires_grad_(True) for t in (x, out, weight)]
    xg, og, wg = leaves
    grad_rows = torch.ones(token_index.numel(), x.shape[1], dtype=x.dtype, device=x.device)

    def old() -> tuple:  # what alltoall_dispatch did: x[token_index] (backward: accumulating index_put), index_add_
        rows = xg[token_index]
        y = xg.new_zeros(x.shape).index_add_(0, token_index, og * wg.to(og.dtype)[:, None])
        return torch.autograd.grad([y, rows], leaves, [gy, grad_rows])

    def new() -> tuple:
        order = token_slots(token_index, T)  # includes its one host read of K (alltoall folds it into its sync)
        rows = gather_rows(xg, order)
        y = combine_rows(og, wg, order)
        return torch.autograd.grad([y, rows], leaves, [gy, grad_rows])

    return old if kind == "index_add_" else new


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_token_combine")
    p.add_argument("--shape", default="4096:512:2", help="T:d:k (E = 8)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    T, d, k = (int(v) for v in a.shape.split(":"))
    torch.set_num_threads(1)
    tensors = make(T, d, k, 8, DTYPES[a.dtype], a.device)
    fns = {n: step(n, *tensors) for n in ("index_add_", "token_rows")}
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    best = {n: float("inf") for n in fns}
    for r in range(a.reps + 1):  # one warm-up
        names = list(fns)[r % 2:] + list(fns)[:r % 2]
        for n in names:
            sync()
            t0 = time.perf_counter()
            fns[n]()
            sync()
            if r:
                best[n] = min(best[n], time.perf_counter() - t0)
    print(f"T={T} d={d} k={k} {a.dtype} {a.device}: index_add_ {best['index_add_'] * 1e3:.2f} ms, token_rows "
          f"{best['token_rows'] * 1e3:.2f} ms, ratio {best['token_rows'] / best['index_add_']:.2f}")


if __name__ == "__main__":
    main()
