"""Runs the budget table: each step in a subprocess with its own time box, its output kept in the log whatever
happens, and results.json rewritten after every step (so a check cut short still leaves its results).

Output folder (default runs/gpu_check/<UTC date and time>; on the GPU machine the device tool's $OUT):
    gpu_check.log   every line the check and its steps printed, each prefixed with the step's name
    results.json    per step: status (ok / failed / timeout / skipped), seconds, time box, numbers, why; the
                    device; and each issue 18 target met / missed / unmeasured (experiments.gpu_check.targets)
Scratch (step numbers while they run, the shared Triton cache, the installed wheels) lives in a temporary folder
outside it: the device tool brings back at most 8 files.
"""
from __future__ import annotations

import collections
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from experiments.gpu_check.budget import OUT_ENV, STEPS, TOTAL_BUDGET_S, WHEELS_BUDGET_S, Step
from experiments.gpu_check.targets import evaluate
from experiments.gpu_check.wheels import install_wheels

REPO_ROOT = Path(__file__).resolve().parents[2]
LOG_FILE = "gpu_check.log"
RESULTS_FILE = "results.json"
SCHEMA = "switchyard.gpu_check/1"
STATUSES = ("ok", "failed", "timeout", "skipped")
MIN_BOX_S = 5  # a step with less time than this left in the total is skipped rather than started
TAIL_LINES = 25  # lines of a failed or timed-out step's output repeated in results.json


class Log:
    """Lines to the log file and to stdout, each stamped with seconds since the check began."""

    def __init__(self, path: Path):
        self.t0 = time.perf_counter()
        self.fh = path.open("a", encoding="utf-8")
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        stamped = f"[{time.perf_counter() - self.t0:6.1f}s] {line}"
        with self.lock:
            self.fh.write(stamped + "\n")
            self.fh.flush()
            print(stamped, flush=True)

    def close(self) -> None:
        self.fh.close()


