"""python -m experiments.compare SWEEP_DIR [--baseline NAME] [--out DIR] [--no-plots]

The dense-versus-sparse report of one sweep (e.g. `python -m experiments.train -m experiment=dense_vs_moe`):
reads every run's run.json and metrics.jsonl below SWEEP_DIR and writes, into SWEEP_DIR (or --out),

  comparison.md    the table, its footnotes, the runs left out and why
  comparison.csv   the same numbers unrounded, one row per finished run
  loss_vs_flops.png, loss_vs_time.png   validation loss against training FLOPs and training seconds (log x)
  expert_load.png  per MoE run: max_load of every sparse layer over training, and each expert's token share

The baseline is the run named `dense` (its twin name; --baseline picks another). Its final validation loss L*,
FLOPs F* and training seconds T* set the budget the other runs are measured against:
  loss @ base FLOPs / time   a run's validation loss at F* / T*
  FLOP (time) multiplier     F* / F_run(L*): how many times fewer FLOPs (seconds) the run needed to reach L*
                             (Artetxe et al. 2022's speedup; the Switch Transformer's time to quality)
Curves are known only at the evaluations; between the two evaluations that bracket a value they are
interpolated linearly in log FLOPs (log seconds).

eval.json files (experiments.evaluate) anywhere below SWEEP_DIR add each run's loss over a whole text, in nats per
token and bits per byte: the record of the run's newest evaluated checkpoint on the text that most runs were
evaluated on. Library-free of Hydra: plain argparse.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from experiments.eval_file import EVAL_FILE, read_eval_file

METRICS_FILE = "metrics.jsonl"  # the names experiments.trainer and experiments.metrics write
RUN_FILE = "run.json"
SKIP_DIRS = {"checkpoints", "wandb", ".hydra"}
OUTPUTS = ("comparison.md", "comparison.csv", "loss_vs_flops.png", "loss_vs_time.png", "expert_load.png")


# ------------------------------------------------------------------------------------------ interpolation


SLACK = 0.01  # twins match FLOPs per token within 1%: a budget up to 1% past a curve's end reads its last value


def interp_at(xs: Sequence[float], ys: Sequence[float], x: float, slack: float = 0.0) -> Optional[float]:
    """y at x on a curve sampled at increasing xs > 0, linear in log x between the two bracketing samples;
    the last y for x at most `slack` (relative) past the last sample; None elsewhere (no extrapolation)."""
    if xs and xs[-1] < x <= xs[-1] * (1 + slack):
        return float(ys[-1])
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for i in range(len(xs)):
        if xs[i] == x:
            return float(ys[i])
        if xs[i] > x:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return float(y0 + t * (y1 - y0))
    return None


def first_reach(xs: Sequence[float], ys: Sequence[float], target: float) -> tuple[Optional[float], str]:
    """Where a loss curve first reaches `target` (y <= target): (x, how) with how one of
      "interpolated"  between the two bracketing samples, linear in log x
      "at_first"      already at the first sample: x = xs[0] is an upper bound (the crossing was earlier)
      "not_reached"   never; x is None
    """
    for i, y in enumerate(ys):
        if y <= target:
            if i == 0:
                return float(xs[0]), "at_first"
            y0, y1 = ys[i - 1], y
            t = (y0 - target) / (y0 - y1)  # y0 > target >= y1
            return float(math.exp(math.log(xs[i - 1]) + t * (math.log(xs[i]) - math.log(xs[i - 1])))), "interpolated"
    return None, "not_reached"


def multiplier(base_budget: float, base_target: float, xs: Sequence[float], ys: Sequence[float]
               ) -> tuple[Optional[float], Optional[float], str]:
    """(x where the curve reaches base_target, base_budget / that x, how): the compute multiplier of a run whose
    validation curve is (xs, ys) against a baseline that reached base_target after base_budget."""
    x, how = first_reach(xs, ys, base_target)
    return x, (base_budget / x if x else None), how


# ------------------------------------------------------------------------------------------ runs


@dataclass
class Run:
    name: str  # the twin name when the run has one, else its directory relative to the sweep
    path: Path
    info: dict[str, Any]  # run.json ({} when missing)
    records: list[dict[str, Any]]  # metrics.jsonl
    problem: Optional[str] = None  # why the run is left out of the table (None: it is in)
    curve: list[dict[str, float]] = field(default_factory=list)  # the evaluations: step, tokens, flops, elapsed_s, val_loss
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # eval.json records of this run's checkpoints
    evaluation: Optional[dict[str, Any]] = None  # the one in the table (see pick_evaluations)

    @property
    def status(self) -> str:
        return str(self.info.get("status", "unknown"))

    @property
    def is_moe(self) -> bool:
        return bool(self.info.get("sparse_layers"))

    @property
    def model(self) -> dict[str, Any]:
        return (self.info.get("config") or {}).get("model") or {}

    @property
    def max_steps(self) -> Optional[int]:
        return ((self.info.get("config") or {}).get("trainer") or {}).get("max_steps")


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
    rel = path.relative_to(sweep_dir).as_posix() if path != sweep_dir else path.name
    run = Run(name=str(info.get("twin") or rel), path=path, info=info, records=records)
    last = records[-1]["step"] if records else 0
    if problem is None and run.status != "finished":
        error = (info.get("summary") or {}).get("error")
        what = {"running": "still running, or died", "interrupted": "interrupted (Ctrl-C)",
                "failed": f"failed ({error})" if error else "failed"}.get(run.status, run.status)
        problem = f"unfinished: status {run.status!r} in {RUN_FILE}, {what} at step {last} of {run.max_steps}"
    elif problem is None and bad:
        problem = bad
    # the curves are read on log axes (interpolation and plots): the step-0 point of an untrained model is left out
    run.curve = [{k: float(r[k]) for k in ("step", "tokens", "flops", "elapsed_s", "val_loss")}
                 for r in records if r.get("val_loss") is not None and all(k in r for k in ("flops", "elapsed_s"))
                 and r["step"] > 0]
    if problem is None and not run.curve:
        problem = f"no validation loss in {METRICS_FILE}"
    run.problem = problem
    return run


def find_runs(sweep_dir: str | Path) -> list[Run]:
    """Every run directory below sweep_dir (one with a run.json or a metrics.jsonl), sorted by path."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory {str(sweep_dir)!r} does not exist; pass the hydra.sweep.dir of a "
                                f"`python -m experiments.train -m ...` sweep")
    dirs = set()
    for name in (RUN_FILE, METRICS_FILE):
        for p in root.rglob(name):
            if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]):
                dirs.add(p.parent)
    runs = [load_run(d, root) for d in sorted(dirs)]
    names = [r.name for r in runs]
    for r in runs:  # two runs with one twin name (e.g. two sweeps in one folder): fall back to their paths
        if names.count(r.name) > 1:
            r.name = r.path.relative_to(root).as_posix() if r.path != root else r.path.name
    return runs


