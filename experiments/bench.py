"""python -m experiments.bench [--quick] [--shapes T:d:f:E:k,...] [--reps 7] [--threads 1] [--no-peers] [--out FILE]

One MoE layer (router + dispatch + experts + combine), forward plus backward, measured side by side in one
process against a dense FFN with the same active parameters (dense hidden = k * f). Per shape:

- Switchyard's dispatchers: `einsum` (GShard one-hot reference), `sorted` as it runs by default (its grouped GEMM
  `auto`: torch's grouped_mm where its layout rules hold), `sorted` forced onto the per-expert loop, and
  `triton` (fused kernels; CUDA only: the interpreter is not worth timing); all share one set of weights.
- The peers a user would pick instead: DeepSpeed's `deepspeed.moe.layer.MoE` (CPU accelerator, a 1-process gloo
  group, dropless, no random token selection, no 2nd-expert sampling, its Experts holding a plain FFN of the same
  shape, weights copied from ours), and a Mixtral-style per-expert loop (transformers' MixtralExperts.forward:
  one-hot mask, torch.where per expert, index_add), ported to non-gated experts over our weights.
  MegaBlocks' dMoE only when importable (GPU; reported as not installed otherwise).
- The lower bound: the experts alone on pre-sorted rows (`Experts.forward_sorted`), so that sorted / experts-only
  is the dispatch overhead.
- torch's building blocks of `sorted` (not our Triton kernels: those are timed one by one, against torch.mm
  and a copy, by `python -m experiments.bench_kernels`): the grouped GEMM's GFLOP/s through
  moe.segment_matmul (torch's grouped_mm, or its per-expert loop; x[N,d] @ w_up[E,d,f], forward) against one
  dense GEMM [N,d] @ [d,f] of the same FLOPs, and the bandwidth of torch's permute (x[token_index]) and
  combine (weighted index_add_) against a plain tensor copy of the same bytes (the practical memory ceiling).

Protocol: implementations interleaved round-robin within each repetition (the starting one rotates), a warm-up
repetition, then `--reps` (>= 7) timed ones; ratios are MoE time / dense time as min-over-min and the median of
the per-repetition pairs. One thread by default, fixed seeds, the 1-minute load average checked, and the process
re-executed once with a retaining allocator (experiments/allocator.py; `--allocator`). Every MoE
implementation's output is checked against `einsum` before anything is timed.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from experiments import allocator
from moe.config import ModelConfig, MoEConfig
from moe.ffn import DenseFFN
from moe.layer import MoELayer
from routing.config import RouterConfig

DEFAULT_SHAPES = "4096:512:768:8:1,4096:512:768:8:2,4096:512:768:32:2,8192:512:2048:8:2,8192:512:2048:32:2"
QUICK_SHAPES = "256:64:96:4:1,256:64:96:8:2"
SORTED = "sorted (default: grouped GEMM auto)"
# agreement of the MoE implementations' outputs with einsum, relative to the output's scale
ATOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Shape:
    T: int  # tokens
    d: int  # model width
    f: int  # expert hidden width
    E: int  # experts
    k: int  # experts per token

    @property
    def name(self) -> str:
        return f"T={self.T} d={self.d} f={self.f} E={self.E} top-{self.k}"


def parse_shapes(spec: str) -> list[Shape]:
    shapes = []
    for item in spec.split(","):
        parts = item.strip().lower().split(":")
        if len(parts) != 5:
            raise ValueError(f"--shapes item {item!r} must be T:d:f:E:k, e.g. 8192:512:2048:32:2")
        vals = [int(p[:-1]) * 1024 if p.endswith("k") else int(p) for p in parts]
        shapes.append(Shape(*vals))
    return shapes


@dataclass
class Row:
    shape: str
    impl: str
    min_ms: float
    median_ms: float
    ratio_min: float  # min(impl) / min(dense)
    ratio_median_pairs: float  # median over repetitions of impl / dense
    max_abs_diff: Optional[float] = None  # output vs einsum; None where not comparable


@dataclass
class ShapeResult:
    shape: Shape
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gemm: dict = field(default_factory=dict)
    bandwidth: dict = field(default_factory=dict)
    peak_gbs: Optional[float] = None  # the device's peak memory bandwidth, where known (CUDA)


# ---------------------------------------------------------------------------------------------- machine checks


def machine_report(threads: int) -> list[str]:
    lines = []
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = os.cpu_count() or 1
    lines.append(f"machine: {cpu}, {cores} logical cores; torch {torch.__version__}, {threads} thread(s)")
    try:
        load1 = os.getloadavg()[0]
        msg = f"load average (1 min): {load1:.2f} ({load1 / cores:.2f} per core)"
        if load1 / cores > 0.5:
            msg += "  WARNING: the machine is busy (> 0.5 per core); timings are noisy, ratios less so"
        lines.append(msg)
    except OSError:
        lines.append("load average: unavailable")
    lines.append(f"allocator: {allocator.current()}")
    return lines


# ---------------------------------------------------------------------------------------------- implementations


def build_layer(s: Shape, dispatcher: str = "sorted") -> MoELayer:
    router = RouterConfig(top_k=s.k, order="softmax_topk", renormalize=s.k > 1, capacity_factor=0.0,
                          aux_loss_coef=0.0, z_loss_coef=0.0)
    n_head = 4 if s.d % 4 == 0 else 1
    cfg = ModelConfig(d_model=s.d, d_ff=s.k * s.f, n_head=n_head, activation="gelu", glu=False, ffn_bias=False,
                      moe=MoEConfig(layers="all", num_experts=s.E, expert_hidden=s.f, dispatcher=dispatcher,
                                    router=router))
    return MoELayer(cfg)


def mixtral_loop(layer: MoELayer, x: Tensor, k: int) -> Tensor:
    """transformers' MixtralSparseMoeBlock / MixtralExperts.forward, non-gated experts over our weights:
    softmax, top-k, renormalise; one-hot expert mask; per hit expert torch.where, index the stacked weight,
    two linears, scale by the gate, index_add into the output."""
    E = layer.experts.num_experts
    logits = layer.router.logits(x)
    probs = torch.softmax(logits, dim=-1)
    top_w, top_i = probs.topk(k, dim=-1)
    if k > 1:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    with torch.no_grad():
        mask = torch.nn.functional.one_hot(top_i, num_classes=E).permute(2, 1, 0)  # [E, k, T]
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    w_up, w_down, act = layer.experts.w_up, layer.experts.w_down, layer.experts.act
    for e in hit:
        e = e[0]
        pos, tok = torch.where(mask[e])
        h = act(x[tok] @ w_up[e]) @ w_down[e]
        out.index_add_(0, tok, (h * top_w[tok, pos, None]).to(out.dtype))
    return out


_DIST_STARTED = False
_ENV_SET: list[str] = []  # the launcher variables this module set (removed again by stop_distributed)


def deepspeed_moe(layer: MoELayer, s: Shape) -> tuple[Optional[nn.Module], str]:
    """DeepSpeed's MoE layer with our weights, or (None, why not)."""
    global _DIST_STARTED
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        import torch.distributed as dist
        from deepspeed.moe.layer import MoE
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return None, f"deepspeed not importable ({type(e).__name__}: {e})"
    try:
        if not dist.is_initialized():
            for key, val in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(29500 + os.getpid() % 1000)),
                             ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_SIZE", "1")):
                if key not in os.environ:
                    os.environ[key] = val
                    _ENV_SET.append(key)
            deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
            _DIST_STARTED = True
        expert = nn.Sequential(nn.Linear(s.d, s.f, bias=False), nn.GELU(), nn.Linear(s.f, s.d, bias=False))
        ds = MoE(hidden_size=s.d, expert=expert, num_experts=s.E, ep_size=1, k=s.k, min_capacity=0,
                 drop_tokens=False, use_rts=False, noisy_gate_policy=None, top2_2nd_expert_sampling=False)
        with torch.no_grad():
            ds.deepspeed_moe.gate.wg.weight.copy_(layer.router.gate.weight)
            for e, ex in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
                ex[0].weight.copy_(layer.experts.w_up[e].t())
                ex[2].weight.copy_(layer.experts.w_down[e].t())
        return ds, ""
    except Exception as e:  # noqa: BLE001 - report, don't abort the other measurements
        return None, f"deepspeed MoE failed to build ({type(e).__name__}: {e})"


