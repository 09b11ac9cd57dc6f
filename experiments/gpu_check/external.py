"""Steps d_kernel_bench and d_tile_sweep: another module's command line, run as one step of the check.

    python -m experiments.gpu_check.external --json PATH [--dry-run] --module MODULE [--table NAME] -- ARGS...

MODULE is run as `python -m MODULE ARGS` with this step's environment; an ARG `{table}` becomes a file for the
module to write JSON into: in the check's output folder when --table names it (so it comes back from the GPU
machine: the tile sweep's tuned-configs table, which a later commit records), else in scratch space. The JSON is
folded into this step's numbers. An absent module is "skipped: <module> is absent", not a failure: the kernel
benchmark (experiments.bench_kernels) and the tile sweep (moe.kernels.autotune) are other engineers' work.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from experiments.gpu_check.budget import OUT_ENV
from experiments.gpu_check.step_io import StepRecord


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--module", required=True, help="the module to run with python -m")
    p.add_argument("--table", default=None, help="file name, in the output folder, for the module's JSON table")
    a = p.parse_args(own)
    rec = StepRecord(a.json)
    rec.put("module", a.module)
    try:
        found = importlib.util.find_spec(a.module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        rec.skip(f"{a.module} is absent")
        return
    if a.table and os.environ.get(OUT_ENV):
        table = Path(os.environ[OUT_ENV]) / a.table
    else:
        table = Path(a.json or "external.json").with_suffix(".table.json")
    cmd = [sys.executable, "-m", a.module] + [str(table) if x == "{table}" else x for x in rest]
    rec.put("command", " ".join(cmd[1:]))
    print(f"$ {' '.join(cmd)}", flush=True)
    done = subprocess.run(cmd)
    rec.put("exit_code", done.returncode)
    if table.exists():
        try:
            rec.put("table_file", str(table))
            rec.put("table", json.loads(table.read_text()))
        except ValueError as e:
            rec.put("table_error", f"{table}: not JSON ({e})")
    if done.returncode:
        raise SystemExit(f"{a.module} exited {done.returncode}")


if __name__ == "__main__":
    main()