def read_evaluations(root: Path, runs: list[Run]) -> list[str]:
    """Attaches every eval.json record below root to the run whose checkpoint it evaluated (by the record's run_dir,
    else by the checkpoint lying inside the run's directory). Returns a note for each file that cannot be read."""
    notes = []
    by_dir = {r.path.resolve(): r for r in runs}
    for f in sorted(root.rglob(EVAL_FILE)):
        if SKIP_DIRS & set(f.relative_to(root).parts[:-1]):
            continue
        try:
            evaluations = read_eval_file(f)
        except ValueError as e:
            notes.append(f"{f}: not read ({e})")
            continue
        for rec in evaluations:
            if not isinstance(rec, dict) or "checkpoint" not in rec:
                continue
            run = by_dir.get(Path(rec["run_dir"]).resolve()) if rec.get("run_dir") else None
            if run is None:
                ckpt = Path(rec["checkpoint"]).resolve()
                run = next((r for d, r in by_dir.items() if d in ckpt.parents), None)
            if run is not None:
                run.evaluations.append({**rec, "file": str(f)})
    return notes


def _text_of(rec: dict[str, Any]) -> Optional[str]:
    return (rec.get("data") or {}).get("text_fingerprint")


def pick_evaluations(runs: list[Run], base: Run) -> Optional[str]:
    """Sets run.evaluation for each run: its newest checkpoint's record (highest step, then the latest written) on
    the text that most runs were evaluated on (the baseline's on a tie), so every number in the column is over one
    text. Returns that text's fingerprint, None when no run has an evaluation."""
    texts: dict[str, int] = {}
    for r in runs:
        for t in {_text_of(e) for e in r.evaluations if _text_of(e)}:
            texts[t] = texts.get(t, 0) + 1
    if not texts:
        return None
    base_texts = {_text_of(e) for e in base.evaluations}
    text = max(texts, key=lambda t: (texts[t], t in base_texts))
    for r in runs:
        mine = [e for e in r.evaluations if _text_of(e) == text]
        r.evaluation = max(mine, key=lambda e: (e.get("step") or -1, str(e.get("evaluated_at", "")))) if mine else None
    return text


