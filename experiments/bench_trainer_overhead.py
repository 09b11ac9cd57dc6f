"""python -m experiments.bench_trainer_overhead [--base c428fef] [--preset tiny_moe] [--rounds 9] [--steps 200]
    [--log-interval 10] [--batch 16] [--seq 128]

What the training loop costs around the model per step, this tree's against a base revision's, interleaved in one
process (the machine is shared: rounds alternate which side goes first; the table gives the median of the rounds
and the per-round ratios):

- Bookkeeping: one step's handling of a real forward's outputs (the preset's losses, aux losses and routing
  statistics from one batch, 16 x 128 tokens by default) with the model's compute taken out. Base: the loss and each aux
  loss read with .item(), the statistics accumulated into zeros_like tensors, and the base revision's collapse
  monitor (routing/stats.py read with `git show`) updated every step, which reads the counts on the host. This
  tree: experiments.trainer._mean_term on device tensors and CollapseMonitor.observe, with one report per
  --log-interval steps.
- routing_stats: the base revision's against this tree's on the preset's router shape (T tokens, E experts, k).

On a CPU a host read costs little, so the bookkeeping ratio is host time only; on a GPU every avoided read is
also a pipeline stall avoided, which this benchmark does not measure.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from experiments.trainer import _mean_term
from moe.model import Transformer
from moe.presets import get_preset
from routing.stats import CollapseMonitor, routing_stats

REPO = Path(__file__).resolve().parents[1]


def base_module(rev: str, path: str, name: str):
    """A module of this repository as it was at `rev` (git show), imported under `name`."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], capture_output=True, text=True, check=True)
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(src.stdout)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, calls: int) -> dict[str, list[float]]:
    """Microseconds per call of each fn, `rounds` times, the order alternating between rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            for _ in range(calls):
                fns[name]()
            times[name].append((time.perf_counter() - t0) / calls * 1e6)
    return times


def bookkeeping(out, base_monitor, tokens: int, log_interval: int) -> dict[str, Callable[[], None]]:
    """One step's handling of `out` (a ModelOutput), the base revision's way and this tree's."""
    step = {"base": 0, "this": 0}
    monitors = {"base": base_monitor, "this": CollapseMonitor()}
    sums = {"base": 0.0, "this": torch.zeros((), dtype=torch.float64)}

    def base() -> None:
        step["base"] += 1
        lm, aux, stats = 0.0, {}, {}
        lm += out.loss.item() / 1
        for name, value in out.aux_losses.items():
            aux[name] = aux.get(name, 0.0) + value.item() / 1
        for layer, values in out.stats.items():
            acc = stats.setdefault(layer, {k: torch.zeros_like(v) for k, v in values.items()})
            for k, v in values.items():
                acc[k] += v if k == "tokens_per_expert" else v / 1
        sums["base"] += lm
        for layer, values in stats.items():
            monitors["base"].update(step["base"], layer, values["tokens_per_expert"], tokens)

    def this() -> None:
        step["this"] += 1
        lm, aux, stats = None, {}, {}
        lm = _mean_term(lm, out.loss.detach().double(), 1)
        for name, value in out.aux_losses.items():
            aux[name] = _mean_term(aux.get(name), value.detach().double(), 1)
        for layer, values in out.stats.items():
            acc = stats.setdefault(layer, {})
            for k, v in values.items():
                acc[k] = _mean_term(acc.get(k), v, 1)
        sums["this"] += lm
        for layer, values in stats.items():
            monitors["this"].observe(step["this"], layer, values["tokens_per_expert"], tokens)
        if step["this"] % log_interval == 0:
            monitors["this"].report()

    return {"base": base, "this": this}


def row(label: str, times: dict[str, list[float]]) -> str:
    base, this = statistics.median(times["base"]), statistics.median(times["this"])
    per_round = ", ".join(f"{b / a:.2f}" for a, b in zip(times["base"], times["this"]))
    return f"| {label} | {base:,.0f} | {this:,.0f} | {this / base:.2f} | {per_round} |"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="c428fef", help="the revision to compare against")
    p.add_argument("--preset", default="tiny_moe")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=200, help="calls per round")
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--batch", type=int, default=16, help="sequences of the one forward whose outputs are handled")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = get_preset(args.preset).replace(vocab_size=257)
    x, y = torch.randint(0, 257, (args.batch, args.seq)), torch.randint(0, 257, (args.batch, args.seq))
    out = Transformer(cfg)(x, y)
    if not out.stats:
        raise ValueError(f"--preset {args.preset} has no sparse layer: its step has no routing statistics")
    base_stats = base_module(args.base, "routing/stats.py", "base_routing_stats")
    print(f"| {args.preset}, base {args.base} | base us | this us | this/base | per round |")
    print("|---|---|---|---|---|")
    print(row(f"bookkeeping per step ({len(out.stats)} sparse layers)",
              interleaved(bookkeeping(out, base_stats.CollapseMonitor(), x.numel(), args.log_interval),
                          args.rounds, args.steps)))
    E, k = cfg.moe.num_experts, cfg.moe.router.top_k
    probs = torch.randn(x.numel(), E).softmax(-1)
    counts, kept = torch.randint(0, 600, (E,)), torch.rand(x.numel(), k) > 0.1
    a, b = base_stats.routing_stats(probs, counts, kept), routing_stats(probs, counts, kept)
    if not all(torch.equal(a[key], b[key]) for key in a):
        raise AssertionError("routing_stats differs from the base revision's")
    print(row(f"routing_stats, T={x.numel()} E={E} k={k} (values equal)",
              interleaved({"base": lambda: base_stats.routing_stats(probs, counts, kept),
                           "this": lambda: routing_stats(probs, counts, kept)}, args.rounds, args.steps)))


if __name__ == "__main__":
    main(sys.argv[1:])