def run_step(step: Step, cmd: list[str], env: dict, timeout_s: float, log: Callable[[str], None],
             json_path: Path) -> dict:
    """One step in its own process group, its output streamed into the log; killed (the whole group) at the box."""
    log(f"=== {step.name}: {step.title} (time box {timeout_s:.0f} s)")
    log(f"$ {' '.join(cmd)}")
    tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)

    def pump() -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log(f"[{step.name}] {line}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        rc = proc.returncode
    reader.join(timeout=10)
    seconds = time.perf_counter() - t0
    numbers = _read_json(json_path)
    record = {"name": step.name, "title": step.title, "budget_s": round(timeout_s), "seconds": round(seconds, 2),
              "rc": rc, "numbers": numbers}
    if timed_out:
        record.update(status="timeout", why=f"ran past its {timeout_s:.0f} s time box (killed); numbers so far kept")
    elif rc == 0 and numbers.get("status") == "skipped":
        record.update(status="skipped", why=numbers.get("why", "the step skipped itself"))
    elif rc == 0:
        record["status"] = "ok"
    else:
        last = next((ln for ln in reversed(tail) if ln.strip()), "")
        record.update(status="failed", why=f"exit code {rc}: {last[-300:]}")
    if record["status"] in ("failed", "timeout"):
        record["output_tail"] = list(tail)
    log(f"=== {step.name}: {record['status']} in {seconds:.1f} s" + (f" ({record['why']})" if "why" in record else ""))
    return record


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def skipped(step: Step, why: str, budget_s: float) -> dict:
    return {"name": step.name, "title": step.title, "budget_s": round(budget_s), "seconds": 0.0, "status": "skipped",
            "why": why, "numbers": {}}


def default_out() -> Path:
    return REPO_ROOT / "runs" / "gpu_check" / datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d_%H%M%S")


def run_check(out: Optional[Path], dry_run: bool, wheel_dir: Path, only: Optional[set[str]] = None,
              python: str = sys.executable, steps: Sequence[Step] = STEPS, total_budget_s: float = TOTAL_BUDGET_S,
              wheels_budget_s: float = WHEELS_BUDGET_S) -> int:
    """The whole check; -> exit code: 0 every step ok or skipped, 1 a step failed or timed out, 2 no CUDA outside
    a dry run (this is the GPU check: DRY_RUN=1 runs its plumbing on CPU). `steps` and the budgets are the
    budget table's unless a test passes its own."""
    out = Path(out) if out else default_out()
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / LOG_FILE)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    started = datetime.datetime.now(datetime.timezone.utc)
    results = {"schema": SCHEMA, "started_utc": started.isoformat(timespec="seconds"), "dry_run": dry_run,
               "command": sys.argv, "out": str(out), "budget_seconds": total_budget_s, "device": {}, "steps": []}

    def save() -> None:
        results["total_seconds"] = round(time.perf_counter() - log.t0, 2)
        results["targets"] = evaluate({s["name"]: s for s in results["steps"]})
        results["summary"] = {k: sum(s["status"] == k for s in results["steps"]) for k in STATUSES}
        tmp = out / (RESULTS_FILE + ".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str))
        os.replace(tmp, out / RESULTS_FILE)

    try:
        log(f"GPU check ({'dry run' if dry_run else 'full'}), output in {out}, scratch in {work}")
        wheels = install_wheels(Path(wheel_dir), work / "site", wheels_budget_s, log)
        results["steps"].append(wheels)
        save()
        env = _step_env(work, site_ok=wheels["status"] == "ok", out=out)
        cuda = None  # known after the device step
        for step in steps:
            left = total_budget_s - (time.perf_counter() - log.t0)
            box = step.dry_budget_s if dry_run else min(step.budget_s, left)
            if only and step.name not in only and step.name != "device":
                record = skipped(step, f"not selected (--only {','.join(sorted(only))})", box)
            elif cuda is False and not dry_run:
                record = skipped(step, "no CUDA device: this is the GPU check (make gpu-check DRY_RUN=1 runs its "
                                 "plumbing on CPU)", box)
            elif cuda is False and step.dry == "skip":
                record = skipped(step, "no CUDA (dry run: only CUDA makes sense of this step)", box)
            elif not dry_run and box < MIN_BOX_S:
                record = skipped(step, f"no time left in the {total_budget_s:.0f} s budget", box)
            else:
                json_path = work / f"{step.name}.json"
                cmd = [python, "-m", step.module, "--json", str(json_path)]
                cmd += (["--dry-run"] + list(step.dry_args)) if dry_run else list(step.args)
                step_env = dict(env)
                if not step.interpreter:
                    step_env.pop("TRITON_INTERPRET", None)
                record = run_step(step, cmd, step_env, box, log, json_path)
            results["steps"].append(record)
            table = record.get("numbers", {}).get("table_file")
            if step.exports and record["status"] == "ok" and table:
                env[step.exports] = table  # e.g. the tuned tiles, for the benchmarks and the training that follow
                log(f"{step.exports}={table} for the steps that follow")
            if step.name == "device":
                results["device"] = record.get("numbers", {})
                cuda = bool(results["device"].get("cuda", False))
                if cuda is False and dry_run:
                    env["TRITON_INTERPRET"] = "1"  # the kernels run in Triton's interpreter on CPU tensors
            save()
        _print_summary(results, log)
        bad = any(s["status"] in ("failed", "timeout") for s in results["steps"] if s["name"] != "wheels")
        return 2 if cuda is False and not dry_run else int(bad)
    finally:
        results["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        save()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def _step_env(work: Path, site_ok: bool, out: Path) -> dict:
    env = dict(os.environ)
    env[OUT_ENV] = str(out)  # where a step writes a file that must come back (experiments.gpu_check.external)
    paths = ([str(work / "site")] if site_ok else []) + [str(REPO_ROOT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"  # a step killed at its box has printed what it had
    env["TRITON_CACHE_DIR"] = str(work / "triton-cache")  # shared by the steps: later ones reuse compiled kernels
    env.setdefault("TRITON_PRINT_AUTOTUNING", "1")  # autotuned choices appear in the log
    env.pop("TRITON_INTERPRET", None)  # set again for a dry run on CPU once the device step found no CUDA
    return env


def _print_summary(results: dict, log: Callable[[str], None]) -> None:
    log("=== summary")
    for s in results["steps"]:
        log(f"{s['name']:16s} {s['status']:8s} {s['seconds']:7.1f} s of {s['budget_s']:4d} s"
            + (f"  {s['why']}" if s.get("why") else ""))
    for t in results["targets"]:
        value = "—" if t.get("value") is None else f"{t['value']:.3g}"
        log(f"target {t['name']:28s} {t['status']:10s} {value:>8s} ({t['target']})")
