"""Whether a report's time columns can be trusted: warnings from the runs' provenance (experiments/provenance.py).

Seconds compare only between runs that had the same machine to themselves. From each run.json's provenance:
  concurrent   two runs on one host whose wall-clock intervals [started_at, ended_at] overlap shared its CPUs/GPUs
  machines     runs on different hosts, CPU models or GPUs
  loaded       a run that started with a 1-minute load average above its usable CPUs (other work was running)
  code         runs trained at different commits, or from a tree with uncommitted changes: seconds and losses
               may differ by the code (the kernels, the update), not only by the model
  unknown      runs without a provenance record (written before it existed): none of the above can be checked
Each warning names its rows.
"""
from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from experiments.compare_runs import Run


def _time(s: Any) -> Optional[dt.datetime]:
    try:
        return dt.datetime.fromisoformat(str(s)) if s else None
    except ValueError:
        return None


def machine_of(run: Run) -> Optional[tuple[str, str, str]]:
    """(host, CPU model, GPUs) of a run; None without provenance."""
    p = run.provenance
    if not p:
        return None
    return (str(p.get("host")), str((p.get("cpu") or {}).get("model")), ", ".join(p.get("gpus") or []) or "no GPU")


def concurrent_pairs(runs: list[Run]) -> list[tuple[Run, Run]]:
    """Pairs of runs on one host whose wall-clock intervals overlap (an interval without an end is not checked)."""
    spans = []
    for r in runs:
        start, end = _time(r.provenance.get("started_at")), _time(r.provenance.get("ended_at"))
        if start is not None and end is not None:
            spans.append((r, start, end))
    pairs = []
    for i, (a, sa, ea) in enumerate(spans):
        for b, sb, eb in spans[i + 1:]:
            if machine_of(a) == machine_of(b) and sa < eb and sb < ea:
                pairs.append((a, b))
    return pairs


def timing_warnings(runs: list[Run]) -> list[str]:
    """The warnings above for the report's rows, each naming them; [] when the time columns can be compared."""
    out = []
    pairs = concurrent_pairs(runs)
    if pairs:
        listed = "; ".join(f"{a.name} with {b.name}" for a, b in pairs)
        out.append(f"concurrent runs: {listed} overlapped in wall-clock time on one machine, so their seconds "
                   f"(tokens/s, loss @ base time, time multiplier) include sharing it")
    machines: dict[tuple[str, str, str], list[str]] = {}
    for r in runs:
        m = machine_of(r)
        if m is not None:
            machines.setdefault(m, []).append(r.name)
    if len(machines) > 1:
        listed = "; ".join(f"{', '.join(names)} on {host} ({cpu}; {gpu})" for (host, cpu, gpu), names in machines.items())
        out.append(f"different machines: {listed}; seconds compare only within one machine")
    loaded = []
    for r in runs:
        load, cpus = r.provenance.get("load_at_start"), (r.provenance.get("cpu") or {}).get("usable")
        if load and cpus and load[0] > cpus:
            loaded.append(f"{r.name} (load {load[0]:.1f} on {cpus} CPUs)")
    if loaded:
        out.append(f"busy machine at start: {', '.join(loaded)}; other work shared the CPUs")
    code: dict[str, list[str]] = {}
    for r in runs:
        git = r.provenance.get("git") or {}
        if git.get("commit"):
            code.setdefault(git["commit"][:7] + (" with uncommitted changes" if git.get("dirty") else ""), []).append(r.name)
    if len(code) > 1 or any(key.endswith("changes") for key in code):
        listed = "; ".join(f"{', '.join(names)} at {key}" for key, names in code.items())
        out.append(f"different code: {listed}; their seconds and losses may differ by the code, not only the model")
    unknown = [r.name for r in runs if not r.provenance]
    if unknown:
        out.append(f"no provenance in run.json for {', '.join(unknown)} (written before it was recorded): "
                   f"concurrency and machines cannot be checked for these rows")
    return out
