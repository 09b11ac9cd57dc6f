"""What every step of the GPU check shares: its command line, its numbers file, timing and comparisons.

A step is a module run as `python -m experiments.gpu_check.<step> --json PATH [--dry-run]` in its own process
(experiments.gpu_check.runner gives it a time box). It writes its numbers to PATH as it goes, so a step killed at
its time box still leaves what it had measured; the runner folds PATH into results.json. A step that cannot run
here records `skip(why)` and exits 0; a failed check raises (exit 1) after its numbers are written.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor


class StepRecord:
    """The numbers of one step, rewritten to `path` at every `put` (a time box may end the process any moment)."""

    def __init__(self, path: Optional[str]):
        self.path = Path(path) if path else None
        self.numbers: dict[str, Any] = {}
        self.failures: list[str] = []  # checks that missed; the step exits 1 when any is recorded

    def put(self, key: str, value: Any) -> Any:
        self.numbers[key] = value
        self._write()
        return value

    def skip(self, why: str) -> None:
        """The step cannot run here (no CUDA, a missing package): reported as `skipped: why`, not as a failure."""
        self.numbers["status"] = "skipped"
        self.numbers["why"] = why
        self._write()
        print(f"skipped: {why}", flush=True)

    def check(self, name: str, ok: bool, detail: str) -> bool:
        """One pass/fail check, kept in numbers["checks"] and printed; a miss makes the step fail at `finish`."""
        self.numbers.setdefault("checks", {})[name] = {"ok": bool(ok), "detail": detail}
        self._write()
        print(f"{'ok  ' if ok else 'MISS'} {name}: {detail}", flush=True)
        if not ok:
            self.failures.append(name)
        return ok

    def finish(self) -> None:
        if self.failures:
            raise SystemExit(f"failed checks: {', '.join(self.failures)}")

    def _write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.numbers, indent=1, default=str))
        os.replace(tmp, self.path)  # the runner never reads half a file


def parse_args(description: str, argv: Optional[list[str]] = None,
               extra: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", default=None, help="write this step's numbers here (the runner reads them)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU allowed (the check's plumbing)")
    if extra is not None:
        extra(p)
    return p.parse_args(argv)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], reps: int, warmup: int = 1) -> list[float]:
    """Wall times of `fn` in ms, each to completion of its GPU work (CUDA events on CUDA)."""
    for _ in range(warmup):
        fn()
    out = []
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append(1e3 * (time.perf_counter() - t0))
    return out


def summary_ms(times: list[float]) -> dict[str, float]:
    return {"min_ms": min(times), "median_ms": statistics.median(times)}


def rel_err(got: Tensor, ref: Tensor) -> float:
    """max |got - ref| relative to the reference's largest magnitude (bf16 rounds intermediates at other places
    than an fp32 reference, so element-wise relative error says little; the tensor's scale does)."""
    got, ref = got.detach().float(), ref.detach().float()
    if got.shape != ref.shape:
        raise AssertionError(f"shape {tuple(got.shape)} against the reference's {tuple(ref.shape)}")
    return float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12)) if ref.numel() else 0.0


def all_finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t.detach().float()).all())
