"""eval.json, what experiments.evaluate writes and experiments.compare reads, and the evaluation table. Plain JSON
and no torch, so the report can read it without importing the model code."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

EVAL_FILE = "eval.json"
EVAL_FORMAT = 1  # bump when a record's meaning changes, so readers can refuse what they do not understand


def default_out(records: list[dict[str, Any]]) -> Path:
    runs = {r.get("run_dir") for r in records}
    if len(runs) == 1 and None not in runs:
        return Path(next(iter(runs))) / EVAL_FILE
    return Path(EVAL_FILE)


def read_eval_file(path: str | Path) -> list[dict[str, Any]]:
    """The records of an eval.json; ValueError naming the file when it is not one."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable eval.json ({e}); delete it or run experiments.evaluate again") from None
    if not isinstance(doc, dict) or doc.get("format") != EVAL_FORMAT or not isinstance(doc.get("evaluations"), list):
        raise ValueError(f"{path} is not an eval.json of format {EVAL_FORMAT} (written by experiments.evaluate); "
                         f"delete it or run experiments.evaluate again")
    return doc["evaluations"]


def write_eval_file(path: str | Path, records: list[dict[str, Any]]) -> Path:
    """Writes records into eval.json at `path` (a directory: path/eval.json), replacing the records of the same
    checkpoint on the same text and keeping the others; atomically (a temporary file renamed into place)."""
    path = Path(path)
    if path.is_dir():
        path = path / EVAL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    key = lambda r: (r["checkpoint"], r["data"]["text_fingerprint"])
    new = {key(r) for r in records}
    kept = [r for r in read_eval_file(path) if key(r) not in new] if path.is_file() else []
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"format": EVAL_FORMAT, "evaluations": kept + records}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _fmt(x: Optional[float], fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def table(records: list[dict[str, Any]]) -> str:
    """The markdown table of a set of records, one row per checkpoint."""
    cols = ["checkpoint", "kind", "params (total)", "params (active)", "tokens", "bytes", "nats/token", "bits/byte",
            "perplexity", "dead experts"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(cols) - 2)) + "|"]
    for r in records:
        dead = sum(s["num_dead_experts"] for s in r["routing"].values()) if r["routing"] else None
        experts = sum(s["num_experts"] for s in r["routing"].values()) if r["routing"] else None
        cells = [r["given_as"], r["kind"], f"{r['params_total']:,}", f"{r['params_active']:,}", f"{r['tokens']:,}",
                 _fmt(r["bytes"], ","), f"{r['nats_per_token']:.4f}", _fmt(r["bits_per_byte"], ".4f"),
                 f"{r['perplexity']:.2f}", "—" if dead is None else f"{dead}/{experts}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def routing_lines(record: dict[str, Any]) -> list[str]:
    out = []
    for layer, s in record["routing"].items():
        dead = f"dead {s['num_dead_experts']}/{s['num_experts']}" + (f" {s['dead_experts']}" if s["dead_experts"] else "")
        out.append(f"  {layer}: max_load {s['max_load']:.3f}, {dead}, entropy {s.get('router_entropy', float('nan')):.3f} "
                   f"nats, dropped {s.get('dropped_fraction', 0.0):.2%}")
    return out
