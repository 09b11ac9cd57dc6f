"""The run's log lines: what a person reads while a run trains, on rank 0's console and in RUN_DIR/train.log.

Every metrics record becomes one plain line (step, loss, validation loss when evaluated, lr, tokens/s, gradient
norm, the busiest expert's load, achieved model FLOP/s and MFU, elapsed and ETA), written through its own
logging.Logger to two handlers: the console (stdout, flushed per line, so a Slurm or nohup log fills as the run
goes) and RUN_DIR/train.log (appended). The logger is not registered with logging's manager and does not
propagate, so Hydra's root handlers (which also open train.log) never write a line a second time, two Trainers in
one process keep apart, and a Trainer built without Hydra still writes train.log. A tqdm bar is drawn only when
stdout is a terminal, trainer.progress is true and the run is not a job of a Hydra sweep: redirected output and
joblib sweeps get plain lines only.

metrics.jsonl stays the source of truth; these lines are formatted from the same records.
"""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any, Optional

LOG_FILE = "train.log"


class _Console(logging.Handler):
    """Writes to whatever sys.stdout is at the time (pytest's capture, a redirect), through tqdm while a bar is
    drawn so that the line lands above the bar instead of through it."""

    def __init__(self, run_log: "RunLog"):
        super().__init__()
        self._run_log = run_log

    def emit(self, record: logging.LogRecord) -> None:
        msg = self.format(record)
        bar = self._run_log.bar
        if bar is not None:
            bar.write(msg, file=sys.stdout)
        else:
            sys.stdout.write(msg + "\n")
            sys.stdout.flush()


class RunLog:
    """Rank 0's lines: `info` to the console and train.log, `file_only` to train.log alone (what is already on
    the console another way: a Python warning, the application's closing lines). On other ranks (enabled=False)
    both do nothing."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.bar = None
        self.enabled = enabled
        self.path = Path(run_dir) / LOG_FILE
        # logging.Logger(...) directly, not logging.getLogger: private loggers without a parent, so nothing
        # global is configured and records reach only the handlers below
        self._console = logging.Logger("switchyard.run")
        self._file = logging.Logger("switchyard.run.file")
        self._handlers: list[logging.Handler] = []

    def _open(self) -> bool:
        """The two handlers, opened on the first line (and again after close: train.log is appended to)."""
        if not self.enabled:
            return False
        if not self._handlers:
            console = _Console(self)
            to_file = logging.FileHandler(self.path, mode="a", encoding="utf-8")
            for handler in (console, to_file):
                handler.setFormatter(logging.Formatter("%(message)s"))
                self._handlers.append(handler)
            self._console.addHandler(console)
            self._console.addHandler(to_file)
            self._file.addHandler(to_file)
        return True

    def info(self, message: str) -> None:
        if self._open():
            self._console.info(message)

    def file_only(self, message: str) -> None:
        if self._open():
            self._file.info(message)

    def start_bar(self, enabled: bool, total: int, initial: int) -> None:
        """A tqdm bar on stdout when enabled (trainer.progress, rank 0), stdout is a terminal and the run is not
        one job of a Hydra sweep (joblib's workers share the parent's terminal: their bars would interleave)."""
        if enabled and self.enabled and sys.stdout.isatty() and not in_sweep():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False, file=sys.stdout)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        for handler in self._handlers:
            handler.close()
            self._console.removeHandler(handler)
            self._file.removeHandler(handler)
        self._handlers.clear()


def in_sweep() -> bool:
    """Whether this process runs a job of a Hydra multirun (-m), whatever the launcher."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_line(record: dict[str, Any], max_steps: int, wall_s: float, eta_s: Optional[float]) -> str:
    """One metrics record as a console line. wall_s: seconds since the run (this process) started, evaluation
    included; eta_s: the estimated seconds to max_steps, None when unknown."""
    parts = [f"step {record['step']}/{max_steps}"]
    if "train_loss" in record:
        parts.append(f"loss {_num(record['train_loss'], '.4f')}")
    if record.get("val_loss") is not None:
        parts.append(f"val loss {_num(record['val_loss'], '.4f')}")
    if "lr" in record:
        parts.append(f"lr {record['lr']:.2e}")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if "grad_norm" in record:
        parts.append(f"grad norm {_num(record['grad_norm'], '.3f')}")
    load = max_expert_load(record)
    if load is not None:
        parts.append(f"max load {load:.2f}")
    if record.get("flops_per_s") is not None:
        parts.append(f"{si(record['flops_per_s'])}FLOP/s")
    if record.get("mfu") is not None:
        parts.append(f"MFU {record['mfu']:.1%}")
    if record.get("skipped_steps"):
        parts.append(f"skipped {record['skipped_steps']}")
    timing = f"elapsed {clock(wall_s)}"
    if eta_s is not None:
        timing += f", eta {clock(eta_s)}"
    parts.append(timing)
    return " | ".join(parts)


def max_expert_load(record: dict[str, Any]) -> Optional[float]:
    """The busiest expert's load (1.0 = even) over the sparse layers of a record; None for a dense model."""
    loads = [v for k, v in record.items() if k.startswith("moe/layer") and k.endswith("/max_load") and v is not None]
    return max(loads) if loads else None


def _num(value: Optional[float], fmt: str) -> str:
    """A loss or norm; a non-finite one (a skipped step; None in the JSON record) reads nan/inf, not a crash."""
    if value is None or not math.isfinite(value):
        return str(value if value is not None else math.nan)
    return format(value, fmt)


def si(value: float) -> str:
    """A rate with an SI prefix and three significant digits: 1.23e10 -> '12.3 G'."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}"
    return f"{value:.3g} "


def clock(seconds: float) -> str:
    """h:mm:ss."""
    s = max(int(round(seconds)), 0)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
