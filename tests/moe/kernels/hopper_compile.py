"""Compiling Triton kernels for sm_90 without a GPU, on every core of the CI machine.

A compile script (Python source, run with `python -c`) walks a fixed list of builds and calls `claim()` before
each: the first worker to create that build's file (exclusively, in the folder argv[1]) compiles it, the others
pass it over, so several workers share a minute of Triton front end, MLIR passes and ptxas with no plan of who
does what (the builds differ in cost by 50x). The script ends by printing claimed_summary(). run_compile_workers
launches the workers and checks that every build was compiled exactly once. A script that never calls claim()
(and prints "compiled" at its end) runs in one worker, as before.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

# Prepended to a compile script: claim() -> bool and claimed_summary() -> "compiled MINE of ALL".
CLAIM_PRELUDE = '''
import os as _os
import sys as _sys
_builds, _mine = [0], [0]  # builds seen, builds compiled by this worker

def claim():
    """True if this worker compiles the next build (it created the build's file first)."""
    _builds[0] += 1
    try:
        _os.close(_os.open(_os.path.join(_sys.argv[1], str(_builds[0])), _os.O_CREAT | _os.O_EXCL))
    except FileExistsError:
        return False
    _mine[0] += 1
    return True

def claimed_summary():
    return f"compiled {_mine[0]} of {_builds[0]}"
'''

REPO_ROOT = Path(__file__).resolve().parents[3]


def run_compile_workers(script: str, tmp_path: Path, workers: int | None = None,
                        timeout_s: float = 600.0) -> int | None:
    """Runs CLAIM_PRELUDE + script in `workers` processes (default: 2, the CI machine's cores, or fewer where the
    machine has fewer) with the Triton compiler (not the interpreter) and a fresh cache; returns the number of
    builds, each compiled by exactly one worker (None for a script without claims, run by one worker)."""
    if "claim()" not in script:  # every worker would compile everything
        workers = 1
    workers = workers or min(2, os.cpu_count() or 1)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, and never into the home directory
    claims = tmp_path / "claims"
    claims.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM_PRELUDE + script, str(claims)], cwd=REPO_ROOT, env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(workers)]
    deadline = time.monotonic() + timeout_s  # one deadline for all: the workers run side by side
    try:
        done = [(p, *p.communicate(timeout=max(1.0, deadline - time.monotonic()))) for p in procs]
    finally:  # a timeout or an interrupt leaves no compiler behind
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    counts = []
    for p, out, err in done:
        last = out.strip().splitlines()[-1] if out.strip() else ""
        assert p.returncode == 0 and last.startswith("compiled"), err[-3000:]
        if last == "compiled":  # a script without claims
            return None
        counts.append(tuple(int(w) for w in last.split()[1::2]))  # (compiled here, builds in all)
    total = counts[0][1]
    assert total > 0 and all(n == total for _, n in counts), counts  # every worker walked the same list
    assert sum(m for m, _ in counts) == total == len(list(claims.iterdir())), counts  # each compiled exactly once
    return total
