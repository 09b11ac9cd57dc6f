"""python -m experiments.bench_experts_path [--twins ...] [--reps 7] [--tokens 2048] [--no-steps] [--no-parts]

The experts' path on CPU (issues 16, 21), before and after, side by side in one process: one FFN slot (forward +
backward) of the demo's dense base and of its FLOP-matched twins, split into parts, and the bare training step.

Shape legend: T tokens (--tokens), d model width, E experts, k choices, f expert width, N = T*k plan rows.

"before" is the bank's per-expert loop (gemm_impl="loop": what `auto` ran for the demo twins' unaligned widths
before moe.grouped_glu), "after" is gemm_impl="auto". Parts, ms of forward + backward, min over --reps:
- dense FFN: moe.ffn.DenseFFN on [T, d] (the dense twin's slot);
- experts: Experts.forward_sorted on rows already in expert order, with the combine weight (row_scale), before
  and after;
- rows: the gather and combine alone, index_add_ (sorted's CPU path) and token-major (moe.dispatch.token_rows,
  sorted's CUDA path);
- layer: the whole MoELayer (router, gather, experts, combine), before and after, and with the token-major path.
Steps: one bare training step (forward, backward, clip_grad_norm_, torch's fused AdamW, zero_grad) of each model,
before and after; the ratio is against the dense step of the same round.

Protocol: every call interleaved round-robin per repetition (the starting one rotating), one warm-up; gradients
set to None before each call (as a training step's zero_grad(set_to_none=True) leaves them: an accumulating
.grad would add a pass over every weight gradient that a step does not make); the clock is this thread's CPU
time (time.thread_time, one torch thread), so the time other processes hold the core is not counted. The machine's
load still shares caches and memory bandwidth: read ratios, not absolute times.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import Callable, Optional

import torch

from experiments.bench_step import DEMO_TWINS, StepSetup, twin_config
from moe.dispatch.sorted import sorted_dispatch
from moe.experts import Experts
from moe.ffn import DenseFFN
from moe.layer import MoELayer
from moe.model import Transformer


def interleaved_min(fns: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    """ms per call (min over reps after one warm-up round), calls interleaved, the starting one rotating."""
    names, best = list(fns), {n: float("inf") for n in fns}
    for r in range(reps + 1):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.thread_time()
            fns[n]()
            if r:
                best[n] = min(best[n], 1e3 * (time.thread_time() - t0))
    return best


def _clear(tensors) -> None:
    for t in tensors:
        t.grad = None


def _set_impl(module: torch.nn.Module, impl: str) -> None:
    for m in module.modules():
        if isinstance(m, Experts):
            m.gemm_impl = impl


def _twin_rows(name: str, x: torch.Tensor):
    """(a twin's MoE layer, its router's plan for x at initialisation, the plan's rows [N, d] in expert order as a
    leaf)."""
    layer = MoELayer(twin_config(name, StepSetup()))
    with torch.no_grad():
        plan = layer.router(x)
    return layer, plan, x.detach()[plan.token_index].requires_grad_(True)


def part_fns(names: list[str], tokens: int) -> dict[tuple[str, str], Callable[[], None]]:
    """The FFN slot's parts of every model, keyed (model, part)."""
    base = twin_config("dense", StepSetup())
    gen = torch.Generator().manual_seed(0)
    x, g = (torch.randn(tokens, base.d_model, generator=gen) for _ in range(2))  # [T, d] input, its gradient
    x.requires_grad_(True)
    torch.manual_seed(0)
    dense = DenseFFN(base.d_model, base.d_ff, base.activation, base.glu, base.ffn_bias)
    fns = {("dense", "dense FFN"): lambda: (_clear([x, *dense.parameters()]), dense(x).backward(g))}
    for n in (n for n in names if n != "dense"):
        layer, plan, rows = _twin_rows(n, x)
        scale = plan.weight.detach().clone().requires_grad_(True)  # [N] the combine weight, a leaf
        g_rows = torch.randn(rows.shape, generator=gen)
        params = [rows, scale, x, *layer.parameters()]

        def experts(impl, layer=layer, plan=plan, rows=rows, scale=scale, g_rows=g_rows, params=params):
            _clear(params)
            layer.experts.gemm_impl = impl
            layer.experts.forward_sorted(rows, plan.expert_index, plan.counts, row_scale=scale).backward(g_rows)

        def moved(deterministic, layer=layer, plan=plan, params=params):
            """gather + combine alone: identity experts (a view, so only the row movement is timed)."""
            _clear(params)
            ident = _Identity()
            sorted_dispatch(x, plan, ident, deterministic=deterministic).backward(g)

        def whole(impl, deterministic=False, layer=layer, params=params):
            _clear(params)
            layer.experts.gemm_impl = impl
            h = x.reshape(-1, x.shape[-1])
            plan = layer.router(h)
            y = sorted_dispatch(h, plan, layer.experts, deterministic=deterministic)
            (y.mul(g).sum() + sum(plan.aux_losses.values())).backward()

        fns.update({
            (n, "experts before"): lambda f=experts: f("loop"),
            (n, "experts after"): lambda f=experts: f("auto"),
            (n, "rows index_add_"): lambda f=moved: f(False),
            (n, "rows token-major"): lambda f=moved: f(True),
            (n, "layer before"): lambda f=whole: f("loop"),
            (n, "layer after"): lambda f=whole: f("auto"),
            (n, "layer after, token-major"): lambda f=whole: f("auto", True),
        })
    return fns


