"""Time each tiled Triton kernel's candidate tiles at given shapes and record the fastest in a tuned-configs table.

    python -m moe.kernels.autotune --out FILE [--quick] [--shape T:d:f:E:k ...] [--dtype bf16|fp16|fp32]
                                   [--no-glu] [--kernels NAME,NAME,...] [--activation silu] [--hot F]

  --out FILE     the table to write (JSON in moe.kernels.tile_configs' format). Entries already in FILE for other
                 (device, kernel, dtype, shape bucket) keys are kept; the ones measured now replace theirs.
  --shape        T:d:f:E:k = tokens, model width, expert hidden width, experts, choices per token (a random top-k
                 plan with skewed expert loads); repeatable; default 16384:1024:2048:8:2.
  --quick        GPU: fewer timing repetitions. Without a GPU (the Triton interpreter, set automatically when no
                 CUDA device is present): a plumbing check only, one tiny shape, two candidates per kernel, one run
                 each, written under the device name "interpreter" (a few seconds; the tests run it).
  --dtype        the activation dtype of the kernels (default bf16).
  --no-glu       plain up projection: tunes up / grad_x / wgrad_up instead of up_glu / grad_x_glu / wgrad_up_glu.
  --kernels      a subset of the kernel names (default: all that apply, see tile_configs.KERNELS).
  --activation   the up projection's activation (default silu).
  --hot F        make the last expert take at least a fraction F of the plan rows (0 <= F <= 1/k; default 0), the
                 skewed load split-K is for (e.g. --shape 4099:1000:1400:64:2 --hot 0.3 --kernels
                 wgrad_up_glu,wgrad_down). Table entries are keyed by shape, not by load: a choice tuned at a skewed
                 load applies at every load of its bucket, so write such a table to a file of its own.

Every candidate (tile_configs.candidates: pruned by the device's shared memory; for the weight gradients also
split-K chunk sizes chosen from the shape's expert loads, where the busiest expert would span two chunks or more;
--quick under the interpreter adds the first of those, if any, to its two) is first compared with the
default tiles' result; one that differs beyond rounding, or fails to compile (out of resources), is reported and
never recorded, and a candidate must beat the defaults by 3% to replace them. Timing is triton.testing.do_bench on
the GPU (median ms). One line per kernel and shape goes to
stdout: kernel, bucket (rows, k, n), the winning tiles, its ms, the defaults' ms and the ratio. Exit status 0 once
the table is written, 2 for bad arguments. The table is used by every kernel call without `blocks=` once it is
moe/kernels/tuned_configs.json (commit it) or the file named by $SWITCHYARD_TUNED_CONFIGS.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

DEFAULT_SHAPE = "16384:1024:2048:8:2"
QUICK_INTERPRETER_SHAPE = "16:32:48:4:2"  # the plumbing check: tiny, so that every program runs in numpy quickly
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Shape:
    """One layer's sizes (the issue notation T:d:f:E:k)."""

    tokens: int  # T
    d: int  # model width
    f: int  # expert hidden width
    experts: int  # E
    k: int  # choices per token

    @staticmethod
    def parse(text: str) -> "Shape":
        try:
            values = [int(v) for v in text.split(":")]
            shape = Shape(*values)
        except (TypeError, ValueError):
            raise ValueError(f"--shape {text!r}: expected T:d:f:E:k, five positive integers") from None
        if min(values) < 1 or shape.k > shape.experts:
            raise ValueError(f"--shape {text!r}: sizes must be >= 1 and k <= E")
        return shape


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, glu: bool, seed: int = 0,
                hot: float = 0.0) -> dict:
    """Operands of every kernel at `shape`: a top-k plan with uneven expert loads, random activations; with
    hot > 0 the last expert gets at least round(hot * T * k) rows (one per token: hot <= 1 / k)."""
    from moe.kernels.combine import TokenOrder

    g = torch.Generator().manual_seed(seed)
    T, d, f, E, k = shape.tokens, shape.d, shape.f, shape.experts, shape.k
    if not 0.0 <= hot <= 1.0 / k:
        raise ValueError(f"--hot {hot}: a fraction between 0 and 1/k = {1.0 / k:.3g} (an expert takes at most one "
                         "row per token)")
    logits = torch.randn(T, E, generator=g) + torch.linspace(0, 2, E)  # later experts busier
    if hot > 0:  # (only then: the default plan and operands stay what they were)
        hot_tokens = torch.randperm(T, generator=g)[:round(hot * T * k)]
        logits[hot_tokens, E - 1] += 1e3  # these tokens' first choice: the last expert
    chosen = logits.topk(k, dim=-1).indices.t().reshape(-1)  # choice-major, as the routers order rows
    order = torch.sort(chosen, stable=True).indices
    counts = torch.bincount(chosen, minlength=E)

    def r(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)

    N = T * k
    row_token = (order % T).to(device)
    out = dict(row_token=row_token, offsets=torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(device),
               x=r(T, d), w_up=r(E, d, f, scale=d ** -0.5), w_gate=r(E, d, f, scale=d ** -0.5) if glu else None,
               w_down=r(E, f, d, scale=f ** -0.5), h=r(N, f), grad_y=r(T, d), grad_u=r(N, f),
               grad_g=r(N, f) if glu else None, row_weight=torch.rand(N, generator=g).to(device))
    out["slot"] = TokenOrder.build(row_token, T).slot
    return out


