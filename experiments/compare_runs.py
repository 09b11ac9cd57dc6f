"""The runs of a sweep as experiments.compare reads them: run.json, metrics.jsonl, the overrides each run was started
with, which of them vary across the sweep, and the names the report gives the runs.

A run's overrides come from its run.json (`provenance.overrides`, experiments/provenance.py) or, for runs written
before that existed, from Hydra's `.hydra/overrides.yaml` beside it. A key varies when two runs give it different
values (a run that does not set it has the default, shown as "(default)"). Keys that do not say what a run *is*
are left out: Hydra's own (hydra.*), paths (a value with a slash, or a *path/*_dir key), and how a run resumes,
shows progress or logs. Rows are named by the varied keys (`routing=switch`, `routing=switch,trainer.max_steps=6`);
a sweep of twins alone keeps the twin names (`dense`, `moe_e8_k2`); with nothing that varies (or two runs with
the same name) the run's directory below the sweep names it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

METRICS_FILE = "metrics.jsonl"  # the names experiments.trainer and experiments.metrics write
RUN_FILE = "run.json"
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"  # where Hydra saves a job's overrides
SKIP_DIRS = {"checkpoints", "wandb", ".hydra", ".submitit"}
DEFAULT = "(default)"  # the value of a varied key in a run that does not set it
# keys that do not name a run: conf/train.yaml's hydra.job.config.override_dirname.exclude_keys
NOT_NAMING = {"experiment", "resume", "init_from", "data.path", "data.val_path", "data.cache_dir", "trainer.progress",
              "logger", "logger.mode", "logger.project", "logger.entity", "logger.group", "logger.name"}
CURVE_KEYS = ("step", "tokens", "flops", "elapsed_s", "val_loss")


@dataclass
class Run:
    name: str  # the report's name (name_runs): the varied overrides, the twin name of a twin sweep, else the folder
    path: Path  # the run directory (as found below the sweep: a symlink stays a symlink)
    rel: str  # the directory relative to the sweep directory ('.' for the sweep directory itself)
    info: dict[str, Any]  # run.json ({} when missing)
    records: list[dict[str, Any]]  # metrics.jsonl
    problem: Optional[str] = None  # why the run is left out of the table (None: it is in)
    curve: list[dict[str, float]] = field(default_factory=list)  # evaluations after step 0: step, tokens, flops, elapsed_s, val_loss
    start: Optional[dict[str, float]] = None  # the step-0 evaluation (the initial or init_from model), None without one
    overrides: Optional[dict[str, str]] = None  # key -> value as started (None: not recorded)
    varied: dict[str, str] = field(default_factory=dict)  # the sweep's varied keys -> this run's value
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # eval.json records of this run's checkpoints
    evaluation: Optional[dict[str, Any]] = None  # the one in the table (see compare.pick_evaluations)

    @property
    def folder(self) -> str:
        """The name its directory gives it: the path below the sweep, or the directory's own name for the sweep's."""
        return self.path.resolve().name if self.rel == "." else self.rel

    @property
    def status(self) -> str:
        return str(self.info.get("status", "unknown"))

    @property
    def is_moe(self) -> bool:
        return bool(self.info.get("sparse_layers"))

    @property
    def config(self) -> dict[str, Any]:
        return self.info.get("config") or {}

    @property
    def model(self) -> dict[str, Any]:
        return self.config.get("model") or {}

    @property
    def max_steps(self) -> Optional[int]:
        return (self.config.get("trainer") or {}).get("max_steps")

    @property
    def provenance(self) -> dict[str, Any]:
        return self.info.get("provenance") or {}


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], Optional[str]]:
    records, bad = [], None
    if not path.is_file():
        return records, None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                bad = f"{path.name} line {n} is not JSON (a write cut short?)"
    return records, bad


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """key -> value of Hydra override strings: `+`/`++` dropped from the key, `~key` read as a deletion; arguments
    that are not overrides (`-m`, `--multirun`) skipped."""
    out: dict[str, str] = {}
    for line in lines:
        line = str(line).strip()
        if line.startswith("~"):
            out[line[1:].split("=", 1)[0]] = "(deleted)"
            continue
        key, eq, value = line.lstrip("+").partition("=")
        if eq and key and not key.startswith("-"):
            out[key] = value
    return out


def read_overrides(path: Path, info: dict[str, Any]) -> Optional[dict[str, str]]:
    """The overrides a run was started with: run.json's provenance, else Hydra's .hydra/overrides.yaml; None when
    neither is there (or the YAML cannot be read)."""
    recorded = (info.get("provenance") or {}).get("overrides")
    if isinstance(recorded, list):
        return parse_overrides(recorded)
    f = path / HYDRA_OVERRIDES
    if not f.is_file():
        return None
    import yaml  # PyYAML comes with Hydra; safe_load builds plain lists and strings only

    try:
        lines = yaml.safe_load(f.read_text())
    except yaml.YAMLError:
        return None
    return parse_overrides(lines) if isinstance(lines, list) else None


def names_a_run(key: str, value: str) -> bool:
    """Whether an override says what a run is (not Hydra's, not a path, not how it resumes or logs)."""
    last = key.rsplit(".", 1)[-1]
    return not (key.startswith("hydra.") or key in NOT_NAMING or "/" in value or os.sep in value
                or last in ("path", "dir") or last.endswith(("_path", "_dir")))


def varied_keys(runs: list[Run]) -> list[str]:
    """The keys whose values differ among the runs that recorded their overrides, in the order they were given."""
    known = [r.overrides for r in runs if r.overrides is not None]
    keys: list[str] = []
    for o in known:
        keys += [k for k in o if k not in keys]
    return [k for k in keys if len({o.get(k, DEFAULT) for o in known}) > 1
            and all(names_a_run(k, o[k]) for o in known if k in o)]


def name_runs(runs: list[Run]) -> list[str]:
    """Sets each run's `varied` values and `name` (see the module's docstring); returns the varied keys."""
    keys = varied_keys(runs)
    for r in runs:
        r.varied = {k: r.overrides.get(k, DEFAULT) for k in keys} if r.overrides is not None else {}
        if keys == ["twin"] and r.varied:
            r.name = r.varied["twin"] if r.varied["twin"] != DEFAULT else r.folder
        elif r.varied:
            r.name = ",".join(f"{k}={v}" for k, v in r.varied.items())
        else:
            r.name = str(r.info.get("twin") or r.folder)
    names = [r.name for r in runs]
    for r in runs:  # two runs with one name (e.g. two sweeps in one folder): their directories tell them apart
        if names.count(r.name) > 1:
            r.name = r.folder
    return keys


def load_run(path: Path, sweep_dir: Path) -> Run:
    info: dict[str, Any] = {}
    problem = None
    if (path / RUN_FILE).is_file():
        try:
            info = json.loads((path / RUN_FILE).read_text())
        except json.JSONDecodeError:
            problem = f"{RUN_FILE} is not valid JSON"
    else:
        problem = f"no {RUN_FILE} (not written by experiments.train, or it died before starting)"
    records, bad = _read_jsonl(path / METRICS_FILE)
    rel = path.relative_to(sweep_dir).as_posix() if path != sweep_dir else "."
    run = Run(name="", path=path, rel=rel, info=info, records=records,
              overrides=read_overrides(path, info))
    last = records[-1]["step"] if records else 0
    if problem is None and run.status != "finished":
        error = (info.get("summary") or {}).get("error")
        what = {"running": "still running, or died", "interrupted": "interrupted (Ctrl-C)",
                "failed": f"failed ({error})" if error else "failed"}.get(run.status, run.status)
        problem = f"unfinished: status {run.status!r} in {RUN_FILE}, {what} at step {last} of {run.max_steps}"
    elif problem is None and bad:
        problem = bad
    evaluated = [{k: float(r[k]) for k in CURVE_KEYS} for r in records
                 if r.get("val_loss") is not None and all(k in r for k in ("flops", "elapsed_s"))]
    # the multipliers interpolate in log FLOPs (log seconds): the step-0 point is kept apart, for the plots
    run.curve = [p for p in evaluated if p["step"] > 0]
    run.start = next((p for p in evaluated if p["step"] == 0), None)
    if problem is None and not run.curve:
        problem = f"no validation loss in {METRICS_FILE}"
    run.problem = problem
    return run


def dirs_holding(root: Path, names: tuple[str, ...]) -> list[Path]:
    """Every directory below root (root included) that holds a file named in `names`, following symlinked
    directories (each real directory once, so a link back up cannot loop), skipping checkpoints, wandb, Hydra's and
    submitit's folders; sorted by path."""
    found, seen = [], set()
    for here, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        if any(n in files for n in names):
            found.append(Path(here))
    return sorted(found)


def find_runs(sweep_dir: str | Path) -> tuple[list[Run], list[str]]:
    """Every run below sweep_dir, sorted by path and named (name_runs), and the sweep's varied keys."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory {str(sweep_dir)!r} does not exist; pass the hydra.sweep.dir of a "
                                f"`python -m experiments.train -m ...` sweep")
    runs = [load_run(d, root) for d in dirs_holding(root, (RUN_FILE, METRICS_FILE))]
    return runs, name_runs(runs)
