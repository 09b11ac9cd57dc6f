"""Where a run's numbers go: metrics.jsonl (the source of truth), the console, and optionally wandb.

Every record is one JSON object per line; console and wandb show the same records, and reports read the file.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from experiments.config import LoggerConfig
from moe.atomic import write_text

METRICS_FILE = "metrics.jsonl"


def flatten_stats(stats: dict[int, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Per-layer routing statistics as flat JSON fields: moe/layer{i}/{name}. Read from the device in one transfer
    (every value of every layer concatenated), at a record's step only."""
    entries = [(f"moe/layer{layer}/{name}", value.detach().float().reshape(-1))
               for layer, values in stats.items() for name, value in values.items()]
    if not entries:
        return {}
    flat = torch.cat([v for _, v in entries]).cpu().tolist()
    out: dict[str, Any] = {}
    i = 0
    for key, v in entries:
        n = v.numel()
        out[key] = flat[i:i + n] if n > 1 else round(flat[i], 6)
        i += n
    return out


def routing_summary(stats: dict[int, dict[str, torch.Tensor]]) -> str:
    """One console line per sparse layer from a step's routing statistics."""
    return "\n".join(
        f"  layer {layer}: max/mean load {float(v['max_load']):.2f}, dropped {float(v['dropped_fraction']):.1%}, "
        f"router entropy {float(v['router_entropy']):.3f}, top-1 prob {float(v['top1_prob']):.3f}, "
        f"dead experts {int(v['dead_experts'])}"
        for layer, v in sorted(stats.items())
    )


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl. A last line cut short (a kill or a full disk during the write) is dropped with
    a warning; a damaged line elsewhere is an error that names the file and the line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                warnings.warn(f"{path}: dropped its last line, cut short mid-record ({e})", stacklevel=2)
                continue
            raise ValueError(f"{path} line {number} is not a JSON record ({e}); the file is damaged") from None
    return records


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Drops records past `last_step`: a resumed run rewrites them, and a curve must not hold a step twice."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = [json.dumps(r) for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
    write_text(path, "".join(line + "\n" for line in kept))


class MetricsLogger:
    def __init__(self, run_dir: str | Path, cfg: LoggerConfig, run_config: dict[str, Any], resume_step: Optional[int]):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)  # a fresh run in a used directory starts a fresh curve
        else:
            truncate_metrics(run_dir, resume_step)
        self._file = self.path.open("a")
        self._wandb = None
        if cfg.kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise ImportError("logger=wandb needs wandb: pip install 'switchyard-moe[wandb]'") from None
            self._wandb = wandb.init(
                project=cfg.project, entity=cfg.entity, group=cfg.group, name=cfg.name or Path(run_dir).name,
                dir=str(run_dir), mode=cfg.mode, config=run_config, resume="allow",
                id=_wandb_id(run_dir),
            )
            _define_wandb_axes(self._wandb)

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(_wandb_row(record), step=record["step"])

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_id(run_dir: str | Path) -> str:
    """A stable wandb run id per run directory, so a resumed run continues the same wandb run."""
    import hashlib

    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]


def _define_wandb_axes(run) -> None:
    """Tokens and training FLOPs as step axes: losses are plotted against FLOPs (the axis of a dense-versus-MoE
    comparison), everything else against tokens; both are selectable as the x axis of any panel."""
    run.define_metric("tokens")
    run.define_metric("flops")
    run.define_metric("*", step_metric="tokens")
    run.define_metric("train_loss", step_metric="flops")
    run.define_metric("val_loss", step_metric="flops", summary="min")


def _wandb_row(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics record for wandb: the scalars as they are, and each sparse layer's tokens_per_expert as a
    wandb.Histogram whose bins are the experts (bin e, from e to e+1, holds expert e's token count)."""
    import numpy as np
    import wandb

    row: dict[str, Any] = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key, value in record.items():
        if key.endswith("/tokens_per_expert") and isinstance(value, list) and value:
            counts = np.asarray(value, dtype=float)
            row[key] = wandb.Histogram(np_histogram=(counts, np.arange(len(counts) + 1, dtype=float)))
    return row


class NullLogger:
    """The metrics logger of ranks other than 0: records are written once, by rank 0."""

    def __init__(self, path):
        self.path = path

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass
