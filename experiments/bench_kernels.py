"""python -m experiments.bench_kernels [--quick] [--shape T:d:f:E:k] [--dtype bf16|fp32] [--json FILE] [--reps N]

Each of Switchyard's Triton kernels (moe/kernels/) timed on its own, side by side with two references that do the
same amount of work with nothing in the way:

- dense:  one `torch.mm` (cuBLAS on GPU) on rows gathered beforehand, of the kernel's FLOPs exactly (same M, N,
          K), so `% of dense` = dense time / kernel time is what the grouping, the gather and the epilogue cost;
- copy:   a plain contiguous tensor copy moving the kernel's minimal bytes (each input read once, each output
          written once; an extra pass, such as the token-major rows between the down GEMM and the segment sum, shows
          up as a lower share), so `% of copy` is the fraction of the bandwidth a copy gets on this device.

Also TFLOP/s and GB/s, and on CUDA the shares of the datasheet peak (experiments.peak_flops) and of the memory
peak (experiments.bench.peak_bandwidth). Rows, each one kernel through its public launcher (moe/kernels/) unless
it says otherwise:

    up forward, inference    launch_up: gather + up (and gate) GEMM + bias/activation/GLU epilogue
    up forward, training     the same also storing the pre-activations for backward (what a training step runs)
    down GEMM                launch_down: h @ w_down, weighted, rows written to their token-major slots
    down + combine           grouped_down_combine's forward: token order + down GEMM + segment sum (3 steps)
    grad-h                   launch_grad_h: grad_y gathered @ w_down^T -> grad h and the combine weight's grad
    grad-h + activation      launch_grad_h_act: the same with the activation backward in its epilogue (straight
      backward               to the pre-activations' gradients; what grouped_expert_mlp's backward runs)
    activation backward      launch_act_backward: the separate elementwise pass (gather_grouped_up's backward)
    grad-x GEMM              launch_grad_x: gu @ wu^T (+ gg @ wg^T), rows to token-major slots
    weight grad up           grouped_wgrad of the up (and gate) weights: x gathered ^T @ grad pre-activations
    weight grad down         grouped_wgrad of the down weight: h^T @ (combine weight * grad_y gathered)
    weight grad up / down,   the same with split-K (WgradBlocks.split_rows = S, the power of two at or below half
      split-K                the mean rows per expert, >= block_k): fp32 partials per chunk + a fixed-order sum.
                             The routing here is uniform, so these rows show what the split costs, not the tail
                             of a skewed load that it removes
    segment sum              segment_sum: token-major rows [N, d] -> [T, d], summed in fp32
    token order              TokenOrder.build (torch, not Triton: a stable sort, a scatter, a searchsorted)
    expert MLP, forward      grouped_expert_mlp (the triton dispatcher's experts) forward + backward in x and
      + backward             every weight; its dense reference is the six torch.mm of the GEMM rows above

Protocol: per repetition the kernel and its references run round-robin (the first rotating), after warm-up
repetitions; on CUDA each timing is CUDA events around `--inner` back-to-back calls (so the launch overhead of
one call hides behind the previous one), reported as the minimum over repetitions. On CPU the kernels run in
Triton's interpreter (TRITON_INTERPRET=1, set here before triton's import when there is no GPU): only `--quick`
is accepted there, and its numbers check the plumbing, they measure nothing. Imports no hydra (it runs on
devices that have none).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

QUICK_SHAPE = "32:16:16:4:2"  # d, f >= 16: tl.dot's minimum
DEFAULT_SHAPE = "16k:1024:2048:8:2"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROWS = ("up forward, inference", "up forward, training", "down GEMM", "down + combine", "grad-h",
        "grad-h + activation backward", "activation backward", "grad-x GEMM", "weight grad up", "weight grad down",
        "weight grad up, split-K", "weight grad down, split-K", "segment sum", "token order", "expert MLP, forward + backward")


@dataclass
class KernelRow:
    kernel: str  # one of ROWS
    ms: float  # the kernel's time (min over repetitions, per call)
    dense_ms: Optional[float]  # torch.mm of the same FLOPs on pre-gathered rows; None for kernels without FLOPs
    copy_ms: float  # a contiguous copy of the same minimal bytes
    flops: float  # multiply-adds x 2 of the GEMM(s)
    bytes: float  # minimal bytes: inputs read once, outputs written once
    tflops: Optional[float]  # flops / ms
    gbs: float  # bytes / ms
    pct_dense: Optional[float]  # 100 * dense_ms / ms
    pct_copy: float  # 100 * copy_ms / ms (the kernel's GB/s as a share of the copy's)
    pct_peak_flops: Optional[float] = None  # share of the datasheet peak (CUDA, a known device)
    pct_peak_bw: Optional[float] = None  # share of the memory peak (CUDA)


@dataclass
class Problem:
    """One routed batch and the tensors every row reads (random values: timing does not depend on them)."""

    T: int  # tokens
    d: int  # model width
    f: int  # expert hidden width
    E: int  # experts
    k: int  # experts per token
    glu: bool  # gated experts (up and gate weights)
    tensors: dict  # name -> Tensor; see make_problem

    @property
    def N(self) -> int:  # plan rows
        return self.T * self.k


def make_problem(T: int, d: int, f: int, E: int, k: int, dtype: torch.dtype, device: torch.device,
                 glu: bool = True, seed: int = 0) -> Problem:
    """Uniform random top-k routing (k distinct experts per token), rows sorted by expert as a RoutingPlan's."""
    if not 1 <= k <= E:
        raise ValueError(f"--shape: k={k} must be between 1 and E={E}")
    g = torch.Generator().manual_seed(seed)
    expert = torch.rand(T, E, generator=g).topk(k, dim=1).indices.reshape(-1)  # [T*k]
    order = torch.argsort(expert, stable=True)
    row_token = (torch.arange(T * k) // k)[order]
    counts = torch.bincount(expert, minlength=E)
    n = T * k

    gd = torch.Generator(device=device).manual_seed(seed + 1)  # operands drawn where they live (GB at full size)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gd, device=device) * scale).to(dt)

    t = dict(
        x=rnd(T, d), row_token=row_token.to(device), offsets=torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(device),
        w_up=rnd(E, d, f, scale=d ** -0.5), w_gate=rnd(E, d, f, scale=d ** -0.5) if glu else None,
        w_down=rnd(E, f, d, scale=f ** -0.5), h=rnd(n, f), row_weight=torch.rand(n, generator=gd, device=device),
        grad_y=rnd(T, d), grad_h=rnd(n, f), grad_u=rnd(n, f), grad_g=rnd(n, f) if glu else None,
        rows_tok=rnd(n, d))  # token-major rows, as the down and grad-x GEMMs write them (in the activation dtype)
    return Problem(T, d, f, E, k, glu, t)


# ---------------------------------------------------------------------------------------------- the rows


@dataclass
class Case:
    kernel: Callable[[], object]  # one call of our kernel(s)
    dense: Optional[Callable[[], object]]  # torch.mm of the same FLOPs
    flops: float  # 2 x multiply-adds of the GEMM(s); 0 for a kernel without a GEMM
    bytes: float  # minimal bytes moved (see cases)


def cases(p: Problem) -> dict[str, Case]:
    """Every row's kernel call and dense reference, with its FLOPs and minimal bytes (each floating-point input
    read once, each output of the row written once, weights included; index vectors left out except in the token
    order, which reads and writes nothing else)."""
    from moe.kernels.combine import TokenOrder, segment_sum
    from moe.kernels.down_combine import grouped_down_combine, launch_down, launch_grad_h, launch_grad_h_act
    from moe.kernels.expert_mlp import grouped_expert_mlp
    from moe.kernels.up_projection import launch_act_backward, launch_grad_x, launch_up
    from moe.kernels import next_pow2
    from moe.kernels.tile_configs import WgradBlocks, default_blocks
    from moe.kernels.weight_grad import grouped_wgrad

    t, N, T, d, f, E = p.tensors, p.N, p.T, p.d, p.f, p.E
    x, row_token, offsets, w_up, w_gate, w_down = (t[n] for n in ("x", "row_token", "offsets", "w_up", "w_gate",
                                                                  "w_down"))
    h, rw, gy, grad_u, grad_g = (t[n] for n in ("h", "row_weight", "grad_y", "grad_u", "grad_g"))
    es = x.element_size()
    halves = 2 if p.glu else 1  # up and gate
    order = TokenOrder.build(row_token, T)
    _, pre_u, pre_g = launch_up(x, row_token, offsets, w_up, w_gate, None, None, "silu", True)
    # dense operands: rows gathered beforehand, one weight matrix of the same inner and outer sizes
    x_rows, gy_rows = x[row_token].contiguous(), gy[row_token].contiguous()
    w_in = torch.cat([w_up[0], w_gate[0]], 1) if p.glu else w_up[0].contiguous()  # [d, halves*f]
    w_in_t, w_out = w_in.t().contiguous(), w_down[0].contiguous()  # [halves*f, d], [f, d]
    grad_pre = torch.cat([grad_u] + ([grad_g] if p.glu else []), 1)  # [N, halves*f]
    up_flops, down_flops = 2.0 * N * d * f * halves, 2.0 * N * f * d
    w_in_bytes, w_out_bytes = E * d * f * halves * es, E * f * d * es

    base = default_blocks(x.dtype)  # split-K rows: the default tiles, chunks of about half an expert's rows
    split = WgradBlocks(**asdict(base), split_rows=max(base.block_k, next_pow2(-(-N // E)) // 2))

    def up(save_pre: bool) -> Callable[[], object]:
        return lambda: launch_up(x, row_token, offsets, w_up, w_gate, None, None, "silu", save_pre)

    dense = {  # torch.mm on pre-gathered rows, one per GEMM row
        "up": lambda: torch.mm(x_rows, w_in), "down": lambda: torch.mm(h, w_out),
        "grad-h": lambda: torch.mm(gy_rows, w_out.t()), "grad-x": lambda: torch.mm(grad_pre, w_in_t),
        "wgrad up": lambda: torch.mm(x_rows.t(), grad_pre), "wgrad down": lambda: torch.mm(h.t(), gy_rows)}
    leaves = [t.detach().requires_grad_(True) for t in (x, w_up, w_down) + ((w_gate,) if p.glu else ())]

    def mlp_step():
        xl, wu, wd = leaves[:3]
        wg = leaves[3] if p.glu else None
        y = grouped_expert_mlp(xl, row_token, offsets, rw, wu, wg, None, None, wd, None, "silu")
        return torch.autograd.grad(y, leaves, gy)

    return {
        "up forward, inference": Case(up(False), dense["up"], up_flops,
                                      (T * d + N * f) * es + w_in_bytes),
        "up forward, training": Case(up(True), dense["up"], up_flops,
                                     (T * d + N * f * (1 + halves)) * es + w_in_bytes),
        "down GEMM": Case(lambda: launch_down(h, w_down, None, offsets, rw, order.slot), dense["down"], down_flops,
                          (N * f + N * d) * es + N * 4 + w_out_bytes),
        "down + combine": Case(lambda: grouped_down_combine(h, w_down, None, offsets, rw, row_token, T),
                               dense["down"], down_flops, (N * f + T * d) * es + N * 4 + w_out_bytes),
        "grad-h": Case(lambda: launch_grad_h(gy, row_token, offsets, w_down, None, h, rw), dense["grad-h"],
                       down_flops, (T * d + 2 * N * f) * es + N * 8 + w_out_bytes),
        "grad-h + activation backward": Case(
            lambda: launch_grad_h_act(gy, row_token, offsets, w_down, None, pre_u, pre_g, rw, "silu"),
            dense["grad-h"], down_flops, (T * d + 2 * N * f * halves) * es + N * 8 + w_out_bytes),
        "activation backward": Case(lambda: launch_act_backward(t["grad_h"], pre_u, pre_g, "silu"), None, 0.0,
                                    N * f * (1 + 2 * halves) * es),
        "grad-x GEMM": Case(lambda: launch_grad_x(grad_u, grad_g, offsets, w_up, w_gate, order.slot),
                            dense["grad-x"], up_flops, (N * f * halves + N * d) * es + w_in_bytes),
        "weight grad up": Case(lambda: grouped_wgrad(x, row_token, grad_u, grad_g, None, None, offsets, E, False),
                               dense["wgrad up"], up_flops,
                               (T * d + N * f * halves) * es + w_in_bytes),
        "weight grad down": Case(lambda: grouped_wgrad(h, None, gy, None, row_token, rw, offsets, E, False),
                                 dense["wgrad down"], down_flops, (N * f + T * d) * es + N * 4 + w_out_bytes),
        "weight grad up, split-K": Case(lambda: grouped_wgrad(x, row_token, grad_u, grad_g, None, None, offsets, E,
                                                              False, split),
                                        dense["wgrad up"], up_flops, (T * d + N * f * halves) * es + w_in_bytes),
        "weight grad down, split-K": Case(lambda: grouped_wgrad(h, None, gy, None, row_token, rw, offsets, E, False,
                                                                split),
                                          dense["wgrad down"], down_flops,
                                          (N * f + T * d) * es + N * 4 + w_out_bytes),
        "segment sum": Case(lambda: segment_sum(t["rows_tok"], order.token_offsets, x.dtype), None, 0.0,
                            (N * d + T * d) * es),
        "token order": Case(lambda: TokenOrder.build(row_token, T), None, 0.0, N * 8 * 2 + (T + 1) * 8),
        # x, grad_y read and y, grad x written; the weights read twice (forward, backward), their gradients written
        "expert MLP, forward + backward": Case(mlp_step, lambda: [fn() for fn in dense.values()],
                                               3 * (up_flops + down_flops),
                                               4 * T * d * es + 3 * (w_in_bytes + w_out_bytes) + N * 4),
    }


# ---------------------------------------------------------------------------------------------- timing


def copy_fn(nbytes: float, device: torch.device) -> Callable[[], object]:
    """A contiguous copy that reads nbytes / 2 and writes nbytes / 2 (fp32 elements)."""
    n = max(1, int(nbytes // 8))
    src, dst = torch.ones(n, device=device), torch.empty(n, device=device)
    return lambda: dst.copy_(src)


def time_round_robin(fns: dict[str, Callable[[], object]], reps: int, warmup: int, inner: int,
                     cuda: bool) -> dict[str, float]:
    """Min over `reps` of the per-call seconds of each fn, interleaved round-robin (the first one rotating)."""
    names = list(fns)
    best = {n: math.inf for n in names}
    for r in range(warmup + reps):
        start = r % len(names)
        for n in names[start:] + names[:start]:
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                for _ in range(inner):
                    fns[n]()
                end.record()
                end.synchronize()
                dt = begin.elapsed_time(end) / 1e3 / inner
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fns[n]()
                dt = (time.perf_counter() - t0) / inner
            if r >= warmup:
                best[n] = min(best[n], dt)
    return best


def run(shape: str = QUICK_SHAPE, dtype: str = "bf16", reps: int = 1, warmup: Optional[int] = None,
        inner: Optional[int] = None, glu: bool = True, quick: bool = False,
        log: Callable[[str], None] = print) -> dict:
    """The table as a dict (header lines, the problem, and one KernelRow per row of ROWS)."""
    from experiments.bench import machine_report, parse_shapes, peak_bandwidth
    from experiments.peak_flops import peak_flops

    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r}: choose one of {sorted(DTYPES)}")
    (s,) = parse_shapes(shape)
    cuda = torch.cuda.is_available()
    from moe.kernels import triton_status

    device = torch.device("cuda" if cuda else "cpu")
    ok, why = triton_status(device)
    if not ok:
        raise RuntimeError(f"bench_kernels: the Triton kernels cannot run here: {why}")
    if not cuda and not quick:
        raise ValueError("bench_kernels: no CUDA device, so the kernels would run in Triton's interpreter: pass "
                         "--quick (tiny shape, one repetition: a check of the plumbing, not a measurement)")
    warmup = (1 if cuda else 0) if warmup is None else warmup
    inner = (10 if cuda else 1) if inner is None else inner
    torch.manual_seed(0)
    p = make_problem(s.T, s.d, s.f, s.E, s.k, DTYPES[dtype], device, glu=glu)
    header = machine_report(torch.get_num_threads()) + [
        f"device: {torch.cuda.get_device_name(device) if cuda else 'cpu, Triton interpreter (plumbing only)'}; "
        f"{why}",
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; {dtype}, T={s.T} d={s.d} f={s.f} "
        f"E={s.E} k={s.k} {'GLU' if glu else 'no GLU'}, {reps} repetition(s) after {warmup} warm-up, {inner} call(s) "
        f"per timing, {'CUDA events' if cuda else 'perf_counter'}, min over repetitions, round-robin"]
    for line in header:
        log(line)
    peak_f = peak_flops(device, DTYPES[dtype] == torch.bfloat16)
    peak_b = peak_bandwidth(device)
    rows = []
    for name, c in cases(p).items():
        fns = {"kernel": c.kernel, "copy": copy_fn(c.bytes, device)}
        if c.dense is not None:
            fns["dense"] = c.dense
        tm = time_round_robin(fns, reps, warmup, inner, cuda)
        ms = tm["kernel"] * 1e3
        dense_ms = tm["dense"] * 1e3 if "dense" in tm else None
        tflops = c.flops / tm["kernel"] / 1e12 if c.flops else None
        gbs = c.bytes / tm["kernel"] / 1e9
        rows.append(KernelRow(
            kernel=name, ms=ms, dense_ms=dense_ms, copy_ms=tm["copy"] * 1e3, flops=c.flops, bytes=c.bytes,
            tflops=tflops, gbs=gbs, pct_dense=100 * dense_ms / ms if dense_ms else None,
            pct_copy=100 * tm["copy"] * 1e3 / ms,
            pct_peak_flops=100 * tflops * 1e12 / peak_f if tflops and peak_f else None,
            pct_peak_bw=100 * gbs * 1e9 / peak_b if peak_b else None))
    result = {"header": header, "shape": asdict(s), "dtype": dtype, "glu": glu, "interpreted": not cuda,
              "peak_tflops": peak_f / 1e12 if peak_f else None, "peak_gbs": peak_b, "rows": [asdict(r) for r in rows]}
    log(to_markdown(result))
    return result


def _fmt(v: Optional[float], spec: str) -> str:
    return "—" if v is None else format(v, spec)


def to_markdown(result: dict) -> str:
    out = ["| kernel | ms | dense ms | copy ms | TFLOP/s | GB/s | % of dense | % of copy | % peak FLOP/s "
           "| % peak bandwidth |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        out.append(f"| {r['kernel']} | {r['ms']:.3f} | {_fmt(r['dense_ms'], '.3f')} | {r['copy_ms']:.3f} | "
                   f"{_fmt(r['tflops'], '.3g')} | {r['gbs']:.3g} | {_fmt(r['pct_dense'], '.0f')} | "
                   f"{r['pct_copy']:.0f} | {_fmt(r['pct_peak_flops'], '.0f')} | {_fmt(r['pct_peak_bw'], '.0f')} |")
    if result["interpreted"]:
        out.append("\n(Triton interpreter on CPU: these numbers check the plumbing only; they measure nothing.)")
    return "\n".join(out) + "\n"


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_kernels", description=__doc__.split("\n\n")[1])
    p.add_argument("--quick", action="store_true", help=f"tiny shape {QUICK_SHAPE}, one repetition (CPU: required)")
    p.add_argument("--shape", default=None, help=f"T:d:f:E:k (T may end in k); default {DEFAULT_SHAPE}")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7; quick 1)")
    p.add_argument("--inner", type=int, default=None, help="calls per timing (default 10 on CUDA, 1 on CPU)")
    p.add_argument("--no-glu", action="store_true", help="ungated experts (one up weight)")
    p.add_argument("--json", default=None, help="also write the table as JSON to this file")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():  # before anything imports triton: it decides at import
        os.environ.setdefault("TRITON_INTERPRET", "1")
    reps = a.reps if a.reps is not None else (1 if a.quick else 7)
    if reps < 1:
        raise SystemExit(f"--reps={reps} must be at least 1")
    result = run(a.shape or (QUICK_SHAPE if a.quick else DEFAULT_SHAPE), a.dtype, reps, inner=a.inner,
                 glu=not a.no_glu, quick=a.quick)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {a.json}")
    return result


if __name__ == "__main__":
    main()
