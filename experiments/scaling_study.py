"""python -m experiments.scaling_study run|report: the scaling study (docs/scaling/).

  run [--root runs/scaling] [--jobs 2] [--twins a,b,...] [OVERRIDES...]
      trains the twins of conf/experiment/scaling.yaml (or --twins), `jobs` processes at a time, each
      `python -m experiments.train experiment=scaling twin=NAME hydra.run.dir=ROOT/NAME OVERRIDES`, logging to
      ROOT/NAME.log; a twin whose run.json says finished is skipped, so a second call continues a sweep.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
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


def finished(run_dir: Path) -> bool:
    """Whether run_dir holds a run that experiments.train marked finished in its run.json."""
    f = run_dir / "run.json"
    try:
        return json.loads(f.read_text()).get("status") == "finished"
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def train_command(twin: str, run_dir: Path, experiment: str, overrides: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "experiments.train", f"experiment={experiment}", f"twin={twin}",
            f"hydra.run.dir={run_dir}", "trainer.progress=false", *overrides]


def run_sweep(root: Path, twins: Sequence[str], jobs: int = 2, experiment: str = EXPERIMENT,
              overrides: Sequence[str] = (), cwd: Optional[Path] = None) -> dict[str, int]:
    """Trains every twin not yet finished below root, `jobs` at a time in the order given (a worker takes the next
    twin when its run ends). Returns twin -> exit status (0 for the skipped, already finished ones)."""
    if jobs < 1:
        raise ValueError(f"--jobs={jobs} must be at least 1")
    root.mkdir(parents=True, exist_ok=True)

    def one(twin: str) -> int:
        run_dir = root / twin
        if finished(run_dir):
            return 0
        with open(root / f"{twin}.log", "w") as log:
            t0 = time.time()
            rc = subprocess.call(train_command(twin, run_dir.resolve(), experiment, overrides), stdout=log,
                                 stderr=subprocess.STDOUT, cwd=cwd)
            print(f"{twin}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
        return rc

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(zip(twins, pool.map(one, twins)))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.scaling_study", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="train the sweep's twins")
    run.add_argument("--root", default="runs/scaling", help="the sweep directory (one folder per twin)")
    run.add_argument("--jobs", type=int, default=2, help="training processes at a time")
    run.add_argument("--experiment", default=EXPERIMENT, help="conf/experiment/NAME.yaml")
    run.add_argument("--twins", default=None, help="comma-separated twins (default: the experiment's sweep)")
    run.add_argument("overrides", nargs="*", help="more experiments.train overrides, e.g. trainer.max_steps=500")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        twins = [t for t in args.twins.split(",") if t] if args.twins else sweep_twins(args.experiment)
        codes = run_sweep(Path(args.root), twins, args.jobs, args.experiment, args.overrides)
        failed = [t for t, rc in codes.items() if rc]
        if failed:
            print(f"failed: {', '.join(failed)} (see ROOT/NAME.log)", file=sys.stderr)
        return 1 if failed else 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