def kernel_runs(inputs: dict, activation: str) -> dict[str, tuple[Callable, tuple[int, int, int]]]:
    """kernel name -> (run(blocks) -> output tensor, its table bucket (rows, k, n) as the launchers look it up)."""
    from moe.kernels.down_combine import launch_down, launch_grad_h, launch_grad_h_act
    from moe.kernels.up_projection import launch_grad_x, launch_up
    from moe.kernels.weight_grad import grouped_wgrad

    p = inputs
    (N, f), (E, d, _) = p["h"].shape, p["w_up"].shape
    glu = p["w_gate"] is not None
    suffix = "_glu" if glu else ""
    return {
        "up" + suffix: (lambda b: launch_up(p["x"], p["row_token"], p["offsets"], p["w_up"], p["w_gate"], None, None,
                                            activation, True, b)[0], (N, d, f)),
        "down": (lambda b: launch_down(p["h"], p["w_down"], None, p["offsets"], p["row_weight"], p["slot"], b),
                 (N, f, d)),
        "grad_h": (lambda b: launch_grad_h(p["grad_y"], p["row_token"], p["offsets"], p["w_down"], None, p["h"],
                                           p["row_weight"], b)[0], (N, d, f)),
        "grad_h_act": (lambda b: launch_grad_h_act(p["grad_y"], p["row_token"], p["offsets"], p["w_down"], None,
                                                   p["grad_u"], p["grad_g"], p["row_weight"], activation, b)[0],
                       (N, d, f)),
        "grad_x" + suffix: (lambda b: launch_grad_x(p["grad_u"], p["grad_g"], p["offsets"], p["w_up"], p["w_gate"],
                                                    p["slot"], b), (N, f, d)),
        "wgrad_up" + suffix: (lambda b: grouped_wgrad(p["x"], p["row_token"], p["grad_u"], p["grad_g"], None, None,
                                                      p["offsets"], E, False, b)[0], (N, d, f)),
        "wgrad_down": (lambda b: grouped_wgrad(p["h"], None, p["grad_y"], None, p["row_token"], p["row_weight"],
                                               p["offsets"], E, False, b)[0], (N, f, d)),
    }


