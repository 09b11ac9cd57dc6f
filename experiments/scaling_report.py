"""The scaling study's written report (experiments/scaling_study.py report): tables.md and study.csv from a
Study (experiments/scaling_tables.py), in the style of experiments.compare's comparison.md.

tables.md: the setting and provenance (commits, machine, dates, load), validation loss against E per budget
(the Switch Transformer's Figure 1 left at equal FLOPs per token), one full table per budget (loss, multipliers,
bare-step ratios, rows per expert, balance), the FLOP multiplier at every evaluation, the largest multiplier per
budget and, where none reaches 2x, the budget the best twin's trend needs.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from experiments.compare import write_rows_csv
from experiments.compare_timing import timing_warnings
from experiments.scaling_tables import TARGET, Study, trend_to


def _f(x: Optional[float], fmt: str, missing: str = "—") -> str:
    return missing if x is None else format(x, fmt)


def _mult(row: dict[str, Any], kind: str) -> str:
    m, how = row[f"{kind}_multiplier"], row[f"{kind}_reach"]
    if how == "not_reached":
        return "not reached"
    return ("≥ " if how == "at_first" else "") + f"{m:.2f}×"


def provenance(study: Study) -> list[str]:
    """Lines on where and from what code the runs came."""
    provs = [t.run.provenance for t in study.twins]
    commits = sorted({f"{(p.get('git') or {}).get('commit', '?')[:9]}" + (" (dirty)" if (p.get("git") or {}).get("dirty")
                      else "") for p in provs})
    hosts = sorted({f"{p.get('host')} ({(p.get('cpu') or {}).get('model')}, {(p.get('cpu') or {}).get('usable')} usable CPUs, "
                    f"{(p.get('cpu') or {}).get('torch_threads')} torch thread(s))" for p in provs if p})
    starts = sorted(str(p.get("started_at"))[:16] for p in provs if p.get("started_at"))
    ends = sorted(str(p.get("ended_at"))[:16] for p in provs if p.get("ended_at"))
    loads = [p["load_at_start"][0] for p in provs if p.get("load_at_start")]
    out = [f"- code: commit {', '.join(commits)}", f"- machine: {'; '.join(hosts) or 'not recorded'}"]
    if starts:
        out.append(f"- trained {starts[0]} to {ends[-1] if ends else '?'} UTC; 1-minute load at the runs' starts "
                   f"{min(loads):.1f}–{max(loads):.1f}" if loads else f"- trained from {starts[0]}")
    return out


def loss_vs_experts(study: Study) -> list[str]:
    """One table: rows E, columns top-1 / top-2 at each budget; the fine-grained twins below it."""
    by = {(r["budget_steps"], r["family"], r["experts"]): r for r in study.rows}
    fams = ("top-1", "top-2")
    cols = [f"{f} @ {n}" for n in study.budgets for f in fams]
    experts = sorted({r["experts"] for r in study.rows if r["family"] in ("dense",) + fams})
    lines = ["| E | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
    for e in experts:
        cells = []
        for n in study.budgets:
            for f in fams:
                r = by.get((n, "dense" if e == 1 else f, e))
                cells.append(_f(r["val_loss"] if r else None, ".4f"))
        lines.append(f"| {'1 (dense)' if e == 1 else e} | " + " | ".join(cells) + " |")
    fine = sorted({r["twin"] for r in study.rows if r["family"] == "top-k + shared"})
    if fine:
        lines += ["", "| fine-grained twin (E routed, k chosen, s shared) | " +
                  " | ".join(f"@ {n}" for n in study.budgets) + " |", "|---|" + "---:|" * len(study.budgets)]
        by_name = {(r["budget_steps"], r["twin"]): r for r in study.rows}
        for name in fine:
            lines.append(f"| {name} | " + " | ".join(_f((by_name.get((n, name)) or {}).get("val_loss"), ".4f")
                                                    for n in study.budgets) + " |")
    return lines


BUDGET_COLUMNS = ["twin", "E", "k", "s", "val loss", "Δ vs dense", "FLOP multiplier", "time multiplier ¹",
                  "bare-step ratio ²", "time multiplier from bare step ²", "tokens/s ¹", "rows/expert/step ³",
                  "rows/expert in budget ³", "max/mean load ⁴", "dead experts ⁴"]


def budget_table(study: Study, steps: int) -> list[str]:
    lines = ["| " + " | ".join(BUDGET_COLUMNS) + " |", "|---|" + "---:|" * (len(BUDGET_COLUMNS) - 1)]
    for r in (r for r in study.rows if r["budget_steps"] == steps):
        dense = r["family"] == "dense"
        cells = [f"**{r['twin']}**" if dense else r["twin"], str(r["experts"]), str(r["top_k"]), str(r["shared"]),
                 f"{r['val_loss']:.4f}", "—" if dense else f"{r['loss_vs_dense']:+.4f}", _mult(r, "flop"),
                 _mult(r, "time"), _f(r["bare_step_ratio"], ".2f") + ("×" if r["bare_step_ratio"] else ""),
                 _f(r["time_multiplier_bare"], ".2f") + ("×" if r["time_multiplier_bare"] else ""),
                 _f(r["tokens_per_s"], ",.0f"), "—" if dense else f"{r['rows_per_expert_step']:,.0f}",
                 "—" if dense else f"{r['rows_per_expert_budget']:,.0f}", _f(r["max_load"], ".2f"),
                 _f(r["dead_experts"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def growth_table(study: Study, columns: int = 12) -> list[str]:
    """The FLOP multiplier of each twin at the steps where dense was evaluated (every one, or every second, third...
    so that at most `columns` remain, the last always kept)."""
    every = sorted({n for pts in study.curves.values() for n, _, _ in pts})
    stride = max(1, math.ceil(len(every) / columns))
    steps = every[::-1][::stride][::-1]
    lines = ["| twin | " + " | ".join(str(n) for n in steps) + " |", "|---|" + "---:|" * len(steps)]
    for name, pts in study.curves.items():
        at = {n: m for n, m, _ in pts}
        lines.append(f"| {name} | " + " | ".join(_f(at.get(n), ".2f") for n in steps) + " |")
    return lines


def best_lines(study: Study) -> list[str]:
    """The largest FLOP multiplier per budget, per family, and the trend of the overall best to TARGET."""
    out = []
    for n in study.budgets:
        rows = [r for r in study.rows if r["budget_steps"] == n and r["family"] != "dense" and r["flop_multiplier"]]
        if not rows:
            continue
        best = max(rows, key=lambda r: r["flop_multiplier"])
        fams = []
        for fam in ("top-1", "top-2", "top-k + shared"):
            fr = [r for r in rows if r["family"] == fam]
            if fr:
                b = max(fr, key=lambda r: r["flop_multiplier"])
                fams.append(f"{fam} {b['twin']} {b['flop_multiplier']:.2f}×")
        out.append(f"- at {n} steps: **{best['twin']}**, {best['flop_multiplier']:.2f}× fewer FLOPs to dense's loss "
                   f"({best['val_loss']:.4f} against {best['val_loss'] - best['loss_vs_dense']:.4f}); best per family: "
                   f"{'; '.join(fams)}")
    last = [r for r in study.rows if r["budget_steps"] == study.budgets[-1] and r["family"] != "dense"
            and r["flop_multiplier"]]
    if not last:
        return out
    best = max(last, key=lambda r: r["flop_multiplier"])
    reached = [r for r in study.rows if (r["flop_multiplier"] or 0) >= TARGET]
    if reached:
        r = min(reached, key=lambda r: r["budget_steps"])
        out.append(f"- {TARGET:g}× is reached: {r['twin']} at {r['budget_steps']} steps ({r['flop_multiplier']:.2f}×)")
        return out
    for r in sorted(last, key=lambda r: -r["flop_multiplier"])[:3]:
        tr = trend_to([(n, m) for n, m, _ in study.curves.get(r["twin"], [])])
        if tr is None:
            continue
        tokens = study.base.tokens_per_step
        if math.isinf(tr["steps"]):
            out.append(f"- trend of {r['twin']} (m = {tr['a']:.2f} + {tr['b']:.3f} ln N over steps "
                       f"{tr['from']:.0f}–{tr['to']:.0f}): not growing, so no budget of this kind reaches {TARGET:g}×")
        else:
            out.append(f"- trend of {r['twin']} (least squares m = {tr['a']:.2f} + {tr['b']:.3f} ln N over steps "
                       f"{tr['from']:.0f}–{tr['to']:.0f}): {TARGET:g}× at about N = {tr['steps']:,.0f} steps "
                       f"({tr['steps'] * tokens / 1e6:,.1f}M tokens), an extrapolation "
                       f"{tr['steps'] / tr['to']:,.1f}× past the data")
    return out


def markdown(study: Study, plots: list[Path]) -> str:
    b = study.base
    out = [f"# Scaling study: {study.root.name}", "",
           f"Dense base and FLOP-matched twins (moe/twins.py), {b.tokens_per_step:,} tokens per step, "
           f"optim.schedule={b.schedule}; budgets {', '.join(map(str, study.budgets))} steps"
           + (", each read off the same runs (a constant-LR run's first N steps are an N-step run)" if b.schedule == "constant"
              else "") + f". Baseline **{b.name}**: every multiplier is against its validation loss at the budget "
           f"(experiments.compare's definitions).", ""]
    out += provenance(study)
    if study.bench_header:
        out += [f"- bare-step ratios ²: {study.bench_header}"]
    out += ["", "## Validation loss against the number of experts, equal training FLOPs per token", ""]
    out += loss_vs_experts(study)
    out += ["", "## The largest multipliers", ""] + best_lines(study)
    for n in study.budgets:
        out += ["", f"## Budget: {n} steps ({n * b.tokens_per_step / 1e6:.2f}M tokens)", ""] + budget_table(study, n)
    out += ["", "## FLOP multiplier against training length (dense's loss at each step N)", ""] + growth_table(study)
    out += ["", "¹ Measured in the sweep: training seconds of each run (evaluation excluded), two runs at a time on a "
            "machine shared with other work, so these compare poorly (warnings below).",
            "² experiments.bench_step: the bare training step of the same twin over dense's, interleaved in one "
            "process (median of pairs); the time multiplier it implies is the FLOP multiplier × (twin's over dense's "
            "FLOPs per token) / the ratio.",
            "³ Routed rows an expert receives at an even load: per step (tokens per step × k / E, per layer) and "
            "over the budget.",
            "⁴ From metrics.jsonl over the logged steps in (N/2, N]: the busiest expert's rows over the mean, "
            "averaged over layers; experts without a row in a step, summed over layers.",
            "In the growth table, — is a twin whose curve never gets to dense's loss at that step, or was not "
            "trained that far."]
    warnings = timing_warnings([t.run for t in study.twins])
    if warnings:
        out += ["", "Time columns:", ""] + [f"- ⚠ {w}" for w in warnings]
    if study.left_out:
        out += ["", "Notes on the runs:", ""] + [f"- {x}" for x in study.left_out]
    pngs = [p for p in plots if p.suffix == ".png"]
    if pngs:
        out += ["", "Plots (SVG beside each PNG): " + ", ".join(f"[{p.name}]({p.name})" for p in plots), ""]
        out += [f"![{p.stem}]({p.name})" for p in pngs]
    return "\n".join(out) + "\n"


def write_report(study: Study, out: Path, plots: bool = True) -> dict[str, Path]:
    """tables.md, study.csv and (with plots) the figures (experiments/scaling_plots.py); their paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if plots:
        from experiments.scaling_plots import plot_study

        paths.update({p.name: p for p in plot_study(study, out)})
    if not study.rows:
        raise ValueError(f"no run of {study.root} reaches the budgets {study.budgets}; pass smaller --budgets")
    write_rows_csv(study.rows, out / "study.csv")
    paths["study.csv"] = out / "study.csv"
    (out / "tables.md").write_text(markdown(study, [p for p in paths.values() if p.suffix in (".png", ".svg")]))
    paths["tables.md"] = out / "tables.md"
    return paths