class _Identity:
    """An expert bank that returns its rows times the combine weight: the dispatcher's row movement alone."""

    def forward_sorted(self, rows, expert_index, counts, row_scale: Optional[torch.Tensor] = None):
        return rows if row_scale is None else rows * row_scale[:, None]


def gemm_fns(names: list[str], tokens: int) -> tuple[dict[tuple[str, str], Callable[[], None]], dict[str, float]]:
    """One projection's three GEMMs (forward x @ W, grad-input g @ W^T, grad-weight x^T @ g) at each model's
    shapes, with the rows split evenly over the experts (T*k/E each): the dense FFN's [T, d] x [d, d_ff] as one
    torch.mm, each twin's [N/E, d] x [d, f] per expert as the loop (weights [E, in, out], the bank's layout) and as
    the loop on weights stored [E, out, in] (grad-input then non-transposed, forward transposed), and
    torch._grouped_mm on 16-byte-aligned views (width padded to fp in storage, no copy). Returns the calls and
    the FLOPs of each model's three GEMMs."""
    from moe.grouped_glu import aligned_width

    setup = StepSetup()
    fns, flops = {}, {}
    for n in names:
        cfg = twin_config(n, setup)
        d = cfg.d_model
        E, k, f = (1, 1, cfg.d_ff) if n == "dense" else (cfg.moe.num_experts, cfg.moe.router.top_k, cfg.expert_hidden)
        M = tokens * k // E
        fp = aligned_width(f, torch.float32)
        x, g = torch.randn(E * M, d), torch.randn(E * M, fp)[:, :f]
        g_c = g.contiguous()
        w, wt = torch.randn(E, d, f), torch.randn(E, f, d)
        w_a = torch.randn(E, d, fp)[:, :, :f]
        out, gx, gw = torch.empty(E * M, f), torch.empty(E * M, d), torch.empty(E, d, f)
        sp = [M] * E
        xs, gs, outs, gxs = x.split(sp), g_c.split(sp), out.split(sp), gx.split(sp)
        offs = torch.arange(1, E + 1, dtype=torch.int32) * M

        def loop(xs=xs, gs=gs, ws=w.unbind(0), outs=outs, gxs=gxs, gws=gw.unbind(0)):
            for a, b, o in zip(xs, ws, outs):
                torch.mm(a, b, out=o)
            for a, b, o in zip(gs, ws, gxs):
                torch.mm(a, b.t(), out=o)
            for a, b, o in zip(xs, gs, gws):
                torch.mm(a.t(), b, out=o)

        def loop_out_in(xs=xs, gs=gs, ws=wt.unbind(0), outs=outs, gxs=gxs, gws=torch.empty(E, f, d).unbind(0)):
            for a, b, o in zip(xs, ws, outs):
                torch.mm(a, b.t(), out=o)
            for a, b, o in zip(gs, ws, gxs):
                torch.mm(a, b, out=o)
            for a, b, o in zip(gs, xs, gws):  # grad of W [out, in]: g^T x
                torch.mm(a.t(), b, out=o)

        def grouped(x=x, g=g, w_a=w_a, offs=offs):
            torch._grouped_mm(x, w_a, offs=offs)
            torch._grouped_mm(g, w_a.transpose(1, 2), offs=offs)
            torch._grouped_mm(x.t(), g, offs=offs)

        fns[(n, "loop")] = loop
        if n != "dense":
            fns[(n, "loop, W [E, out, in]")] = loop_out_in
            fns[(n, "grouped_mm, aligned")] = grouped
        flops[n] = 3 * 2 * E * M * d * f
    return fns, flops


