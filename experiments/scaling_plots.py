"""The scaling study's figures (experiments/scaling_study.py report), each as PNG and SVG in the style of
experiments/compare_plots.py (markers at the measured points, plain tick labels, one colour per setting):

  loss_vs_experts      validation loss against E (log 2 axis) at equal training FLOPs per token, one panel per
                       budget: top-1, top-2 and the fine-grained twins with shared experts, dense as E = 1 and as
                       a dotted line (the Switch Transformer's Figure 1 left, at toolkit scale)
  multiplier_vs_steps  the FLOP multiplier and the measured time multiplier against the training length N
                       (dense's loss at step N), one line per twin, coloured by E, dashed for top-2
  balance_vs_experts   the busiest expert's load over the mean (after warm-up) and the rows per expert per step,
                       against E, at the longest budget that most twins reached
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from experiments.compare_plots import _pyplot, _save

if TYPE_CHECKING:
    from experiments.scaling_tables import Study

STYLE = {"top-1": ("o", "-"), "top-2": ("s", "--"), "top-k + shared": ("^", ":")}  # marker, line per family
FAMILY_COLOURS = {"top-1": "tab:blue", "top-2": "tab:orange", "top-k + shared": "tab:green"}


def _log2_axis(ax, experts: list[int]) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(experts))))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _setting(study: Study) -> str:
    b = study.base
    return f"{b.tokens_per_step:,} tokens/step, optim.schedule={b.schedule}, equal training FLOPs per token"


def loss_vs_experts_figure(study: Study):
    plt = _pyplot()
    n = len(study.budgets)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.4), squeeze=False, layout="constrained")
    experts = sorted({r["experts"] for r in study.rows})
    for ax, steps in zip(axes[0], study.budgets):
        rows = [r for r in study.rows if r["budget_steps"] == steps]
        dense = next((r for r in rows if r["family"] == "dense"), None)
        for fam, (marker, ls) in STYLE.items():
            pts = sorted((r["experts"], r["val_loss"], r["twin"]) for r in rows if r["family"] == fam)
            if fam != "top-k + shared" and dense is not None and pts:
                pts = [(1, dense["val_loss"], "dense")] + pts  # E = 1 is the dense twin
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ls=ls if fam != "top-k + shared" else "none",
                    color=FAMILY_COLOURS[fam], ms=5, lw=1.5, label=fam)
            if fam == "top-k + shared":
                for e, y, name in pts:
                    ax.annotate(name.removeprefix("moe_"), (e, y), xytext=(4, -10), textcoords="offset points", fontsize=7)
        if dense is not None:
            ax.axhline(dense["val_loss"], color="black", ls=":", lw=1)
            ax.annotate(f"dense {dense['val_loss']:.3f}", (0, dense["val_loss"]), xycoords=("axes fraction", "data"),
                        xytext=(4, 3), textcoords="offset points", fontsize=7)
        _log2_axis(ax, experts)
        ax.set_xlabel("experts E (routed, per sparse layer)")
        ax.set_title(f"{steps} steps ({steps * study.base.tokens_per_step / 1e6:.2f}M tokens)", fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("validation loss [nats/token]")
    axes[0][0].legend(fontsize=8, title="markers: runs", title_fontsize=7)
    fig.suptitle(f"{study.root.name}: validation loss vs experts\n{_setting(study)}", fontsize=10)
    return fig


def _colour(e: int, emax: int):
    import matplotlib

    return matplotlib.colormaps["viridis"](math.log2(max(e, 2)) / max(math.log2(max(emax, 4)), 1.0) * 0.9)


def multiplier_figure(study: Study):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    twins = {t.name: t for t in study.twins}
    emax = max(t.experts for t in study.twins)
    for ax, idx, what in ((axes[0], 1, "FLOP multiplier"), (axes[1], 2, "time multiplier (measured, loaded machine)")):
        for name, pts in study.curves.items():
            t = twins[name]
            xs = [p[0] for p in pts if p[idx] is not None]
            ys = [p[idx] for p in pts if p[idx] is not None]
            marker, ls = STYLE.get(t.family, ("o", "-"))
            ax.plot(xs, ys, marker=marker, ms=3, ls=ls, lw=1.3, color=_colour(t.experts, emax), label=name)
        ax.axhline(1.0, color="black", ls=":", lw=1)
        ax.axhline(2.0, color="grey", ls=":", lw=1)
        for steps in study.budgets:
            ax.axvline(steps, color="grey", ls="--", lw=0.6, alpha=0.6)
        ax.set_xlabel("training length N [steps] (dense's loss at step N)")
        ax.set_ylabel(what)
        ax.set_xlim(left=0)
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5),
                   title="colour: E; dashed: top-2; dotted: shared", title_fontsize=7)
    fig.suptitle(f"{study.root.name}: how many times fewer FLOPs (seconds) a twin needs to reach dense's loss "
                 f"at step N\n{_setting(study)}", fontsize=10)
    return fig


def balance_figure(study: Study):
    plt = _pyplot()
    # the longest budget among those that most twins reached (a stopped sweep's last budget may hold only a few)
    steps = max(study.budgets, key=lambda n: (sum(r["budget_steps"] == n for r in study.rows), n))
    rows = [r for r in study.rows if r["budget_steps"] == steps and r["family"] != "dense"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    for fam, (marker, ls) in STYLE.items():
        pts = sorted((r["experts"], r["max_load"], r["rows_per_expert_step"]) for r in rows
                     if r["family"] == fam and r["max_load"] is not None)
        if not pts:
            continue
        kw = dict(marker=marker, ls=ls if fam != "top-k + shared" else "none", color=FAMILY_COLOURS[fam], ms=5,
                  label=fam)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], **kw)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], **kw)
    experts = sorted({r["experts"] for r in rows}) or [2]
    axes[0].axhline(1.0, color="black", ls=":", lw=1)
    axes[0].set_ylabel(f"busiest expert / mean, steps {steps // 2}–{steps}")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("rows per expert per step (even load)")
    for ax in axes:
        _log2_axis(ax, experts)
        ax.set_xlabel("experts E")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{study.root.name}: balance and rows per expert at {steps} steps\n{_setting(study)}", fontsize=10)
    return fig


def plot_study(study: Study, out_dir: Path) -> list[Path]:
    """The three figures, PNG and SVG each; their paths."""
    plt = _pyplot()
    paths = _save(plt, loss_vs_experts_figure(study), out_dir, "loss_vs_experts")
    if study.curves:
        paths += _save(plt, multiplier_figure(study), out_dir, "multiplier_vs_steps")
    if any(r["max_load"] is not None for r in study.rows):
        paths += _save(plt, balance_figure(study), out_dir, "balance_vs_experts")
    return paths
