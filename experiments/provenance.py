"""Where, when and how a run ran: the `provenance` record in run.json.

A time column can be trusted only when one knows what the run shared its machine with. run.json therefore records,
besides what the report needs, the launcher (Hydra's launcher class, torchrun, plain), the host, CPU model and
count, GPUs, the load average at start, the git commit (and whether the tree was dirty), the versions of the
libraries that set the speed, the command-line overrides, and the wall-clock interval of the run. experiments.compare
reads it to warn when time columns come from concurrent runs or from different machines.

The trainer writes run.json at the start ("running") and at the end (finished, failed, interrupted, preempted):
`run_provenance` takes its snapshot of the machine at the start and, at the end, keeps that snapshot (read back
from the run.json it wrote) and adds the end time and the load then. Nothing here may fail a run: every probe that
can fail (git outside a checkout, a missing /proc) records None.
"""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

PROVENANCE_KEY = "provenance"  # the key of the record in run.json
VERSIONED = ("torch", "triton", "deepspeed", "transformers", "numpy", "hydra-core")  # distributions whose versions are kept
REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout whose commit is recorded (None outside git)


def now_utc() -> str:
    """The wall-clock time as ISO 8601 in UTC, to the millisecond: comparable across hosts and time zones."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def load_average() -> Optional[list[float]]:
    """The 1, 5 and 15 minute load averages (runnable processes), None where the OS has none (Windows)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_model() -> Optional[str]:
    """The CPU's marketing name: /proc/cpuinfo's `model name` (x86) or `Model`/`Hardware` (ARM), else platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def usable_cpus() -> Optional[int]:
    """The CPUs this process may run on (a cgroup or taskset can allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def gpus() -> list[str]:
    """The names of the visible CUDA devices; [] without CUDA (torch is asked only when it is already imported)."""
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_available():
            return []
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # a broken driver must not fail the run that only wanted to write its run.json
        return []


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git, or a hung file system
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """{commit, dirty}: the checkout's HEAD and whether tracked files differ from it; both None outside git."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def versions() -> dict[str, Optional[str]]:
    """Installed versions (from the package metadata: nothing is imported), None for a missing package."""
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _hydra() -> Optional[Any]:
    """Hydra's runtime config of this job, None outside a Hydra app (a script, a test, a notebook)."""
    if "hydra" not in sys.modules:
        return None
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def launcher() -> dict[str, Any]:
    """How the process was started: kind (torchrun | hydra-multirun | hydra-run | plain), Hydra's launcher class
    in a multirun, the job's number, the world size and a Slurm job id."""
    hc = _hydra()
    mode = str(hc.mode).rsplit(".", 1)[-1] if hc is not None else None  # RunMode.MULTIRUN -> MULTIRUN
    torchrun = "TORCHELASTIC_RUN_ID" in os.environ  # set by torchrun (torch.distributed.run) for every worker
    kind = "torchrun" if torchrun else {"MULTIRUN": "hydra-multirun", "RUN": "hydra-run"}.get(mode or "", "plain")
    target = hc.launcher.get("_target_") if hc is not None and mode == "MULTIRUN" else None
    job_num = hc.job.get("num") if hc is not None and mode == "MULTIRUN" else None
    return {"kind": kind, "hydra_launcher": target, "job_num": job_num,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def overrides() -> list[str]:
    """The command-line overrides of this job: Hydra's task overrides (a sweep's job gets its own values), else the
    process's arguments."""
    hc = _hydra()
    if hc is not None:
        return [str(o) for o in hc.overrides.task]
    return [str(a) for a in sys.argv[1:]]


def snapshot() -> dict[str, Any]:
    """The record at the start of a run."""
    return {"started_at": now_utc(), "ended_at": None, "launcher": launcher(), "host": socket.gethostname(),
            "cpu": {"model": cpu_model(), "count": os.cpu_count(), "usable": usable_cpus(),
                    "torch_threads": _torch_threads()},
            "gpus": gpus(), "load_at_start": load_average(), "load_at_end": None, "git": git_state(),
            "versions": versions(), "overrides": overrides(), "pid": os.getpid()}


def _torch_threads() -> Optional[int]:
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def run_provenance(run_dir: str | Path, status: str) -> dict[str, Any]:
    """The provenance record for a run.json written with `status`: a fresh snapshot when the run starts
    ("running"); later, the start's record read back from run_dir/run.json, with the end time and load added.
    A rank that never wrote the start record (a failure written by every rank) gets a snapshot without a start."""
    if status == "running":
        return snapshot()
    start = _previous(Path(run_dir))
    record = start if start is not None else {**snapshot(), "started_at": None}
    return {**record, "ended_at": now_utc(), "load_at_end": load_average()}


def _previous(run_dir: Path) -> Optional[dict[str, Any]]:
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    prov = info.get(PROVENANCE_KEY) if isinstance(info, dict) else None
    return prov if isinstance(prov, dict) and prov.get("pid") == os.getpid() else None