def check_comparable(runs: list[Run]) -> None:
    """Refuses finished runs trained on different data or vocabularies, naming them."""
    for key, what in (("data_fingerprint", "different data or tokenizers (data fingerprints)"),
                      ("vocab_size", "different vocabulary sizes")):
        groups: dict[Any, list[str]] = {}
        for r in runs:
            groups.setdefault(r.info.get(key), []).append(r.name)
        if len(groups) > 1:
            listing = "; ".join(f"{key}={k}: {', '.join(v)}" for k, v in groups.items())
            raise ValueError(f"the runs were trained on {what}, so their losses are not comparable: {listing}. "
                             f"Compare runs of one sweep (same data.* settings), or move the others out")


def pick_baseline(runs: list[Run], name: Optional[str]) -> Run:
    if name is not None:
        for r in runs:
            if r.name == name:
                return r
        raise ValueError(f"--baseline {name!r} is not a finished run here; finished runs: {[r.name for r in runs]}")
    named = [r for r in runs if r.name == "dense"]
    if named:
        return named[0]
    dense = sorted((r for r in runs if not r.is_moe), key=lambda r: r.info.get("params_total", 0))
    if dense:
        return dense[0]
    raise ValueError(f"no dense baseline among the finished runs {[r.name for r in runs]}; "
                     f"pass --baseline NAME to measure against one of them")


# ------------------------------------------------------------------------------------------ the report


@dataclass
class Report:
    sweep_dir: Path
    baseline: Run
    runs: list[Run]  # finished runs, the table's rows, baseline first
    left_out: list[Run]  # runs not in the table, each with its `problem`
    rows: list[dict[str, Any]]  # the table's numbers (the CSV)
    target_loss: float  # L*: the baseline's final validation loss
    budget_flops: float  # F*: the baseline's training FLOPs at its final evaluation
    budget_s: float  # T*: the baseline's training seconds at its final evaluation
    eval_text: Optional[dict[str, Any]] = None  # the text of the eval.json column (source, path, split); None: no column
    notes: list[str] = field(default_factory=list)  # eval.json files that could not be read


def row_for(run: Run, base: Run) -> dict[str, Any]:
    last, final = run.records[-1], run.curve[-1]
    c, bc = run.curve, base.curve
    F, T, L = bc[-1]["flops"], bc[-1]["elapsed_s"], bc[-1]["val_loss"]
    fx, fy, tx = [p["flops"] for p in c], [p["val_loss"] for p in c], [p["elapsed_s"] for p in c]
    model = run.model
    moe = model.get("moe") or {}
    row: dict[str, Any] = {
        "run": run.name, "twin": run.info.get("twin"), "group": run.info.get("group"),
        "experts": moe.get("num_experts") if run.is_moe else 0,
        "top_k": (moe.get("router") or {}).get("top_k") if run.is_moe else 0,
        "params_total": run.info.get("params_total"), "params_active": run.info.get("params_active"),
        "flops_per_token": run.info.get("flops_per_token"),
        "steps": last["step"], "tokens": last["tokens"], "train_flops": last["flops"], "train_s": last["elapsed_s"],
        "tokens_per_s": last["tokens"] / last["elapsed_s"] if last.get("elapsed_s") else None,
        "final_val_loss": final["val_loss"],
        "loss_at_base_flops": interp_at(fx, fy, F, SLACK), "loss_at_base_time": interp_at(tx, fy, T),
    }
    if run is base:  # by definition: the baseline spends its own budget
        row.update(flops_to_base_loss=F, flop_multiplier=1.0, flop_reach="baseline",
                   time_to_base_loss=T, time_multiplier=1.0, time_reach="baseline")
    else:
        x, m, how = multiplier(F, L, fx, fy)
        row.update(flops_to_base_loss=x, flop_multiplier=m, flop_reach=how)
        x, m, how = multiplier(T, L, tx, fy)
        row.update(time_to_base_loss=x, time_multiplier=m, time_reach=how)
    ev = run.evaluation or {}
    row.update(eval_nats_per_token=ev.get("nats_per_token"), eval_bits_per_byte=ev.get("bits_per_byte"),
               eval_tokens=ev.get("tokens"), eval_bytes=ev.get("bytes"), eval_step=ev.get("step"),
               eval_checkpoint=ev.get("checkpoint"))
    row["run_dir"] = str(run.path)
    return row


