"""python -m experiments.bench_floor [--twins ...] [--reps 5] [--batches 16,64,256] [--optimizers trainer,foreach,fused]
                                  [--floor-only] [--layers] [--clock cpu|wall]

Where the bare training step's time goes (forward, backward, clip, optimizer step, zero_grad) for the demo's dense
base and its FLOP-matched twins, side by side in one process, and each model's physical floor on this CPU: its
FLOPs at the measured GEMM rate plus the bytes its optimizer phase must move at the measured memory bandwidth.

Shape legend: T tokens per step (batch x seq_len), d model width, f expert width, E experts, k choices, P parameters.

The floor (`floor_ms`), a lower bound for one step of a model:

    FLOPs / rate  +  optimizer-phase bytes / update bandwidth(P)

- FLOPs: moe.flops.flops_per_token(cfg).training x T (the twins match dense within 1%, the router included).
- rate: FLOP/s of one fp32 GEMM at the dense FFN's shapes ([T, d] x [d, d_ff], forward and both backward
  products), the best this BLAS does on this machine at these widths (`gemm_rate`).
- optimizer-phase bytes: gradient clipping must read every gradient once for the global norm
  (`CLIP_BYTES_PER_PARAM` = 4 B; torch's clip_grad_norm_ also reads and writes each gradient to scale it, 8 B more,
  which a fused update could take as its grad_scale), and AdamW reads parameter, gradient and both moments and
  writes parameter and moments (`ADAMW_BYTES_PER_PARAM` = 28 B). These phases run after backward and are
  memory-bound, so they add to the GEMM time.
- bandwidth: what torch's fused AdamW kernel (one pass over exactly those 28 B) achieves on one flat parameter
  of the model's size (`update_bandwidth`), standing alone and so as warm in cache as it can be: a plain copy
  runs slower than such an in-place update (the write to a buffer not read first costs a read for ownership)
  and would not bound it, and this machine reports a 300 MiB L3, which holds most of an E = 64 bank's state.
Weight reads in forward and backward and the gradient writes (12 B x P) can overlap with the GEMMs, so they are
reported beside the floor (`weight_ms`), not in it; the router's sort and the two row permutations are small.

The step clips and updates as experiments.bench_step's `--optimizer` does (`--optimizers`, each model timed with each:
`trainer`, the default, is trainer=single's fused AdamW with the clip in its update, so its clip phase is the norm
alone and its optimizer phase includes clearing the gradients; `foreach` and `fused` are torch's clip_grad_norm_,
which rescales every gradient, then AdamW on that kernel: the path before issue 16/21 and its opt-in).

Protocol as experiments.bench_step: models interleaved round-robin per repetition (the starting one rotating),
one warm-up, `--reps` timed; min and median per phase. The clock (`--clock`) is this thread's CPU time by default
(time.thread_time: with one torch thread all the step's work runs on it), so the time another process holds the
core is not counted: on a machine shared with other jobs (load 10 on 2 cores) wall-clock minima of a few steps
scatter by 2x, CPU-time minima much less; they still pay for shared caches and memory bandwidth. `--clock wall`
is experiments.bench_step's perf_counter.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from experiments import allocator
from experiments.bench_step import DEMO_TWINS, OPTIMIZERS, StepSetup, make_update, start, twin_config
from moe.config import ModelConfig
from moe.flops import count_params, flops_per_token
from moe.model import Transformer

PHASES = ("forward", "backward", "clip", "optimizer", "zero_grad")
CLIP_BYTES_PER_PARAM = 4  # the global norm reads every gradient once
ADAMW_BYTES_PER_PARAM = 28  # AdamW: read p, g, m, v; write p, m, v
WEIGHT_BYTES_PER_PARAM = 12  # forward reads w, backward reads w (grad-input) and writes its gradient
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.thread_time, "wall": time.perf_counter}


@dataclass
class Floor:
    """One model's lower bound for a step, and its parts (ms)."""
    params: int  # total parameters P
    flops: int  # training FLOPs per step
    gemm_ms: float  # flops / the measured GEMM rate
    opt_ms: float  # (CLIP_ + ADAMW_BYTES_PER_PARAM) x P at the update's bandwidth
    weight_ms: float  # WEIGHT_BYTES_PER_PARAM x P / bandwidth: may overlap the GEMMs, so not in floor_ms

    @property
    def floor_ms(self) -> float:
        return self.gemm_ms + self.opt_ms


