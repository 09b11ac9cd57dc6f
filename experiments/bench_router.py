"""python -m experiments.bench_router [--old DIR] [--twins moe_e8_k2,...] [--reps 15] [--step-reps 5] [--no-step]
                                   [--parts]

The router's cost (issues 16 and 21): forward + backward of one MoE layer's router at the demo's T = 2,048 tokens
(d = 128) for each demo twin, this checkout's routing package against an older one, and the bare training step
(as experiments.bench_step) of dense and of each twin with either routing, all interleaved round-robin in one
process on this thread's CPU time (other jobs share the cores; see experiments.bench_floor).

Shape legend: T tokens, d model width, E experts, k choices per token.

--old DIR: a directory holding the older `routing` package (default: `git archive a0da149 routing`, the commit
before issues 16/21's router work, unpacked into a temporary directory). Its modules are imported under their own
names while this checkout's are set aside, then set back: the old router objects keep their own module globals,
so both implementations run in one process. routing imports only torch, so nothing else is loaded twice.
The old router of a twin shares the new one's gate Parameter, so both compute the same logits and the optimizer
updates the same tensor; their plans are checked equal (indices, counts exactly; weights, losses, gradients to
1e-6) before timing.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Callable, Optional

import torch

from experiments import allocator
from experiments.bench_step import StepSetup, interleaved, make_step, twin_config
from moe.layer import MoELayer
from routing import build_router

BASELINE = "a0da149"  # the commit before the router work of issues 16/21
TWINS = "moe_e8_k2,moe_e16_k2,moe_e32_k2,moe_e64_k2,moe_e256_k8"


def load_old_routing(directory: Optional[str]) -> Callable:
    """The older package's build_router (see the module docstring); `directory` None: git archive BASELINE."""
    if directory is None:
        directory = tempfile.mkdtemp(prefix="old_routing_")
        archive = subprocess.run(["git", "archive", BASELINE, "routing"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", directory], input=archive, check=True)
    if not os.path.isdir(os.path.join(directory, "routing")):
        raise ValueError(f"--old {directory!r} holds no routing/ package; give the directory that contains it")
    mine = {n: m for n, m in sys.modules.items() if n == "routing" or n.startswith("routing.")}
    for n in mine:
        del sys.modules[n]
    sys.path.insert(0, directory)
    try:
        import routing.config
        import routing.registry

        # the registry resolves its classes on first use: resolve them all now, while the old modules are loaded
        classes = {name: routing.registry.router_class(name) for name in routing.registry.ROUTERS}
        old_config = routing.config.RouterConfig
        for name in [n for n in sys.modules if n == "routing" or n.startswith("routing.")]:
            del sys.modules[name]
    finally:
        sys.path.remove(directory)
        sys.modules.update(mine)

    def build(d: int, num_experts: int, cfg) -> torch.nn.Module:
        if cfg.name not in classes or classes[cfg.name].per_layer:
            raise ValueError(f"router {cfg.name!r}: the older package has no such router, or it needs its layer")
        return classes[cfg.name](d, num_experts, old_config(**asdict(cfg)))

    return build


def old_router_of(router: torch.nn.Module, build_old: Callable) -> torch.nn.Module:
    """The older implementation of `router`'s config, sharing its gate Parameter (same logits, same updates)."""
    old = build_old(router.gate.in_features, router.num_experts, router.cfg)
    old.gate.weight = router.gate.weight
    return old.train(router.training)


def check_equal(new: torch.nn.Module, old: torch.nn.Module, x: torch.Tensor) -> None:
    """Both routers' plans on x: indices and counts exactly, weights, losses and gate gradients to 1e-6."""
    grads = []
    plans = []
    for r in (new, old):
        r.gate.weight.grad = None
        p = r(x)
        (p.weight.sum() + sum(p.aux_losses.values())).backward()
        grads.append(r.gate.weight.grad.clone())
        plans.append(p)
    a, b = plans
    for name in ("token_index", "expert_index", "counts"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-6)
    for k in b.aux_losses:
        torch.testing.assert_close(a.aux_losses[k], b.aux_losses[k], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    new.gate.weight.grad = None


def forward_backward(router: torch.nn.Module, x: torch.Tensor) -> None:
    """One router forward and backward, the gradients cleared first (a training step's zero_grad(set_to_none))."""
    router.gate.weight.grad = x.grad = None
    p = router(x)
    (p.weight.sum() + sum(p.aux_losses.values())).backward()


def router_times(names: list[str], build_old: Callable, reps: int) -> dict[str, dict[str, float]]:
    """twin -> {"old": ms, "new": ms, "median ratio": new/old}: router forward + backward, min of reps."""
    setup = StepSetup()
    gen = torch.Generator().manual_seed(0)
    fns: dict[str, Callable[[], None]] = {}
    for n in names:
        cfg = twin_config(n, setup)
        torch.manual_seed(0)
        new = build_router(cfg.d_model, cfg.moe.num_experts, cfg.moe.router)
        with torch.no_grad():
            new.gate.weight.normal_(0.0, 0.3, generator=gen)  # a trained router's spread, not the init's ties
        old = old_router_of(new, build_old)
        x = torch.randn(setup.batch * setup.seq_len, cfg.d_model, generator=gen, requires_grad=True)
        check_equal(new, old, x)
        for tag, r in (("new", new), ("old", old)):
            fns[f"{n}|{tag}"] = lambda r=r, x=x: forward_backward(r, x)
    times = interleaved(fns, reps, warmup=2, clock=time.thread_time)
    out: dict[str, dict[str, float]] = {}
    for n in names:
        o, w = times[f"{n}|old"], times[f"{n}|new"]
        out[n] = {"old": 1e3 * min(o), "new": 1e3 * min(w),
                  "median ratio": statistics.median(b / a for a, b in zip(o, w))}
    return out


def router_parts(names: list[str], build_old: Callable, reps: int) -> dict[str, dict[str, float]]:
    """twin -> {part: ms}, forward parts of either router on one batch's logits (no gradient), interleaved: the old
    gating (softmax + int64-key topk; its key selection alone), losses and plan (sort + statistics); the new
    selection, fused gate (weights, losses, probabilities, lse, entropy) and plan; and each router's backward
    (forward + backward minus forward)."""
    setup = StepSetup()
    gen = torch.Generator().manual_seed(0)
    fns: dict[tuple[str, str], Callable[[], object]] = {}
    for n in names:
        cfg = twin_config(n, setup)
        rc, E, k = cfg.moe.router, cfg.moe.num_experts, cfg.moe.router.top_k
        new = build_router(cfg.d_model, E, rc)
        with torch.no_grad():
            new.gate.weight.normal_(0.0, 0.3, generator=gen)
        old = old_router_of(new, build_old)
        x = torch.randn(setup.batch * setup.seq_len, cfg.d_model, generator=gen, requires_grad=True)
        with torch.no_grad():
            logits = new.logits(x)
        o, w = type(old).route.__globals__, type(new).route.__globals__  # each implementation's module
        probs, weight, idx = o["topk_gating"](logits, k, rc.order, rc.renormalize)
        f = w["expert_fractions"](idx, E)
        gate = w["fused_gate"](logits, idx, f, rc.aux_loss_coef, rc.z_loss_coef)
        ts = (gate.entropy, gate.top1_prob)

        fns.update({
            (n, "old gating"): lambda o=o, lg=logits, k=k, rc=rc: o["topk_gating"](lg, k, rc.order, rc.renormalize),
            (n, "old key select"): lambda o=o, lg=logits, k=k: o["select_topk"](lg, k),
            (n, "old losses"): lambda o=o, rc=rc, lg=logits, p=probs, i=idx: o["standard_losses"](rc, lg, p, i),
            (n, "old plan"): lambda o=o, i=idx, wt=weight, p=probs, E=E: o["choice_plan"](i, wt, p, E, None, False,
                                                                                      "probs", {}),
            (n, "old forward"): lambda old=old, x=x: old(x),
            (n, "old forward+backward"): lambda old=old, x=x: forward_backward(old, x),
            (n, "new select"): lambda w=w, lg=logits, k=k: w["select_topk"](lg, k),
            (n, "new gate"): lambda w=w, lg=logits, i=idx, f=f, rc=rc: w["fused_gate"](lg, i, f, rc.aux_loss_coef,
                                                                                     rc.z_loss_coef),
            (n, "new plan"): lambda w=w, i=idx, g=gate, E=E, ts=ts: w["choice_plan"](i, g.weight, g.probs, E, None,
                                                                                   False, "probs", {}, token_stats=ts),
            (n, "new forward"): lambda new=new, x=x: new(x),
            (n, "new forward+backward"): lambda new=new, x=x: forward_backward(new, x),
        })
    times = interleaved({f"{a}|{b}": fn for (a, b), fn in fns.items()}, reps, warmup=2, clock=time.thread_time)
    out: dict[str, dict[str, float]] = {}
    for key, ts in times.items():
        n, part = key.split("|")
        out.setdefault(n, {})[part] = 1e3 * min(ts)
    for parts in out.values():
        for tag in ("old", "new"):
            parts[f"{tag} backward"] = parts[f"{tag} forward+backward"] - parts[f"{tag} forward"]
    return out


PARTS = ("old gating", "old key select", "old losses", "old plan", "old backward", "new select", "new gate",
         "new plan", "new backward")


def step_times(names: list[str], build_old: Callable, reps: int) -> dict[str, list[float]]:
    """"dense", "TWIN|old", "TWIN|new" -> seconds per bare step, interleaved (experiments.bench_step.make_step)."""
    setup = StepSetup()

    def with_old_routers(model: torch.nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, MoELayer):
                m.router = old_router_of(m.router, build_old)  # the benchmark's own model

    fns = {"dense": make_step(twin_config("dense", setup), setup)[0]}
    for n in names:
        cfg = twin_config(n, setup)
        fns[f"{n}|old"] = make_step(cfg, setup, wrap=with_old_routers)[0]
        fns[f"{n}|new"] = make_step(cfg, setup)[0]
    return interleaved(fns, reps, warmup=1, clock=time.thread_time)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default=None, help=f"directory holding the older routing/ (default: git archive {BASELINE})")
    ap.add_argument("--twins", default=TWINS, help=f"comma-separated twin names (default {TWINS})")
    ap.add_argument("--reps", type=int, default=15, help="timed router repetitions")
    ap.add_argument("--step-reps", type=int, default=5, help="timed bare-step repetitions")
    ap.add_argument("--no-step", action="store_true", help="time the routers only")
    ap.add_argument("--parts", action="store_true", help="also time the routers' parts (router_parts)")
    ap.add_argument("--allocator", default="auto", choices=allocator.CHOICES,
                    help="re-run once with this allocator (experiments.allocator), as bench_step and bench_floor")
    args = ap.parse_args(argv)
    if args.allocator != "system":
        allocator.reexec("experiments.bench_router", list(argv if argv is not None else sys.argv[1:]), args.allocator)
    torch.set_num_threads(1)
    names = [n.strip() for n in args.twins.split(",") if n.strip()]
    build_old = load_old_routing(args.old)
    print(f"# router forward + backward, T = 2048, thread CPU time, 1 thread, torch {torch.__version__}, "
          f"allocator: {allocator.current()}, "
          f"load {os.getloadavg()[0]:.1f}, {datetime.datetime.now().isoformat(timespec='minutes')}")
    print("\n| twin | old ms (min) | new ms (min) | new / old (min) | new / old (median of pairs) |\n|---|---:|---:|---:|---:|")
    for n, t in router_times(names, build_old, args.reps).items():
        print(f"| {n} | {t['old']:.2f} | {t['new']:.2f} | {t['new'] / t['old']:.3f}x | {t['median ratio']:.3f}x |")
    if args.parts:
        print(f"\n# forward parts and backward (ms, min of {args.reps}; load {os.getloadavg()[0]:.1f})\n\n| twin | "
              + " | ".join(PARTS) + " |\n|---|" + "---:|" * len(PARTS))
        for n, p in router_parts(names, build_old, args.reps).items():
            print(f"| {n} | " + " | ".join(f"{p[k]:.2f}" for k in PARTS) + " |")
    if args.no_step:
        return
    times = step_times(names, build_old, args.step_reps)
    dense = times["dense"]
    print(f"\n# bare step, T = 2048, load {os.getloadavg()[0]:.1f}\n\n| twin | old routing ms | new routing ms | "
          "old vs dense (min; median) | new vs dense (min; median) |\n|---|---:|---:|---:|---:|")
    print(f"| dense | {1e3 * min(dense):.1f} | | | |")
    for n in names:
        cells = []
        for tag in ("old", "new"):
            ts = times[f"{n}|{tag}"]
            cells.append((1e3 * min(ts), min(ts) / min(dense), statistics.median(a / b for a, b in zip(ts, dense))))
        print(f"| {n} | {cells[0][0]:.1f} | {cells[1][0]:.1f} | {cells[0][1]:.3f}x ({cells[0][2]:.3f}x) | "
              f"{cells[1][1]:.3f}x ({cells[1][2]:.3f}x) |")


if __name__ == "__main__":
    main()
