"""python -m experiments.gpu_check [--dry-run] [--out DIR] [--wheels DIR] [--only STEP,...]   (make gpu-check)"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from experiments.gpu_check.budget import step_names
from experiments.gpu_check.runner import run_check


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.gpu_check",
                                description="The prepared GPU check of issue 18 (docs/gpu_check.md).")
    p.add_argument("--dry-run", action="store_true",
                   help="the same plumbing with tiny shapes; on CPU the kernels run under TRITON_INTERPRET=1")
    p.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT"),
                   help="output folder for gpu_check.log and results.json (default runs/gpu_check/<date>)")
    p.add_argument("--wheels", default="gpu_wheels", help="folder of carried wheels to install first (make gpu-wheels)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated steps to run (the device step always runs): {','.join(step_names())}")
    a = p.parse_args(argv)
    only = None
    if a.only:
        only = {s.strip() for s in a.only.split(",") if s.strip()}
        unknown = only - set(step_names())
        if unknown:
            p.error(f"--only names unknown steps {sorted(unknown)}; choose from {', '.join(step_names())}")
    return run_check(Path(a.out) if a.out else None, a.dry_run, Path(a.wheels), only)


if __name__ == "__main__":
    sys.exit(main())