def step_fns(names: list[str]) -> dict[tuple[str, str], Callable[[], None]]:
    """One bare training step of each model, before (loop) and after (auto); dense has one."""
    setup = StepSetup()
    fns = {}
    for n in names:
        torch.manual_seed(setup.seed)
        model = Transformer(twin_config(n, setup)).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        gen = torch.Generator().manual_seed(setup.seed)
        idx = torch.randint(0, model.cfg.vocab_size, (setup.batch, setup.seq_len), generator=gen)
        tgt = torch.randint(0, model.cfg.vocab_size, (setup.batch, setup.seq_len), generator=gen)

        def step(impl, model=model, params=params, opt=opt, idx=idx, tgt=tgt):
            _set_impl(model, impl)
            model(idx, tgt).total_loss.backward()
            torch.nn.utils.clip_grad_norm_(params, setup.max_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)

        if n == "dense":
            fns[(n, "step")] = lambda f=step: f("auto")
        else:
            fns[(n, "step before")] = lambda f=step: f("loop")
            fns[(n, "step after")] = lambda f=step: f("auto")
    return fns


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="T rows of the FFN slot's parts (the demo: 16 x 128)")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions (one warm-up round more)")
    for what in ("gemm", "parts", "steps"):  # the three sections, each on by default
        ap.add_argument(f"--no-{what}", action="store_true", help=f"skip the {what} section")
    ap.add_argument("--twins", default=DEMO_TWINS, help=f"comma-separated twin names (default {DEMO_TWINS})")
    args = ap.parse_args(argv)
    if args.reps < 1:
        raise ValueError(f"--reps={args.reps} must be >= 1")
    torch.set_num_threads(1)
    names = [n.strip() for n in args.twins.split(",") if n.strip()]
    names = names if "dense" in names else ["dense"] + names
    print(f"# experts' path, torch {torch.__version__}, 1 thread, thread CPU time, min of {args.reps}, "
          f"{datetime.datetime.now().isoformat(timespec='minutes')}, load {os.getloadavg()[0]:.2f}")
    if not args.no_gemm:
        fns, flops = gemm_fns(names, args.tokens)
        t = interleaved_min(fns, args.reps)
        cols = ["loop", "loop, W [E, out, in]", "grouped_mm, aligned"]
        print(f"\nGFLOP/s of one projection's three GEMMs (forward, grad-input, grad-weight), T = {args.tokens}\n")
        print("| model | rows per expert x f | " + " | ".join(cols) + " |\n|---|---|" + "---:|" * len(cols))
        for n in names:
            cfg = twin_config(n, StepSetup())
            E, k, f = (1, 1, cfg.d_ff) if n == "dense" else (cfg.moe.num_experts, cfg.moe.router.top_k,
                                                            cfg.expert_hidden)
            cells = [f"{flops[n] / t[(n, c)] / 1e6:.0f}" if (n, c) in t else "" for c in cols]
            print(f"| {n} | {args.tokens * k // E} x {f} | " + " | ".join(cells) + " |")
    if not args.no_parts:
        t = interleaved_min(part_fns(names, args.tokens), args.reps)
        dense = t[("dense", "dense FFN")]
        cols = ["experts before", "experts after", "rows index_add_", "rows token-major", "layer before",
                "layer after", "layer after, token-major"]
        print(f"\nFFN slot, T = {args.tokens}, ms (forward + backward); dense FFN {dense:.1f} ms; "
              f"experts as x dense FFN in brackets\n")
        print("| twin | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols))
        for n in names[1:]:
            cells = [f"{t[(n, c)]:.1f}" + (f" ({t[(n, c)] / dense:.2f}x)" if c.startswith("experts") else "")
                     for c in cols]
            print(f"| {n} | " + " | ".join(cells) + " |")
        print(f"\nload at the end {os.getloadavg()[0]:.2f}")
    if not args.no_steps:
        t = interleaved_min(step_fns(names), args.reps)
        dense = t[("dense", "step")]
        print(f"\nbare step (fused AdamW), ms; dense {dense:.1f} ms\n\n| twin | before | after | before / dense | "
              f"after / dense | after / before |\n|---|---:|---:|---:|---:|---:|")
        for n in names[1:]:
            b, a = t[(n, "step before")], t[(n, "step after")]
            print(f"| {n} | {b:.1f} | {a:.1f} | {b / dense:.3f}x | {a / dense:.3f}x | {a / b:.3f}x |")
        print(f"\nload at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