def build_report(sweep_dir: str | Path, baseline: Optional[str] = None) -> Report:
    """Reads the sweep and computes the table; raises ValueError/FileNotFoundError with what to change."""
    root = Path(sweep_dir)
    runs = find_runs(root)
    if not runs:
        raise ValueError(f"no runs in {str(sweep_dir)!r}: no {RUN_FILE} or {METRICS_FILE} below it; pass the "
                         f"hydra.sweep.dir of a `python -m experiments.train -m ...` sweep")
    finished = [r for r in runs if r.problem is None]
    left_out = [r for r in runs if r.problem is not None]
    if not finished:
        listing = "; ".join(f"{r.name}: {r.problem}" for r in left_out)
        raise ValueError(f"no finished runs in {str(sweep_dir)!r} ({listing}); wait for the sweep to finish, "
                         f"or resume the unfinished runs with resume=auto")
    check_comparable(finished)
    notes = read_evaluations(root, finished)
    base = pick_baseline(finished, baseline)
    text = pick_evaluations(finished, base)
    eval_text = next((r.evaluation["data"] for r in finished if r.evaluation and text), None)
    def order(r: Run) -> tuple:  # dense runs by size, then MoE runs by top-k and expert count
        router = (r.model.get("moe") or {}).get("router") or {}
        return (r.is_moe, router.get("top_k", 0) if r.is_moe else 0,
                (r.model.get("moe") or {}).get("num_experts", 0) if r.is_moe else 0, r.info.get("params_total") or 0, r.name)

    ordered = [base] + sorted((r for r in finished if r is not base), key=order)
    rows = [row_for(r, base) for r in ordered]
    b = base.curve[-1]
    return Report(root, base, ordered, left_out, rows, b["val_loss"], b["flops"], b["elapsed_s"], eval_text, notes)


def _num(x: Optional[float], fmt: str, missing: str = "—") -> str:
    return missing if x is None else format(x, fmt)


