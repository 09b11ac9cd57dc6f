"""python -m experiments.scaling_study run|report: the scaling study (docs/scaling/).

  run [--root runs/scaling] [--jobs 2] [--twins a,b,...] [--steps 250,500,1000] [OVERRIDES...]
      trains the twins of conf/experiment/scaling.yaml (or --twins), `jobs` processes at a time: every twin to the
      first of --steps, then every twin on to the next (run_sweep), each `python -m experiments.train
      experiment=scaling twin=NAME hydra.run.dir=ROOT/NAME trainer.max_steps=N resume=auto OVERRIDES`, logging to
      ROOT/NAME.log; a twin already trained that far is skipped, so a second call continues a sweep.
  report ROOT [--out DIR] [--budgets 250,500,1000] [--bench FILE] [--no-plots]
      reads the sweep (experiments.compare_runs) and writes DIR/tables.md and DIR/study.csv: per budget N and twin
      the validation loss at step N, the FLOP and time multipliers against dense's loss at step N (experiments.compare's
      definitions), the routing statistics of the steps (N/2, N] and the rows each expert receives; the multipliers
      at every evaluation (the growth with steps), and, where no twin reaches 2x, the budget a log-linear trend
      of the best twin's multiplier says it would need; with --bench (experiments.bench_step's table of the same
      twins) the bare-step time ratios and the time multipliers they imply; and the figures (experiments/scaling_plots.py).

Budgets below a run's length are read off the run itself: valid only when the learning rate does not depend on
trainer.max_steps (optim.schedule=constant, as in experiment=scaling; batches depend only on seed, split and step),
so a run with a decaying schedule is read only at its own length and any other budget is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

EXPERIMENT = "scaling"  # conf/experiment/scaling.yaml


def sweep_twins(experiment: str = EXPERIMENT) -> list[str]:
    """The twins listed in conf/experiment/<experiment>.yaml's hydra.sweeper.params.twin, in their order."""
    import yaml

    from experiments.hydra_conf import CONFIG_DIR

    path = Path(CONFIG_DIR) / "experiment" / f"{experiment}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"experiment={experiment!r}: no {path}; name a file of conf/experiment/")
    params = (((yaml.safe_load(path.read_text()) or {}).get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    if "twin" not in params:
        raise ValueError(f"{path} has no hydra.sweeper.params.twin; pass --twins a,b,...")
    return [t.strip() for t in str(params["twin"]).split(",") if t.strip()]


def trained_steps(run_dir: Path) -> int:
    """The step of run_dir's newest checkpoint (what resume=auto continues from); 0 without one."""
    steps = [int(p.name.removeprefix("step_")) for p in (run_dir / "checkpoints").glob("step_*")
             if p.name.removeprefix("step_").isdigit()]
    return max(steps, default=0)


def busy(run_dir: Path) -> bool:
    """Whether a live process is training run_dir (run.json says running and its recorded pid exists)."""
    try:
        info = json.loads((run_dir / "run.json").read_text())
        pid = int((info.get("provenance") or {}).get("pid") or 0)
    except (FileNotFoundError, json.JSONDecodeError, ValueError):
        return False
    if info.get("status") != "running" or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def train_command(twin: str, run_dir: Path, steps: int, experiment: str, overrides: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "experiments.train", f"experiment={experiment}", f"twin={twin}",
            f"hydra.run.dir={run_dir}", f"trainer.max_steps={steps}", "resume=auto", "trainer.progress=false",
            *overrides]


def run_sweep(root: Path, twins: Sequence[str], steps: Sequence[int], jobs: int = 2, experiment: str = EXPERIMENT,
              overrides: Sequence[str] = (), cwd: Optional[Path] = None) -> dict[tuple[str, int], int]:
    """Trains every twin to each of `steps` in turn (every twin to steps[0], then every twin on to steps[1], ...),
    `jobs` processes at a time, each continuing the twin's run from its newest checkpoint (resume=auto). With a
    constant learning rate the continued run equals one uninterrupted run (batches depend only on the step; on CPU
    a resumed run reproduces the losses bit for bit, experiments/trainer.py), so the sweep can be stopped at any
    phase (or SIGTERM: the trainer saves the step it is on) and still holds every twin at the shorter budgets.
    Returns (twin, steps) -> exit status (0 where the run was already that far)."""
    if jobs < 1:
        raise ValueError(f"--jobs={jobs} must be at least 1")
    if list(steps) != sorted(set(steps)) or not steps or steps[0] < 1:
        raise ValueError(f"--steps {','.join(map(str, steps))}: give increasing positive step counts, e.g. 250,500,1000")
    root.mkdir(parents=True, exist_ok=True)
    locks = {t: threading.Lock() for t in twins}  # one twin's phases never overlap

    def one(item: tuple[str, int]) -> int:
        twin, target = item
        with locks[twin]:
            run_dir = (root / twin).resolve()
            if trained_steps(run_dir) >= target:
                return 0
            if busy(run_dir):  # another sweep's process is on it: leave it to that one
                print(f"{twin}: already being trained by another process; skipped", flush=True)
                return 0
            with open(root / f"{twin}.log", "a") as log:
                t0 = time.time()
                rc = subprocess.call(train_command(twin, run_dir, target, experiment, overrides), stdout=log,
                                     stderr=subprocess.STDOUT, cwd=cwd)
            print(f"{twin} to {target} steps: exit {rc} after {time.time() - t0:.0f} s", flush=True)
            return rc

    items = [(t, n) for n in steps for t in twins]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(zip(items, pool.map(one, items)))


def report(args: argparse.Namespace) -> int:
    from experiments.scaling_report import write_report
    from experiments.scaling_tables import build_study

    try:
        budgets = [int(x) for x in args.budgets.split(",") if x.strip()] if args.budgets else None
    except ValueError:
        print(f"scaling_study: --budgets {args.budgets!r} must be step counts, e.g. 250,500,1000", file=sys.stderr)
        return 2
    try:
        study = build_study(args.root, budgets, Path(args.bench) if args.bench else None)
        paths = write_report(study, Path(args.out or args.root), plots=not args.no_plots)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"scaling_study: {e}", file=sys.stderr)
        return 2
    for name, p in paths.items():
        print(f"{name + ':':<26} {p}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.scaling_study", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="train the sweep's twins")
    run.add_argument("--root", default="runs/scaling", help="the sweep directory (one folder per twin)")
    run.add_argument("--jobs", type=int, default=2, help="training processes at a time")
    run.add_argument("--experiment", default=EXPERIMENT, help="conf/experiment/NAME.yaml")
    run.add_argument("--twins", default=None, help="comma-separated twins (default: the experiment's sweep)")
    run.add_argument("--steps", default="250,500,1000", help="the phases: every twin trained to each in turn")
    run.add_argument("overrides", nargs="*", help="more experiments.train overrides, e.g. optim.lr=1e-3")
    rep = sub.add_parser("report", help="write the study's tables and figures")
    rep.add_argument("root", metavar="ROOT", help="the sweep directory (runs/scaling)")
    rep.add_argument("--out", default=None, help="where to write (default: ROOT)")
    rep.add_argument("--budgets", default=None, help="steps to read the runs at, e.g. 250,500,1000 (default: dense's length)")
    rep.add_argument("--bench", default=None, help="a saved `python -m experiments.bench_step --twins ...` output")
    rep.add_argument("--no-plots", action="store_true", help="only tables.md and study.csv")
    args = ap.parse_args(argv)
    if args.cmd == "report":
        return report(args)
    if args.cmd == "run":
        twins = [t for t in args.twins.split(",") if t] if args.twins else sweep_twins(args.experiment)
        steps = [int(x) for x in args.steps.split(",") if x.strip()]
        codes = run_sweep(Path(args.root), twins, steps, args.jobs, args.experiment, args.overrides)
        failed = [f"{t} to {n}" for (t, n), rc in codes.items() if rc]
        if failed:
            print(f"failed: {', '.join(failed)} (see ROOT/NAME.log)", file=sys.stderr)
        return 1 if failed else 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
