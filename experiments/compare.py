"""python -m experiments.compare SWEEP_DIR [--baseline NAME] [--out DIR] [--no-plots]

The report of one sweep (e.g. `python -m experiments.train -m experiment=dense_vs_moe`, or `-m routing=topk,switch`):
reads every run's run.json and metrics.jsonl below SWEEP_DIR (symlinked run directories included) and writes,
into SWEEP_DIR (or --out),

  comparison.md    the table, its footnotes, the baseline rule, timing warnings, the runs left out and why
  comparison.csv   the same numbers unrounded, one row per finished run
  loss_vs_flops.png/.svg, loss_vs_time.png/.svg   validation loss against training FLOPs and training seconds
  expert_load.png/.svg  per MoE run: max/mean load of every sparse layer, and each expert's load on one colour scale

Rows are named by the overrides that vary across the sweep, shown as columns too (experiments/compare_runs.py).
The baseline is --baseline NAME, else by a rule the report prints: the run with twin=dense, else the smallest
dense run, else the run that keeps the default router (routing not overridden), else the first row. Its final
validation loss L*, FLOPs F* and training seconds T* set the budget the other runs are measured against:
  loss @ base FLOPs / time   a run's validation loss at F* / T*
  FLOP (time) multiplier     F* / F_run(L*): how many times fewer FLOPs (seconds) the run needed to reach L*
                             (Artetxe et al. 2022's speedup; the Switch Transformer's time to quality)
Curves are known only at the evaluations; between the two evaluations that bracket a value they are
interpolated linearly in log FLOPs (log seconds). Time columns carry warnings when runs overlapped on one machine,
ran on different machines or started on a busy one (experiments/compare_timing.py, from run.json's provenance).

eval.json files (experiments.evaluate) anywhere below SWEEP_DIR add each run's loss over a whole text, in nats per
token and bits per byte: the record of the run's newest evaluated checkpoint on the text that most runs were
evaluated on. Library-free of Hydra: plain argparse.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from experiments.compare_runs import DEFAULT, METRICS_FILE, RUN_FILE, Run, dirs_holding, find_runs
from experiments.compare_timing import timing_warnings
from experiments.eval_file import EVAL_FILE, read_eval_file


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


# ------------------------------------------------------------------------------------------ eval.json


def read_evaluations(root: Path, runs: list[Run]) -> list[str]:
    """Attaches every eval.json record below root to the run whose checkpoint it evaluated (by the record's run_dir,
    else by the checkpoint lying inside the run's directory). Returns a note for each file that cannot be read."""
    notes = []
    by_dir = {r.path.resolve(): r for r in runs}
    for f in [d / EVAL_FILE for d in dirs_holding(root, (EVAL_FILE,))]:
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


def order(r: Run) -> tuple:
    """The table's order: dense runs by size, then MoE runs by top-k and expert count, then by name."""
    moe = r.model.get("moe") or {}
    return (r.is_moe, (moe.get("router") or {}).get("top_k", 0) if r.is_moe else 0,
            moe.get("num_experts", 0) if r.is_moe else 0, r.info.get("params_total") or 0, r.name)


def pick_baseline(runs: list[Run], name: Optional[str]) -> tuple[Run, str]:
    """(the baseline, the rule that chose it, in words). --baseline matches a run's name, its directory or one of
    its varied overrides (`routing=switch`)."""
    if name is not None:
        for r in runs:
            if name in (r.name, r.rel, r.folder) or name in (f"{k}={v}" for k, v in r.varied.items()):
                return r, f"--baseline {name}"
        raise ValueError(f"--baseline {name!r} is not a finished run here; finished runs: {[r.name for r in runs]}")
    twins = [r for r in runs if r.info.get("twin") == "dense"]
    if twins:
        return twins[0], "the run with twin=dense"
    dense = sorted((r for r in runs if not r.is_moe), key=lambda r: (r.info.get("params_total") or 0, r.name))
    if dense:
        return dense[0], ("the run without sparse layers" if len(dense) == 1 else
                          f"the smallest of the {len(dense)} runs without sparse layers")
    default = [r for r in runs if "routing" in r.varied and r.varied["routing"] in (DEFAULT, "null", "default")]
    if default:
        return default[0], "no dense run: the run that keeps the model's default router, routing not overridden"
    first = sorted(runs, key=order)[0]
    return first, ("no dense run and no default router: the first row in the table's order, fewest experts and "
                   "top-k first; pass --baseline NAME for another")


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
    varied: list[str] = field(default_factory=list)  # the overrides that vary across the sweep (the name columns)
    baseline_rule: str = ""  # why the baseline is the baseline, in words
    warnings: list[str] = field(default_factory=list)  # why the time columns may mislead, naming the rows
    sweep_name: str = ""  # the sweep's group (run.json), else its directory's name
    setting: str = ""  # data and steps in words, for titles: "shakespeare (byte), 500 steps x 2,048 tokens"

    @property
    def from_checkpoint(self) -> bool:
        """Whether any row starts from a checkpoint (init_from): its step-0 loss is then part of the story."""
        return any(r.config.get("init_from") for r in self.runs)


def row_for(run: Run, base: Run, varied: Sequence[str] = ()) -> dict[str, Any]:
    last, final = run.records[-1], run.curve[-1]
    c, bc = run.curve, base.curve
    F, T, L = bc[-1]["flops"], bc[-1]["elapsed_s"], bc[-1]["val_loss"]
    fx, fy, tx = [p["flops"] for p in c], [p["val_loss"] for p in c], [p["elapsed_s"] for p in c]
    model = run.model
    moe = model.get("moe") or {}
    row: dict[str, Any] = {"run": run.name, **{f"override:{k}": run.varied.get(k) for k in varied}}
    row.update({
        "twin": run.info.get("twin"), "group": run.info.get("group"),
        "experts": moe.get("num_experts") if run.is_moe else 0,
        "top_k": (moe.get("router") or {}).get("top_k") if run.is_moe else 0,
        "params_total": run.info.get("params_total"), "params_active": run.info.get("params_active"),
        "flops_per_token": run.info.get("flops_per_token"),
        "steps": last["step"], "tokens": last["tokens"], "train_flops": last["flops"], "train_s": last["elapsed_s"],
        "tokens_per_s": last["tokens"] / last["elapsed_s"] if last.get("elapsed_s") else None,
        "start_val_loss": run.start["val_loss"] if run.start else None,
        "final_val_loss": final["val_loss"],
        "loss_at_base_flops": interp_at(fx, fy, F, SLACK), "loss_at_base_time": interp_at(tx, fy, T),
    })
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
    prov = run.provenance
    row.update(host=prov.get("host"), started_at=prov.get("started_at"), ended_at=prov.get("ended_at"),
               git_commit=(prov.get("git") or {}).get("commit"), run_dir=str(run.path))
    return row


def describe_setting(runs: list[Run]) -> str:
    """The data and the step budget of the runs in words (a range where they differ)."""
    def values(get) -> str:
        found = sorted({str(get(r)) for r in runs if get(r) is not None})
        return "/".join(found) if found else "?"

    data = values(lambda r: (r.config.get("data") or {}).get("source"))
    path = values(lambda r: Path(p).name if (p := (r.config.get("data") or {}).get("path")) else None)
    tok = values(lambda r: (r.config.get("data") or {}).get("tokenizer"))
    steps = values(lambda r: r.max_steps)
    tc = [r.config.get("trainer") or {} for r in runs]
    per_step = {t.get("batch_size", 0) * t.get("seq_len", 0) * t.get("grad_accum", 1) for t in tc}
    tokens = "/".join(f"{n:,}" for n in sorted(per_step)) if per_step and 0 not in per_step else "?"
    where = data + (f" {path}" if path != "?" else "") + (f" ({tok} tokens)" if tok != "?" else "")
    return f"{where}, {steps} steps × {tokens} tokens"


def build_report(sweep_dir: str | Path, baseline: Optional[str] = None) -> Report:
    """Reads the sweep and computes the table; raises ValueError/FileNotFoundError with what to change."""
    root = Path(sweep_dir)
    runs, varied = find_runs(root)
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
    base, rule = pick_baseline(finished, baseline)
    text = pick_evaluations(finished, base)
    eval_text = next((r.evaluation["data"] for r in finished if r.evaluation and text), None)
    ordered = [base] + sorted((r for r in finished if r is not base), key=order)
    rows = [row_for(r, base, varied) for r in ordered]
    b = base.curve[-1]
    groups = sorted({str(r.info["group"]) for r in ordered if r.info.get("group")})
    return Report(root, base, ordered, left_out, rows, b["val_loss"], b["flops"], b["elapsed_s"], eval_text, notes,
                  varied=varied, baseline_rule=rule, warnings=timing_warnings(ordered),
                  sweep_name=", ".join(groups) or root.resolve().name, setting=describe_setting(ordered))


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
START_COLUMN = "val loss @ step 0"  # shown when a row starts from a checkpoint (init_from)
EVAL_COLUMNS = ["eval nats/token ⁴", "eval bits/byte ⁴"]


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")  # a literal bar would end the markdown cell


def markdown_table(report: Report) -> str:
    start = report.from_checkpoint
    cols = (COLUMNS[:1] + report.varied + COLUMNS[1:7] + ([START_COLUMN] if start else []) + COLUMNS[7:]
            + (EVAL_COLUMNS if report.eval_text else []))
    lines = ["| " + " | ".join(_cell(c) for c in cols) + " |",
             "|" + "|".join(["---"] * (1 + len(report.varied)) + ["---:"] * (len(cols) - 1 - len(report.varied))) + "|"]
    for row in report.rows:
        cells = [f"**{row['run']}**" if row["run"] == report.baseline.name else row["run"]]
        cells += [row[f"override:{k}"] or "—" for k in report.varied]
        cells += [str(row["experts"] or "—"), str(row["top_k"] or "—"),
                  _params(row["params_total"]), _params(row["params_active"]), _num(row["flops_per_token"], ".3g"),
                  _num(row["tokens_per_s"], ",.0f")]
        cells += [_num(row["start_val_loss"], ".4f")] if start else []
        cells += [_num(row["final_val_loss"], ".4f"),
                  _num(row["loss_at_base_flops"], ".4f"), _num(row["loss_at_base_time"], ".4f"),
                  _reach(row, "flop", ".3g"), _mult(row, "flop"), _reach(row, "time", ".1f"), _mult(row, "time")]
        if report.eval_text:
            cells += [_num(row["eval_nats_per_token"], ".4f"), _num(row["eval_bits_per_byte"], ".4f")]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def headline(report: Report) -> list[str]:
    """The lines above the table: what varied, the baseline and the rule that chose it, its budget."""
    varied = ", ".join(f"`{k}`" for k in report.varied) or "nothing in the overrides (rows named by directory)"
    return [f"Sweep {report.sweep_name}: {report.setting}; varied: {varied}.",
            f"Baseline **{report.baseline.name}** ({report.baseline_rule}): final validation loss "
            f"L* = {report.target_loss:.4f} nats after F* = {report.budget_flops:.3g} training FLOPs and "
            f"T* = {report.budget_s:.1f} s of training steps."]


def markdown(report: Report, plots: Sequence[Path] = ()) -> str:
    out = [f"# Comparison: {report.sweep_dir}", ""]
    for line in headline(report):
        out += [line, ""]
    out += [markdown_table(report), "",
            "¹ Training tokens per second of training-step time over the whole run (evaluation and checkpointing "
            "excluded), as measured on the machine and under the load the run had; compare seconds only between runs "
            "that ran on the same hardware one at a time (see the warnings below, from each run.json's provenance).",
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
    if report.warnings:
        out += ["", "Time columns:", ""] + [f"- ⚠ {w}" for w in report.warnings]
    if report.notes:
        out += ["", "Not read:", ""] + [f"- {n}" for n in report.notes]
    if report.left_out:
        out += ["", "Not in the table:", ""]
        out += [f"- {r.name} (`{r.path}`): {r.problem}" for r in report.left_out]
    pngs = [p for p in plots if p.suffix == ".png"]
    if pngs:
        out += ["", "Plots (SVG beside each PNG): " + ", ".join(f"[{p.name}]({p.name})" for p in plots), ""]
        out += [f"![{p.stem}]({p.name})" for p in pngs]
    return "\n".join(out) + "\n"


def write_csv(report: Report, path: Path) -> None:
    write_rows_csv(report.rows, path)


def write_rows_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Rows of one set of keys as CSV: floats unrounded (repr), None as an empty cell (also the scaling study's)."""
    keys = list(rows[0])
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in row.items()})


def write_report(report: Report, out_dir: Optional[str | Path] = None, plots: bool = True) -> dict[str, Path]:
    """Writes comparison.md, comparison.csv and (with plots) each figure as PNG and SVG; returns their paths by name."""
    out = Path(out_dir) if out_dir is not None else report.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if plots:
        from experiments.compare_plots import plot_curves, plot_expert_load  # matplotlib only when plotting

        for p in plot_curves(report, out) + plot_expert_load(report, out):
            paths[p.name] = p
    write_csv(report, out / "comparison.csv")
    paths["comparison.csv"] = out / "comparison.csv"
    (out / "comparison.md").write_text(markdown(report, [p for p in paths.values() if p.suffix in (".png", ".svg")]))
    paths["comparison.md"] = out / "comparison.md"
    return paths


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="a sweep directory (hydra.sweep.dir) or one run directory")
    parser.add_argument("--baseline", default=None, help="the run to measure against: a row name, a run directory or an override such as routing=switch "
                        "(default: twin=dense, else the smallest dense run, else the default router, else the first row)")
    parser.add_argument("--out", default=None, help="where to write the report (default: SWEEP_DIR)")
    parser.add_argument("--no-plots", action="store_true", help="write only comparison.md and comparison.csv")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.sweep_dir, args.baseline)
        paths = write_report(report, args.out, plots=not args.no_plots)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    print("\n".join(headline(report)).replace("**", "") + "\n")
    print(markdown_table(report))
    for w in report.warnings:
        print(f"warning: {w}")
    for r in report.left_out:
        print(f"left out: {r.name} ({r.path}): {r.problem}")
    print()
    for name, p in paths.items():
        print(f"{name + ':':<17} {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