def _params(n: Optional[int]) -> str:
    return "—" if n is None else (f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k")


def _mult(row: dict[str, Any], kind: str) -> str:
    m, how = row[f"{kind}_multiplier"], row[f"{kind}_reach"]
    if how == "not_reached":
        return "not reached"
    return ("≥ " if how == "at_first" else "") + f"{m:.2f}×"


def _reach(row: dict[str, Any], kind: str, fmt: str) -> str:
    x, how = row["flops_to_base_loss" if kind == "flop" else "time_to_base_loss"], row[f"{kind}_reach"]
    if how == "not_reached":
        return "not reached"
    return ("≤ " if how == "at_first" else "") + format(x, fmt)


COLUMNS = ["run", "experts", "top-k", "params (total)", "params (active)", "train FLOPs/token", "tokens/s ¹",
           "final val loss", "loss @ base FLOPs ²", "loss @ base time ²", "FLOPs to base loss ³",
           "FLOP multiplier ³", "seconds to base loss ³", "time multiplier ³"]


EVAL_COLUMNS = ["eval nats/token ⁴", "eval bits/byte ⁴"]


def markdown_table(report: Report) -> str:
    cols = COLUMNS + (EVAL_COLUMNS if report.eval_text else [])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    for row in report.rows:
        cells = [f"**{row['run']}**" if row["run"] == report.baseline.name else row["run"],
                 str(row["experts"] or "—"), str(row["top_k"] or "—"),
                 _params(row["params_total"]), _params(row["params_active"]), _num(row["flops_per_token"], ".3g"),
                 _num(row["tokens_per_s"], ",.0f"), _num(row["final_val_loss"], ".4f"),
                 _num(row["loss_at_base_flops"], ".4f"), _num(row["loss_at_base_time"], ".4f"),
                 _reach(row, "flop", ".3g"), _mult(row, "flop"), _reach(row, "time", ".1f"), _mult(row, "time")]
        if report.eval_text:
            cells += [_num(row["eval_nats_per_token"], ".4f"), _num(row["eval_bits_per_byte"], ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(report: Report, plots: Sequence[Path] = ()) -> str:
    groups = sorted({str(r.info.get("group")) for r in report.runs if r.info.get("group")})
    out = [f"# Dense versus sparse: {report.sweep_dir}", ""]
    if groups:
        out += [f"Sweep group: {', '.join(groups)}.", ""]
    out += [f"Baseline **{report.baseline.name}**: final validation loss L* = {report.target_loss:.4f} nats after "
            f"F* = {report.budget_flops:.3g} training FLOPs and T* = {report.budget_s:.1f} s of training steps.", "",
            markdown_table(report), "",
            "¹ Training tokens per second of training-step time over the whole run (evaluation and checkpointing "
            "excluded), as measured on the machine and under the load the run had; compare seconds only between runs "
            "that ran on the same hardware one at a time.",
            "² The run's validation loss at the baseline's final budget (F* FLOPs, T* seconds), linear in log FLOPs "
            "(log seconds) between the two evaluations that bracket it (its final value when F* lies less than 1% past its end: twins "
            "match FLOPs per token to 1%); — when the run's curve does not cover it.",
            "³ FLOPs (seconds) at which the run's validation loss first reaches L*, interpolated log-linearly in FLOPs "
            "(seconds) between the two bracketing evaluations; the multiplier is F*/F (T*/T): how many times fewer FLOPs "
            "(seconds) the run needs to match the baseline's final loss (Artetxe et al. 2022; Fedus et al. 2021). "
            "≤/≥: already reached at the run's first evaluation, so the value is a bound. \"not reached\": the curve never "
            "gets to L*. The baseline is 1.00× by definition."]
    if report.eval_text:
        t = report.eval_text
        where = " ".join(str(x) for x in (t.get("source"), t.get("path"), f"split={t.get('split')}") if x)
        out += [f"⁴ From {EVAL_FILE} (experiments.evaluate): the loss over every token of {where}, at the run's "
                f"newest evaluated checkpoint, in nats per token and bits per byte (bits per byte do not depend on the "
                f"tokenizer); — when the run has no evaluation of that text."]
    if report.notes:
        out += ["", "Not read:", ""] + [f"- {n}" for n in report.notes]
    if report.left_out:
        out += ["", "Not in the table:", ""]
        out += [f"- {r.name} (`{r.path}`): {r.problem}" for r in report.left_out]
    if plots:
        out += ["", "Plots: " + ", ".join(f"[{p.name}]({p.name})" for p in plots), ""]
        out += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(out) + "\n"


def write_csv(report: Report, path: Path) -> None:
    keys = list(report.rows[0])
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in report.rows:
            w.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in row.items()})


def write_report(report: Report, out_dir: Optional[str | Path] = None, plots: bool = True) -> dict[str, Path]:
    """Writes comparison.md, comparison.csv and (with plots) the PNGs; returns their paths by name."""
    out = Path(out_dir) if out_dir is not None else report.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if plots:
        from experiments.compare_plots import plot_curves, plot_expert_load  # matplotlib only when plotting

        for p in plot_curves(report, out):
            paths[p.name] = p
        load = plot_expert_load(report, out)
        if load is not None:
            paths[load.name] = load
    write_csv(report, out / "comparison.csv")
    paths["comparison.csv"] = out / "comparison.csv"
    (out / "comparison.md").write_text(markdown(report, [p for p in paths.values() if p.suffix == ".png"]))
    paths["comparison.md"] = out / "comparison.md"
    return paths


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="a sweep directory (hydra.sweep.dir) or one run directory")
    parser.add_argument("--baseline", default=None, help="the run to measure against (default: the run named dense)")
    parser.add_argument("--out", default=None, help="where to write the report (default: SWEEP_DIR)")
    parser.add_argument("--no-plots", action="store_true", help="write only comparison.md and comparison.csv")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.sweep_dir, args.baseline)
        paths = write_report(report, args.out, plots=not args.no_plots)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    print(f"baseline {report.baseline.name}: final validation loss {report.target_loss:.4f} after "
          f"{report.budget_flops:.3g} training FLOPs, {report.budget_s:.1f} s\n")
    print(markdown_table(report))
    for r in report.left_out:
        print(f"left out: {r.name} ({r.path}): {r.problem}")
    print()
    for name, p in paths.items():
        print(f"{name + ':':<17} {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
