"""The carried wheels: what the GPU machine lacks (it reaches no package registry), installed before the steps.

`make gpu-wheels` fills gpu_wheels/ here (git-ignored, carried with the working tree by the device tool's
`carry`). The check installs them with `pip install --no-index --no-deps` into a throwaway folder that only the
steps' PYTHONPATH names, time-boxed, so the machine's own packages are never changed. No wheels, or a failed
install, is not a failure of the check: the steps that need a package report "skipped: <why>" themselves.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Callable


def fits_here(wheel: Path) -> bool:
    """Whether pip would install this wheel on this interpreter (gpu_wheels/ holds cp312 builds for the GPU
    machine; a dry run elsewhere installs the rest). Without `packaging` every wheel is tried."""
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:
        return True
    try:
        tags = parse_wheel_filename(wheel.name)[3]
    except ValueError:
        return False
    return not tags.isdisjoint(set(sys_tags()))


def install_wheels(wheel_dir: Path, target: Path, timeout_s: float, log: Callable[[str], None]) -> dict:
    """pip install every wheel in wheel_dir into target; -> the wheels step's record (status, seconds, wheels)."""
    t0 = time.perf_counter()
    found = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    wheels = [w for w in found if fits_here(w)]
    record: dict = {"name": "wheels", "title": f"install the carried wheels of {wheel_dir}", "budget_s": timeout_s,
                    "numbers": {"wheels": [w.name for w in wheels], "bytes": sum(w.stat().st_size for w in wheels),
                                "not_for_this_interpreter": [w.name for w in found if w not in wheels],
                                "target": str(target)}}
    if not wheels:
        record.update(status="skipped", why=f"no wheels in {wheel_dir} (make gpu-wheels fills it on a machine with "
                      "PyPI); the steps that need hydra or deepspeed report skipped")
    else:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--disable-pip-version-check", "--target", str(target)] + [str(w) for w in wheels]
        log(f"$ {' '.join(cmd[:12])} ... ({len(wheels)} wheels)")
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            for line in (done.stdout + done.stderr).splitlines():
                log(line)
            record.update(status="ok" if done.returncode == 0 else "failed", rc=done.returncode)
            if done.returncode:
                record["why"] = f"pip exited {done.returncode}; the steps run without the wheels"
        except subprocess.TimeoutExpired as e:
            for line in ((e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
                         ).splitlines():
                log(line)
            record.update(status="timeout", why=f"pip ran past {timeout_s:.0f} s; the steps run without the wheels")
    record["seconds"] = round(time.perf_counter() - t0, 2)
    log(f"wheels: {record['status']}" + (f" ({record['why']})" if "why" in record else "")
        + f", {len(wheels)} wheels, {record['numbers']['bytes'] / 1e6:.1f} MB")
    return record