def time_ms(fn: Callable[[], object], quick: bool) -> float:
    """Median ms of fn on the GPU (triton.testing.do_bench: warm-up, L2 flushed between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5 if quick else 25, rep=20 if quick else 100))


def agrees(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    """Same result up to the reordering of fp32 sums (another BLOCK_K) and the one rounding to `dtype`."""
    err = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12)).item()
    return err < (1e-4 if dtype == torch.float32 else 1e-2)


def tune(shape: Shape, dtype: torch.dtype, glu: bool, activation: str, kernels: Optional[list[str]], quick: bool,
         log=print, hot: float = 0.0) -> list[dict]:
    """Entries of the table for one shape: the fastest agreeing candidate of each kernel."""
    from moe.kernels.tile_configs import WGRAD, candidates, split_rows, table_entry

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    inputs = make_inputs(shape, dtype, device, glu, hot=hot)
    runs = kernel_runs(inputs, activation)
    expert_rows = inputs["offsets"].diff().tolist()  # the loads, for the weight gradients' split-K candidates
    unknown = sorted(set(kernels or ()) - set(runs))
    if unknown:
        raise ValueError(f"--kernels: {unknown} do not apply here (glu={glu}); choose among {sorted(runs)}")
    entries = []
    for name, (run, (rows, k, n)) in runs.items():
        if kernels and name not in kernels:
            continue
        tiles = candidates(name, dtype, device, expert_rows if name in WGRAD else None)
        if quick and not on_gpu:  # the plumbing check: defaults, one candidate and (if the loads give one) a split
            tiles = tiles[:2] + [b for b in tiles if split_rows(b)][:1]
        want, timed = None, []
        for b in tiles:  # tiles[0] is the defaults: every other candidate must agree with their result
            start = time.perf_counter()
            try:
                got = run(b)
            except Exception as e:  # noqa: BLE001 - out of resources, or a compiler error: skip, say which
                log(f"  {name}: {b} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                if b == tiles[0]:
                    break  # no reference to compare against
                continue
            first_ms = (time.perf_counter() - start) * 1e3  # the interpreter's time (on a GPU: includes compiling)
            if want is None:
                want = got
            elif not agrees(got, want, dtype):
                log(f"  {name}: {b} disagrees with the default tiles: not recorded")
                continue
            timed.append((time_ms(lambda: run(b), quick) if on_gpu else first_ms, b))
        if not timed:
            log(f"  {name}: no candidate ran; nothing recorded")
            continue
        default_ms = next((t for t, b in timed if b == tiles[0]), float("nan"))
        ms, best = min(timed, key=lambda t: t[0])
        if not ms < 0.97 * default_ms:  # within noise of the defaults (or they failed): keep what is known
            ms, best = (default_ms, tiles[0]) if default_ms == default_ms else (ms, best)
        b = best
        options = "".join([" persistent" * b.persistent, " tma" * b.tma,
                           f" split{split_rows(b)}" if split_rows(b) else ""])
        log(f"{name:13s} rows={rows} k={k} n={n}: {b.block_m}x{b.block_n}x{b.block_k} w{b.num_warps} "
            f"s{b.num_stages} g{b.group_m}{options}  {ms:.4f} ms (defaults {default_ms:.4f} ms, "
            f"x{default_ms / ms:.2f})")
        entries.append(table_entry(name, inputs["h"], rows, k, n, best, ms=round(ms, 5),
                                   default_ms=round(default_ms, 5), tried=len(timed)))
    return entries


def write_table(path: Path, entries: list[dict]) -> None:
    """Merge `entries` into the table at `path` (replacing those with the same key) and write it."""
    from moe.kernels.tile_configs import TABLE_FORMAT, rows_bucket

    def key(e: dict) -> tuple:
        return e["device"], e["kernel"], e["dtype"], rows_bucket(int(e["rows"])), int(e["k"]), int(e["n"])

    kept = []
    if path.is_file():
        doc = json.loads(path.read_text())
        if doc.get("format") != TABLE_FORMAT:
            raise ValueError(f"--out {path}: an existing file that is not a format-{TABLE_FORMAT} table; "
                             "move it away or name another file")
        new = {key(e) for e in entries}
        kept = [e for e in doc.get("entries", []) if key(e) not in new]
    doc = {"format": TABLE_FORMAT, "written_by": "python -m moe.kernels.autotune",
           "entries": sorted(kept + entries, key=lambda e: tuple(str(v) for v in key(e)))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m moe.kernels.autotune", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="the table file to write (JSON)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions; without a GPU a plumbing check only")
    ap.add_argument("--shape", action="append", help=f"T:d:f:E:k, repeatable (default {DEFAULT_SHAPE})")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--no-glu", dest="glu", action="store_false", help="plain up projection (no gate)")
    ap.add_argument("--kernels", help="comma-separated subset of kernel names")
    ap.add_argument("--activation", default="silu", choices=("gelu", "gelu_tanh", "relu", "silu"))
    ap.add_argument("--hot", type=float, default=0.0, help="the last expert's least share of the rows (<= 1/k)")
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        if not args.quick:
            print("moe.kernels.autotune times GPU kernels: run it on a CUDA device, or pass --quick (with no GPU, "
                  "a plumbing check under the Triton interpreter)", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import: kernels on CPU tensors
    from moe.kernels import triton_status

    ok, why = triton_status()
    if not ok:
        print(f"moe.kernels.autotune: the kernels cannot run here: {why}", file=sys.stderr)
        return 2
    try:
        shapes = [Shape.parse(s) for s in (args.shape or [DEFAULT_SHAPE])]
        if args.quick and not on_gpu:
            shapes = [Shape.parse(QUICK_INTERPRETER_SHAPE)]
        kernels = [k.strip() for k in args.kernels.split(",")] if args.kernels else None
        print(f"moe.kernels.autotune: {why}; dtype {args.dtype}, glu {args.glu}, quick {args.quick}, hot {args.hot}")
        entries = []
        for shape in shapes:
            print(f"shape {shape.tokens}:{shape.d}:{shape.f}:{shape.experts}:{shape.k}")
            entries += tune(shape, DTYPES[args.dtype], args.glu, args.activation, kernels, args.quick,
                            hot=args.hot)
        write_table(args.out, entries)
    except ValueError as e:
        print(f"moe.kernels.autotune: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(entries)} entries to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
