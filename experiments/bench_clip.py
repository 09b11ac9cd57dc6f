"""python -m experiments.bench_clip [--twins moe_e64_k2,moe_e256_k8] [--reps 7] [--max-norm 1e-4]

The optimizer phase alone (global norm, clip, AdamW, clearing the gradients) on the parameters of the demo's twins:
torch's clip_grad_norm_ (a pass that rewrites every gradient) before the foreach or fused update, against
experiments.optim.clipped_update (the clip as the fused kernel's grad_scale, or one _foreach_mul_ before foreach).
Every repetition starts from fresh copies of the same random gradients (copied outside the timed region), so the
clip is active in each (max_norm far below their norm) and the variants do the same arithmetic; "within the
limit" is the fused path with max_norm above the norm (no rescale at all). Variants and models interleaved
round-robin in one process, one warm-up, this thread's CPU time; min and median in ms.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from typing import Callable, Optional

import torch

from experiments.bench_step import StepSetup, twin_config
from experiments.config import OptimConfig
from experiments.optim import build_optimizer, clipped_update
from moe.model import Transformer

# name -> (optim.fused, how the clip runs: torch's clip_grad_norm_, folded with the clip active, folded within it)
VARIANTS = {"torch clip + foreach": ("false", "torch"), "torch clip + fused": ("true", "torch"),
            "folded, foreach": ("false", "clip"), "folded, fused": ("true", "clip"),
            "folded, fused, within the limit": ("true", "within")}


def make_phase(cfg, fused: str, how: str, max_norm: float, seed: int = 0) -> tuple[Callable[[], float], Transformer]:
    """A closure timing one optimizer phase of a fresh model of `cfg` on fixed gradients (seconds, thread CPU)."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(seed)
    saved = [torch.randn(p.shape, generator=g) * 1e-3 for p in params]
    optimizer = build_optimizer(model, OptimConfig(fused=fused))

    def phase() -> float:
        for p, s in zip(params, saved):
            p.grad = s.clone()  # clipping rescales in place: every repetition clips the same gradients
        t0 = time.thread_time()
        if how == "torch":
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            clipped_update(optimizer, torch.nn.utils.get_total_norm([p.grad for p in params]),
                           max_norm if how == "clip" else float("inf"))
        return time.thread_time() - t0

    return phase, model


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--twins", default="moe_e64_k2,moe_e256_k8", help="comma-separated twin names")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions")
    ap.add_argument("--max-norm", type=float, default=1e-4, help="the clip's limit (far below the gradients' norm)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    setup = StepSetup()
    phases = {(n, v): make_phase(twin_config(n, setup), fused, how, args.max_norm)[0]
              for n in args.twins.split(",") for v, (fused, how) in VARIANTS.items()}
    keys = list(phases)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    for r in range(args.reps + 1):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            dt = phases[k]()
            if r:
                times[k].append(dt)
    print(f"# optimizer phase alone, 1 thread, thread CPU time, torch {torch.__version__}, "
          f"{datetime.datetime.now().isoformat(timespec='minutes')}, load {os.getloadavg()[0]:.2f}\n")
    print("| model | " + " | ".join(VARIANTS) + " |\n|---|" + "---:|" * len(VARIANTS))
    for n in dict.fromkeys(k[0] for k in keys):
        print(f"| {n} | " + " | ".join(f"{1e3 * min(times[(n, v)]):.1f} / {1e3 * statistics.median(times[(n, v)]):.1f}"
                                       for v in VARIANTS) + " |")


if __name__ == "__main__":
    main()