def stop_distributed() -> None:
    global _DIST_STARTED
    if _DIST_STARTED:
        import torch.distributed as dist

        dist.destroy_process_group()
        _DIST_STARTED = False
    while _ENV_SET:
        os.environ.pop(_ENV_SET.pop(), None)


def megablocks_status() -> str:
    if importlib.util.find_spec("megablocks") is None:
        return "MegaBlocks dMoE: not installed (GPU only; not timed)"
    return "MegaBlocks dMoE: installed but not timed on CPU (its kernels need CUDA)"


# ---------------------------------------------------------------------------------------------- timing


def _zero_grads(params: list[Tensor]) -> None:
    for p in params:
        p.grad = None


def step_fn(forward: Callable[[Tensor], Tensor], params: list[Tensor], x: Tensor, gy: Tensor) -> Callable[[], None]:
    """One forward plus backward with a fixed output gradient (no .sum(): its stride-0 gradient is atypical)."""
    xg = x.detach().clone().requires_grad_(True)
    all_params = params + [xg]

    def run() -> None:
        _zero_grads(all_params)
        y = forward(xg)
        y.backward(gy)

    return run


def interleaved(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    names = list(fns)
    times = {n: [] for n in names}
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    for r in range(warmup + reps):
        start = r % len(names)
        for n in names[start:] + names[:start]:  # round-robin, the first one rotating
            sync()
            t0 = time.perf_counter()
            fns[n]()
            sync()  # CUDA work is asynchronous: time it to completion
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[n].append(dt)
    return times


def bench_shape(s: Shape, reps: int, peers: bool, seed: int = 0, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> ShapeResult:
    res = ShapeResult(s)
    torch.manual_seed(seed)
    layer = build_layer(s).to(device, dtype)  # the router keeps fp32 (Router._apply)
    dense = DenseFFN(s.d, s.k * s.f, "gelu", False, False).to(device, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(s.T, s.d, generator=g).to(device, dtype)
    gy = torch.randn(s.T, s.d, generator=g).to(device, dtype)
    moe_params = list(layer.parameters())

    def dispatcher(name: str, gemm: str = "auto") -> Callable[[Tensor], Tensor]:
        def fwd(h: Tensor) -> Tensor:
            layer.dispatcher, layer.experts.gemm_impl = name, gemm
            return layer(h)[0]
        return fwd

    forwards: dict[str, tuple[Callable[[Tensor], Tensor], list[Tensor]]] = {
        "einsum": (dispatcher("einsum"), moe_params),
        SORTED: (dispatcher("sorted"), moe_params),
        "sorted (per-expert loop)": (dispatcher("sorted", "loop"), moe_params),
    }
    if x.is_cuda:
        forwards["triton"] = (dispatcher("triton"), moe_params)
    if peers:
        forwards["Mixtral-style loop (transformers)"] = (lambda h: mixtral_loop(layer, h, s.k), moe_params)
        ds, why = deepspeed_moe(layer, s) if not x.is_cuda else (None, "timed on CPU only by this bench")
        if ds is not None:
            ds.deepspeed_moe.experts.to(dtype)  # its gate stays fp32, as ours
            forwards["DeepSpeed MoE"] = (lambda h: ds(h[None])[0][0], list(ds.parameters()))
        else:
            res.notes.append(f"DeepSpeed MoE: {why}")
        res.notes.append(megablocks_status())

    # Outputs must agree with einsum before anything is timed.
    with torch.no_grad():
        ref = forwards["einsum"][0](x)
        scale = ref.abs().max().item() or 1.0
        diffs = {}
        for name, (fwd, _) in forwards.items():
            diffs[name] = (fwd(x) - ref).abs().max().item()
            if diffs[name] > ATOL[dtype] * max(1.0, scale):
                raise AssertionError(f"{name} disagrees with einsum at {s.name}: max |diff| {diffs[name]:.3g}")

    # Experts only, on rows already gathered in expert order (the lower bound of any dispatcher).
    with torch.no_grad():
        layer.dispatcher, layer.experts.gemm_impl = "sorted", "auto"
        plan = layer.router(x)
    rows = x[plan.token_index].contiguous()
    gy_rows = torch.randn(rows.shape, generator=g).to(device, dtype)

    fns = {"dense FFN (hidden k*f)": step_fn(dense, list(dense.parameters()), x, gy)}
    for name, (fwd, params) in forwards.items():
        fns[name] = step_fn(fwd, params, x, gy)
    fns["experts only, pre-sorted"] = step_fn(
        lambda r: layer.experts.forward_sorted(r, plan.expert_index, plan.counts), moe_params, rows, gy_rows)

    times = interleaved(fns, reps)
    dense_t = times["dense FFN (hidden k*f)"]
    for name, ts in times.items():
        res.rows.append(Row(
            shape=s.name, impl=name, min_ms=1e3 * min(ts), median_ms=1e3 * statistics.median(ts),
            ratio_min=min(ts) / min(dense_t),
            ratio_median_pairs=statistics.median(a / b for a, b in zip(ts, dense_t)),
            max_abs_diff=diffs.get(name, 0.0 if name == "einsum" else None)))
    sorted_t, experts_t = times[SORTED], times["experts only, pre-sorted"]
    res.notes.append(f"dispatch overhead (sorted / experts only): {min(sorted_t) / min(experts_t):.3f} "
                     f"min-over-min, {statistics.median(a / b for a, b in zip(sorted_t, experts_t)):.3f} median of pairs")
    if "DeepSpeed MoE" in times:
        ds_t = times["DeepSpeed MoE"]
        res.notes.append(f"DeepSpeed MoE / sorted: {min(ds_t) / min(sorted_t):.2f}x min-over-min, "
                         f"{statistics.median(a / b for a, b in zip(ds_t, sorted_t)):.2f}x median of pairs")
    res.gemm = gemm_throughput(rows, layer.experts.w_up.detach(), plan.counts, reps)
    res.bandwidth = permute_bandwidth(x, plan, reps)
    res.peak_gbs = peak_bandwidth(x.device)
    return res


def gemm_throughput(rows: Tensor, w: Tensor, counts: Tensor, reps: int) -> dict:
    """GFLOP/s of torch's grouped GEMMs (moe.segment_matmul) vs one dense GEMM of the same FLOPs."""
    from moe.segment_matmul import grouped_matmul

    N, d = rows.shape
    f = w.shape[2]
    dense_w = w[0].contiguous()
    flops = 2.0 * N * d * f
    with torch.no_grad():
        times = interleaved({
            "grouped_mm": lambda: grouped_matmul(rows, w, counts, "grouped_mm"),
            "loop": lambda: grouped_matmul(rows, w, counts, "loop"),
            "dense GEMM": lambda: rows @ dense_w,
        }, reps)
    return {n: flops / min(ts) / 1e9 for n, ts in times.items()}


def permute_bandwidth(x: Tensor, plan, reps: int) -> dict:
    """GB/s of torch's gather and weighted index_add_ combine (bytes read + written) vs a copy of the rows."""
    ti, w = plan.token_index, plan.weight.to(x.dtype)
    N, d = ti.numel(), x.shape[1]
    rows = x[ti].contiguous()
    b = x.element_size()
    with torch.no_grad():
        times = interleaved({
            "permute (gather)": lambda: x[ti],
            "combine (weighted index_add)": lambda: x.new_zeros(x.shape).index_add_(0, ti, rows * w[:, None]),
            "copy of the rows": lambda: rows.clone(),
        }, reps)
    moved = {
        "permute (gather)": 2 * N * d * b,
        "combine (weighted index_add)": (N * d * 3 + x.numel() * 2) * b,  # rows read, scaled, written; y zeroed and accumulated
        "copy of the rows": 2 * N * d * b,
    }
    return {n: moved[n] / min(ts) / 1e9 for n, ts in times.items()}


def peak_bandwidth(device: torch.device) -> Optional[float]:
    """The device's peak memory bandwidth in GB/s from its memory clock and bus width (double data rate), where
    torch reports them (CUDA); None on CPU, whose peak this bench cannot know."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None


# ---------------------------------------------------------------------------------------------- report


def to_markdown(results: list[ShapeResult], header: list[str]) -> str:
    out = []
    for h in header:
        out.append(f"    {h}")
    for r in results:
        out.append("")
        out.append(f"#### {r.shape.name}")
        out.append("")
        out.append("| implementation | min ms | median ms | ratio min/min | ratio median of pairs | max abs diff vs einsum |")
        out.append("|---|---|---|---|---|---|")
        for row in r.rows:
            diff = "—" if row.max_abs_diff is None else f"{row.max_abs_diff:.1e}"
            out.append(f"| {row.impl} | {row.min_ms:.1f} | {row.median_ms:.1f} | {row.ratio_min:.2f} | "
                       f"{row.ratio_median_pairs:.2f} | {diff} |")
        out.append("")
        g = r.gemm
        best = max(g["grouped_mm"], g["loop"])
        out.append(f"torch's grouped GEMM forward (x[N,d] @ w_up over expert segments; our Triton kernels: "
                   f"experiments.bench_kernels): torch grouped_mm {g['grouped_mm']:.1f} "
                   f"GFLOP/s, per-expert loop {g['loop']:.1f} GFLOP/s, one dense GEMM of the same FLOPs "
                   f"{g['dense GEMM']:.1f} GFLOP/s (the faster grouped one at {best / g['dense GEMM']:.0%} of dense).  ")
        bw = r.bandwidth
        out.append(f"torch's permute (x[token_index]) {bw['permute (gather)']:.1f} GB/s, combine (weighted index_add_) "
                   f"{bw['combine (weighted index_add)']:.1f} GB/s, "
                   f"row copy {bw['copy of the rows']:.1f} GB/s (reference)"
                   + (f"; device peak {r.peak_gbs:.0f} GB/s: permute at {bw['permute (gather)'] / r.peak_gbs:.0%}, "
                      f"combine at {bw['combine (weighted index_add)'] / r.peak_gbs:.0%}" if r.peak_gbs else "") + ".  ")
        for n in r.notes:
            out.append(f"{n}.  ")
    return "\n".join(out) + "\n"


def run(shapes: list[Shape], reps: int = 7, threads: int = 1, peers: bool = True, seed: int = 0,
        log: Callable[[str], None] = print, device: str = "cpu", dtype: str = "fp32") -> tuple[list[ShapeResult], str]:
    if reps < 1:
        raise ValueError(f"--reps={reps} must be at least 1 (the protocol asks for 7 or more)")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    header = machine_report(threads)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device={device}: CUDA is not available here; use --device cpu")
        header.append(f"device: {torch.cuda.get_device_name(device)}")
    header.append(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; {dtype} on {device}, "
                  f"forward + backward; "
                  f"{reps} repetitions after 1 warm-up, round-robin; ratios = time / dense FFN time")
    for h in header:
        log(h)
    results = []
    try:
        for s in shapes:
            r = bench_shape(s, reps, peers, seed, device, DTYPES[dtype])
            results.append(r)
            log(to_markdown([r], []))
    finally:
        stop_distributed()
        torch.set_num_threads(old_threads)
    return results, to_markdown(results, header)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n\n")[1])
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 repetitions: a smoke run of every path")
    p.add_argument("--shapes", default=None, help=f"comma-separated T:d:f:E:k (T may end in k), default {DEFAULT_SHAPES}")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions after the warm-up (default 7; quick 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 for ratios)")
    p.add_argument("--no-peers", action="store_true", help="skip DeepSpeed, the Mixtral-style loop and MegaBlocks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, or cuda[:i] (adds the triton dispatcher)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="fp32 (CPU tables), bf16 (GPU tables)")
    p.add_argument("--out", default=None, help="also write the markdown tables to this file")
    p.add_argument("--allocator", default="auto", choices=allocator.CHOICES,
                   help="re-run once with this allocator preloaded (auto: jemalloc, else tcmalloc, else glibc "
                        "keeping freed pages; system: as the environment has it)")
    a = p.parse_args(argv)
    shapes = parse_shapes(a.shapes or (QUICK_SHAPES if a.quick else DEFAULT_SHAPES))
    reps = a.reps if a.reps is not None else (2 if a.quick else 7)
    _, md = run(shapes, reps, a.threads, not a.no_peers, a.seed, device=a.device, dtype=a.dtype)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(md)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    choice = next((v.split("=", 1)[1] for v in args if v.startswith("--allocator=")), "auto")
    if "--allocator" in args[:-1]:
        choice = args[args.index("--allocator") + 1]
    if choice in allocator.CHOICES and choice != "system":  # anything else: argparse reports it in main()
        allocator.reexec("experiments.bench", args, choice)
    main(args)
