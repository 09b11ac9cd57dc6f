"""Cost of balanced routing at many experts (issue 21 part 2): the solvers alone and the demo's training step.

    python -m experiments.bench_balanced_routing [--experts 64,256] [--reps 3] [--no-steps]

1. The solvers on [T, E] logits of the demo batch (T = 16 x 128 = 2,048 tokens), two kinds: "diverse"
   (N(0, 1)) and "alike" (one shared row plus 0.01 N(0, 1) per token: the unigram phase of
   docs/routing_defaults.md, where every token reaches the router as nearly the same vector). Greedy top-k
   (routing.topk.select_topk), the transportation auction (routing.assignment, top-1 only) and the balanced
   top-k auction (routing.balanced_topk).
2. One bare training step (bench_step.make_step) of the demo's twins with the top-k router (aux 0.1, the
   twins' top-2 default before issue 21 part 2) against BASE layers with each solver.

Everything is measured in one process, one thread, interleaved repetitions (the first dropped), minimum of
the rest; ratios are against greedy top-k in the same round.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import time
from typing import Callable, Optional

import torch

from experiments.bench_step import StepSetup, interleaved, make_step, twin_config
from routing.assignment import auction_assignment, balanced_capacity
from routing.balanced_topk import balanced_topk_assignment, topk_capacity
from routing.config import RouterConfig
from routing.topk import select_topk

TOKENS = 16 * 128  # the demo batch


def logits_of(kind: str, experts: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "diverse":
        return torch.randn(TOKENS, experts, generator=g)
    return torch.randn(1, experts, generator=g) + 0.01 * torch.randn(TOKENS, experts, generator=g)


def solver_fns(s: torch.Tensor, k: int) -> dict[str, Callable[[], object]]:
    E = s.shape[1]
    fns: dict[str, Callable[[], object]] = {"greedy": lambda: select_topk(s, k)}
    if k == 1:
        fns["auction"] = lambda: auction_assignment(s, balanced_capacity(TOKENS, E))
    fns["balanced_topk"] = lambda: balanced_topk_assignment(s, k, topk_capacity(TOKENS, E, k))
    return fns


def report(title: str, times: dict[str, list[float]]) -> None:
    ref = min(times["greedy"]) if "greedy" in times else None
    cells = [f"{n} {1000 * min(t):.1f} ms" + (f" ({min(t) / ref:.1f}x)" if ref and n != "greedy" else "")
             for n, t in times.items()]
    print(f"| {title} | " + " | ".join(cells) + " |", flush=True)


def step_fns(name: str, setup: StepSetup) -> dict[str, Callable[[], object]]:
    """The twin `name` with the top-k router (aux 0.1) and with BASE layers; the bias of BaseRouter's solver
    choice for top-1 is switched by routing.base_layers.AUCTION_TOPK_FROM_E."""
    import routing.base_layers as base_layers

    cfg = twin_config(name, setup)
    k = cfg.moe.router.top_k

    def with_router(router: RouterConfig):
        return cfg.replace(moe=dataclasses.replace(cfg.moe, router=router))

    topk = with_router(RouterConfig(top_k=k, aux_loss_coef=0.1, order="softmax_topk" if k == 1 else "topk_softmax"))
    base = with_router(RouterConfig(name="base", top_k=k, aux_loss_coef=0.0, z_loss_coef=0.0))
    fns = {"greedy": make_step(topk, setup)[0]}
    new_step = make_step(base, setup)[0]

    def solver(threshold: int, step: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            saved = base_layers.AUCTION_TOPK_FROM_E
            base_layers.AUCTION_TOPK_FROM_E = threshold
            try:
                return step()
            finally:
                base_layers.AUCTION_TOPK_FROM_E = saved
        return run

    if k == 1:
        fns["BASE auction"] = solver(10**9, make_step(base, setup)[0])
    fns["BASE balanced_topk"] = solver(0, new_step)
    return fns


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", default="64,256", help="comma-separated E")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (after one warm-up)")
    p.add_argument("--no-steps", action="store_true", help="the solvers only, not the training steps")
    p.add_argument("--no-solvers", action="store_true", help="the training steps only")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# balanced routing, {stamp}, 1 thread, load average {os.getloadavg()[0]:.1f} at start")
    experts = [int(e) for e in args.experts.split(",")]
    if not args.no_solvers:
        for E in experts:
            for k in (1, 2):
                for kind in ("diverse", "alike"):
                    report(f"solver E={E} k={k} {kind}", interleaved(solver_fns(logits_of(kind, E), k), args.reps))
    if not args.no_steps:
        setup = StepSetup()
        for E in experts:
            for k in (1, 2):
                t0 = time.perf_counter()
                report(f"step moe_e{E}_k{k}", interleaved(step_fns(f"moe_e{E}_k{k}", setup), args.reps))
                print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
