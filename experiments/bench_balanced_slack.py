"""Cost of the balanced top-k solver with and without capacity slack (issue 21 part 2), against greedy top-k.

`python -m experiments.bench_balanced_slack [--experts 64,256] [--reps 3] [--steps]`: the demo batch's T = 2,048 tokens,
k = 2, "diverse" logits N(0, 1) and "alike" ones (a shared row plus 0.01 N(0, 1) per token: the unigram phase of
docs/routing_defaults.md); one thread, the methods interleaved in each repetition, thread CPU time (the machine
is shared, so wall time means little), minimum over the repetitions. Then where the exact solver's time goes:
cProfile's cumulative time of its parts (warm start, vectorised rounds, serial bids, slackness re-check).
--steps: one bare training step of moe_e{E}_k2 (bench_step.make_step: the demo's 16 x 128 batch, forward,
backward, clip, AdamW; at initialisation, so the logits are diverse) with the top-k router (aux 0.1, the twins'
default), routing=balanced_topk exact, and with slack 1.25, interleaved, thread CPU time.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from routing.balanced_topk import balanced_topk_assignment, slack_capacity
from routing.config import RouterConfig
from routing.topk import select_topk

T, K = 2048, 2
PARTS = ("warm_prices", "rounds", "serial", "rebid")  # the exact solver's parts, as cProfile names them


def logits(kind: str, experts: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    common = torch.randn(1, experts, generator=g)
    return common + 0.01 * torch.randn(T, experts, generator=g) if kind == "alike" else torch.randn(T, experts, generator=g)


def cpu_ms(fn) -> float:
    start = time.thread_time()
    fn()
    return 1e3 * (time.thread_time() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", default="64,256")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", action="store_true", help="the training steps instead of the solvers")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.steps:
        return steps([int(e) for e in args.experts.split(",")], args.reps)
    print("| E | logits | greedy top-k | exact (c = 1) | slack c = 1.25 | exact / greedy | slack / exact |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for E in (int(e) for e in args.experts.split(",")):
        for kind in ("diverse", "alike"):
            s = logits(kind, E)
            methods = {"greedy": lambda: select_topk(s, K),
                       "exact": lambda: balanced_topk_assignment(s, K, slack_capacity(T, E, K, 1.0)),
                       "slack": lambda: balanced_topk_assignment(s, K, slack_capacity(T, E, K, 1.25))}
            best = {name: float("inf") for name in methods}
            for _ in range(args.reps):
                for name, fn in methods.items():
                    best[name] = min(best[name], cpu_ms(fn))
            g, x, sl = best["greedy"], best["exact"], best["slack"]
            print(f"| {E} | {kind} | {g:.1f} ms | {x:.0f} ms | {sl:.0f} ms | {x / g:.0f}x | {sl / x:.1f}x |", flush=True)
    print("\nexact solver, cumulative time per part (cProfile, one call):")
    for E in (int(e) for e in args.experts.split(",")):
        for kind in ("diverse", "alike"):
            s = logits(kind, E)
            prof = cProfile.Profile()
            prof.runcall(balanced_topk_assignment, s, K, slack_capacity(T, E, K, 1.0))
            stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
            total = sum(v[2] for v in stats.values())
            parts = {name: sum(v[3] for key, v in stats.items() if key[2] == name and "balanced_topk" in key[0])
                     for name in PARTS}
            print(f"E={E} {kind}: total {1e3 * total:.0f} ms; " +
                  ", ".join(f"{n} {100 * t / total:.0f}%" for n, t in parts.items()), flush=True)


def steps(experts: list[int], reps: int) -> None:
    import dataclasses

    from experiments.bench_step import StepSetup, interleaved, make_step, twin_config

    setup = StepSetup()
    balanced = RouterConfig(name="balanced_topk", top_k=K, aux_loss_coef=0.0, z_loss_coef=0.0)
    routers = {"top-k aux 0.1": RouterConfig(top_k=K, aux_loss_coef=0.1), "balanced exact": balanced,
               "balanced slack 1.25": dataclasses.replace(balanced, capacity_factor=1.25)}
    print("| twin | " + " | ".join(routers) + " |")
    print("|---|" + "---:|" * len(routers))
    for E in experts:
        cfg = twin_config(f"moe_e{E}_k{K}", setup)
        fns = {n: make_step(cfg.replace(moe=dataclasses.replace(cfg.moe, router=r)), setup)[0] for n, r in routers.items()}
        best = {n: min(ts) for n, ts in interleaved(fns, reps, clock=time.thread_time).items()}
        ref = best["top-k aux 0.1"]
        print(f"| moe_e{E}_k{K} | " + " | ".join(f"{t:.2f} s ({t / ref:.2f}x)" for t in best.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