def update_bandwidth(nparams: int, reps: int = 3, clock: Callable[[], float] = time.thread_time) -> float:
    """Bytes per second that torch's fused AdamW moves updating one flat fp32 parameter of nparams elements
    (ADAMW_BYTES_PER_PARAM per element; best of reps after one untimed step that allocates the moments)."""
    if nparams < 1024:
        raise ValueError(f"update_bandwidth needs at least 1024 parameters, got {nparams}")
    p = torch.nn.Parameter(torch.zeros(nparams))
    p.grad = torch.full_like(p, 1e-3)
    opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
    opt.step()
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        opt.step()
        best = min(best, clock() - t0)
    return ADAMW_BYTES_PER_PARAM * nparams / best


def gemm_rate(tokens: int, d: int, width: int, reps: int = 5, clock: Callable[[], float] = time.thread_time) -> float:
    """FLOP/s of the dense FFN's three products at [tokens, d] x [d, width]: forward x @ w, grad-input g @ w.T,
    grad-weight x.T @ g (best of reps, one warm-up)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d, generator=g)
    w = torch.randn(d, width, generator=g)
    gy = torch.randn(tokens, width, generator=g)
    y, gx, gw = torch.empty(tokens, width), torch.empty(tokens, d), torch.empty(d, width)

    def run() -> None:
        torch.mm(x, w, out=y)
        torch.mm(gy, w.t(), out=gx)
        torch.mm(x.t(), gy, out=gw)

    run()
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        run()
        best = min(best, clock() - t0)
    return 3 * 2 * tokens * d * width / best


def floor_of(cfg: ModelConfig, tokens: int, seq_len: int, rate: float,
             bandwidth: Callable[[int], float]) -> Floor:
    """The floor of one step of `cfg` at `tokens` per step; bandwidth(P) -> B/s of an update of P parameters."""
    params = count_params(cfg).total
    flops = flops_per_token(cfg, seq_len).training * tokens
    bw = bandwidth(params)
    return Floor(params=params, flops=flops, gemm_ms=1e3 * flops / rate,
                 opt_ms=1e3 * (CLIP_BYTES_PER_PARAM + ADAMW_BYTES_PER_PARAM) * params / bw,
                 weight_ms=1e3 * WEIGHT_BYTES_PER_PARAM * params / bw)


def floor_ratio(twin: Floor, dense: Floor, dense_ms: float) -> tuple[float, float]:
    """(floor(twin) / floor(dense): both at their floors; (dense_ms + floor(twin) - floor(dense)) / dense_ms: the
    twin doing all dense does at dense's measured speed plus only its own unavoidable extra work). The second is
    the lower, the most lenient bound against a target measured as twin / dense."""
    return twin.floor_ms / dense.floor_ms, (dense_ms + twin.floor_ms - dense.floor_ms) / dense_ms


def make_phased_step(cfg: ModelConfig, setup: StepSetup, optimizer_kind: str = "trainer",
                     clock: Callable[[], float] = time.thread_time) -> tuple[Callable[[], dict[str, float]], Transformer]:
    """A closure running one bare step (as experiments.bench_step.make_step) that returns seconds per phase."""
    torch.manual_seed(setup.seed)
    model = Transformer(cfg)
    model.train()
    optimizer, clip, update = make_update(model, optimizer_kind, setup.max_norm)
    g = torch.Generator().manual_seed(setup.seed)
    x = torch.randint(0, cfg.vocab_size, (setup.batch, setup.seq_len), generator=g)
    y = torch.randint(0, cfg.vocab_size, (setup.batch, setup.seq_len), generator=g)

    def step() -> dict[str, float]:
        t0 = clock()
        loss = model(x, y).total_loss
        t1 = clock()
        loss.backward()
        t2 = clock()
        norm = clip()
        t3 = clock()
        update(norm)
        t4 = clock()
        optimizer.zero_grad(set_to_none=True)
        t5 = clock()
        return dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)))

    return step, model


def interleaved_phases(steps: dict[str, Callable[[], dict[str, float]]], reps: int, warmup: int = 1
                       ) -> dict[str, list[dict[str, float]]]:
    """name -> one {phase: seconds} per timed repetition, models round-robin with a rotating start."""
    names = list(steps)
    out: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(warmup + reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            phases = steps[n]()
            if r >= warmup:
                out[n].append(phases)
    return out


def summarise(runs: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """phase (and "step", their sum) -> (min ms, median ms) over repetitions."""
    table = {p: [1e3 * r[p] for r in runs] for p in PHASES}
    table["step"] = [1e3 * sum(r.values()) for r in runs]
    return {p: (min(v), statistics.median(v)) for p, v in table.items()}


def step_ratios(runs: dict[str, list[dict[str, float]]], ref: str = "dense") -> dict[str, tuple[float, float]]:
    """name -> (min step / min ref step, median of the per-repetition step ratios)."""
    totals = {n: [sum(r.values()) for r in rs] for n, rs in runs.items()}
    return {n: (min(ts) / min(totals[ref]), statistics.median(t / d for t, d in zip(ts, totals[ref])))
            for n, ts in totals.items()}


def _cached(fn: Callable[[int], float]) -> Callable[[int], float]:
    """Bandwidth per power-of-two size bucket (the size rounded down: the faster, so the lower floor), measured
    once per bucket."""
    memo: dict[int, float] = {}

    def at(n: int) -> float:
        key = max(1 << 20, 1 << (n.bit_length() - 1))
        if key not in memo:
            memo[key] = fn(key)
        return memo[key]

    return at


def run_batch(names: list[str], setup: StepSetup, reps: int, optimizers: list[str], rate: float,
              bandwidth: Callable[[int], float], clock: Callable[[], float]) -> None:
    """Prints the phase table, the floors and the ratios of one batch size; every model with every optimizer,
    all interleaved in one loop ("NAME+fused": with the fused one; the first optimizer listed is plain NAME), each
    against dense with the same optimizer."""
    tokens = setup.batch * setup.seq_len
    cfgs = {n: twin_config(n, setup) for n in names}
    key = {o: (lambda n, o=o: n if o == optimizers[0] else f"{n}+{o}") for o in optimizers}
    keys = {key[o](n): (n, o) for o in optimizers for n in names}
    steps = {k: make_phased_step(cfgs[n], setup, o, clock)[0] for k, (n, o) in keys.items()}
    runs = interleaved_phases(steps, reps)
    phases = {k: summarise(rs) for k, rs in runs.items()}
    ratio = {}
    for o in optimizers:
        ref = key[o]("dense")
        mine = {k: rs for k, rs in runs.items() if keys[k][1] == o}
        ratio.update(step_ratios(mine, ref=ref))
    floors = {n: floor_of(cfgs[n], tokens, setup.seq_len, rate, bandwidth) for n in names}
    print(f"\n## T = {tokens} tokens per step ({setup.batch} x {setup.seq_len}), load {os.getloadavg()[0]:.2f}, "
          f"{datetime.datetime.now().isoformat(timespec='minutes')}\n")
    print("| model | params | " + " | ".join(f"{p} ms" for p in PHASES) + " | step ms (min / median) | "
          "vs dense (min; median of pairs) | floor ms (GEMM + opt; weights) | floor ratio (both at floor; "
          "dense as measured) |")
    print("|---|---:|" + "---:|" * (len(PHASES) + 4))
    for k, (n, o) in keys.items():
        f = floors[n]
        ref = key[o]("dense")
        both, lenient = floor_ratio(f, floors["dense"], phases[ref]["step"][0])
        cells = " | ".join(f"{phases[k][p][0]:.1f} / {phases[k][p][1]:.1f}" for p in PHASES)
        print(f"| {k} | {f.params / 1e6:.2f}M | {cells} | {phases[k]['step'][0]:.1f} / {phases[k]['step'][1]:.1f} | "
              f"{ratio[k][0]:.3f}x ({ratio[k][1]:.3f}x) | {f.floor_ms:.1f} ({f.gemm_ms:.1f} + {f.opt_ms:.1f}; "
              f"{f.weight_ms:.1f}) | {both:.3f}x / {lenient:.3f}x |")


def print_floors(names: list[str], setup: StepSetup, rate: float, bandwidth: Callable[[int], float]) -> None:
    """The floor of each model at one batch size, and floor(twin) / floor(dense)."""
    tokens = setup.batch * setup.seq_len
    floors = {n: floor_of(twin_config(n, setup), tokens, setup.seq_len, rate, bandwidth) for n in names}
    print(f"\n| model (T = {tokens}) | params | floor ms | GEMM ms | optimizer ms | weights ms (overlappable) | "
          f"floor / dense floor |\n|---|---:|---:|---:|---:|---:|---:|")
    for n, f in floors.items():
        print(f"| {n} | {f.params / 1e6:.2f}M | {f.floor_ms:.1f} | {f.gemm_ms:.1f} | {f.opt_ms:.1f} | {f.weight_ms:.1f} | "
              f"{f.floor_ms / floors['dense'].floor_ms:.3f}x |")


def layer_parts(names: list[str], tokens: int, clock: Callable[[], float], reps: int = 5) -> dict[str, dict[str, float]]:
    """ms (forward + backward, min of reps) of one FFN slot's parts at `tokens` rows of width d: the dense FFN, and
    for each twin its router (gate, top-k, sort, balancing losses), its experts alone on rows already in expert
    order (the grouped matmuls, activation, combine weight), and its whole MoE layer (router, gather, experts,
    scatter). The models' calls are interleaved as in the step timing."""
    from moe.ffn import DenseFFN
    from moe.layer import MoELayer

    setup = StepSetup()
    base = twin_config("dense", setup)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, base.d_model, generator=gen, requires_grad=True)
    g = torch.randn(tokens, base.d_model, generator=gen)
    fns: dict[tuple[str, str], Callable[[], None]] = {}
    torch.manual_seed(0)
    dense = DenseFFN(base.d_model, base.d_ff, base.activation, base.glu, base.ffn_bias)
    fns[("dense", "dense FFN")] = lambda: (dense(x) * g).sum().backward()
    for n in names:
        if n == "dense":
            continue
        layer = MoELayer(twin_config(n, setup))
        with torch.no_grad():
            plan = layer.router(x)
        rows = x.detach().index_select(0, plan.token_index).requires_grad_(True)
        g_rows = torch.randn(rows.shape, generator=gen)

        def router(layer=layer):
            p = layer.router(x)
            (p.weight.sum() + sum(p.aux_losses.values())).backward()

        def experts(layer=layer, plan=plan, rows=rows, g_rows=g_rows):
            y = layer.experts.forward_sorted(rows, plan.expert_index, plan.counts, row_scale=plan.weight)
            (y * g_rows).sum().backward()

        def whole(layer=layer):
            y, p = layer(x)
            ((y * g).sum() + sum(p.aux_losses.values())).backward()

        fns.update({(n, "router"): router, (n, "experts"): experts, (n, "MoE layer"): whole})
    best: dict[tuple[str, str], float] = {key: float("inf") for key in fns}
    for r in range(reps + 1):
        for key, fn in fns.items():
            t0 = clock()
            fn()
            if r:
                best[key] = min(best[key], clock() - t0)
    out: dict[str, dict[str, float]] = {}
    for (n, part), t in best.items():
        out.setdefault(n, {})[part] = 1e3 * t
    return out


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--twins", default=DEMO_TWINS, help=f"comma-separated twin names (default {DEMO_TWINS})")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per batch size (>= 3)")
    ap.add_argument("--batches", default="16", help="comma-separated sequences per step (demo 16; 64, 256 = 4x, 16x)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--floor-only", action="store_true", help="print the floors (and rates) without timing steps")
    ap.add_argument("--layers", action="store_true", help="also time one FFN slot's parts (layer_parts)")
    ap.add_argument("--clock", default="cpu", choices=tuple(CLOCKS), help="cpu: this thread's CPU time; wall: perf_counter")
    ap.add_argument("--optimizers", default="trainer",
                    help=f"comma-separated AdamW kinds, each model timed with each ({', '.join(OPTIMIZERS)})")
    ap.add_argument("--allocator", default="auto", choices=allocator.CHOICES,
                    help="re-run once with this allocator (experiments.allocator)")
    args = ap.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        raise ValueError("--clock cpu times the calling thread only: use it with --threads 1 (or --clock wall)")
    names = start("experiments.bench_floor", argv, args)
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--batches={args.batches!r}: write comma-separated integers, e.g. 16,64,256") from None
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if not optimizers or set(optimizers) - set(OPTIMIZERS):
        raise ValueError(f"--optimizers={args.optimizers!r}: write a comma-separated subset of {OPTIMIZERS}")
    clock = CLOCKS[args.clock]
    bandwidth = _cached(lambda n: update_bandwidth(n, clock=clock))
    print(f"# bare step by phase, tiny_dense twins, {args.threads} thread(s), torch {torch.__version__}, "
          f"optimizers {'+'.join(optimizers)}, clock {args.clock}, allocator: {allocator.current()}")
    print("fused AdamW update bandwidth, GB/s: " + ", ".join(
        f"{m}M parameters {bandwidth(m << 20) / 1e9:.1f}" for m in (1, 2, 4, 8, 16)))
    for b in batches:
        setup = StepSetup(batch=b)
        base = twin_config("dense", setup)
        rate = gemm_rate(b * setup.seq_len, base.d_model, base.d_ff, clock=clock)
        print(f"\ndense FFN GEMM rate at T = {b * setup.seq_len}: {rate / 1e9:.1f} GFLOP/s")
        if args.layers:
            parts = layer_parts(names, b * setup.seq_len, clock)
            print(f"\n| FFN slot, forward + backward, T = {b * setup.seq_len} (ms, min of 5) | dense FFN | router | "
                  f"experts (rows in order) | whole MoE layer |\n|---|---:|---:|---:|---:|")
            for n, p in parts.items():
                print(f"| {n} | " + " | ".join(f"{p[k]:.2f}" if k in p else "" for k in
                                               ("dense FFN", "router", "experts", "MoE layer")) + " |")
        if args.floor_only:
            print_floors(names, setup, rate, bandwidth)
        else:
            run_batch(names, setup, args.reps, optimizers, rate, bandwidth, clock)


if __name__ == "__main__":
    main()
