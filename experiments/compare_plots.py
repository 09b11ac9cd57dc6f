"""The figures of a sweep's report (experiments.compare), each written as PNG and SVG:

  loss_vs_flops   validation loss (a marker at every evaluation) against training FLOPs
  loss_vs_time    the same against training seconds (evaluation and checkpointing excluded)
  expert_load     per MoE run: the busiest expert's load over the mean, per sparse layer, over training; and every
                  expert's load over the mean as a heat map, all runs on one colour scale with one colour bar

Axes read as plain numbers: SI suffixes for FLOPs (2.5T), plain seconds; a log axis (ticks at 1, 2, 5 per decade)
only when the curves span more than two decades and no curve is drawn from step 0. Curves include step 0 when the
runs evaluated it (trainer.eval_at_start, always so for init_from runs), and the baseline's starting loss is marked.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from experiments.compare import Report
    from experiments.compare_runs import Run

FORMATS = ("png", "svg")  # every figure in both: PNG for the README, SVG for a paper
LOG_SPAN = 100.0  # curves whose x values span more than this factor get a log axis


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the comparison plots need matplotlib: pip install 'switchyard-moe[plots]' "
                          "(or pass --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out_dir: Path, stem: str) -> list[Path]:
    paths = []
    for fmt in FORMATS:
        path = out_dir / f"{stem}.{fmt}"
        fig.savefig(path, dpi=150)
        paths.append(path)
    plt.close(fig)
    return paths


def _points(run: Run, key: str) -> tuple[list[float], list[float]]:
    """The run's validation curve against `key`, from step 0 when it was evaluated there."""
    pts = ([run.start] if run.start else []) + run.curve
    return [p[key] for p in pts], [p["val_loss"] for p in pts]


def _x_axis(ax, key: str, xs: list[float], from_zero: bool) -> None:
    """Linear from 0, or log with 1-2-5 ticks when the values span more than LOG_SPAN; readable tick labels."""
    from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, NullFormatter

    fmt = EngFormatter(sep="") if key == "flops" else FuncFormatter(lambda v, _: f"{v:g}")
    positive = [x for x in xs if x > 0]
    if not from_zero and positive and max(positive) / min(positive) > LOG_SPAN:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_xlim(left=0)
    ax.xaxis.set_major_formatter(fmt)


def curves_figure(report: Report, key: str):
    """The validation-loss figure against `key` ("flops" or "elapsed_s"); returns (figure, axes)."""
    plt = _pyplot()
    what = {"flops": "training FLOPs", "elapsed_s": "training time [s]"}[key]
    budget = report.budget_flops if key == "flops" else report.budget_s
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    from_zero = any(r.start for r in report.runs)
    all_x, all_y = [], []
    for r in report.runs:
        base = r is report.baseline
        xs, ys = _points(r, key)
        ax.plot(xs, ys, marker="o", ms=3.5, lw=2.2 if base else 1.4, color="black" if base else None,
                        label=r.name + (" (baseline)" if base else ""), zorder=3 if base else 2)
        all_x += xs
        all_y += ys
    ax.axhline(report.target_loss, color="grey", ls=":", lw=1)
    ax.axvline(budget, color="grey", ls=":", lw=1)
    start = report.baseline.start
    if start is not None:  # where the baseline began: an init_from run's checkpoint, or the untrained model
        ax.axhline(start["val_loss"], color="black", ls="--", lw=0.8, alpha=0.6)
        ax.annotate(f"baseline at step 0: {start['val_loss']:.3f}", (0, start["val_loss"]), xycoords=("axes fraction", "data"),
                    xytext=(4, 3), textcoords="offset points", fontsize=7, alpha=0.8)
    ax.annotate(f"L* = {report.target_loss:.3f} (baseline's final)", (0, report.target_loss),
                xycoords=("axes fraction", "data"), xytext=(4, 3), textcoords="offset points", fontsize=7, color="grey")
    low, high = min(all_y), max(all_y)
    pad = 0.06 * (high - low or 1.0)
    ax.set_ylim(low - pad, high + pad)
    _x_axis(ax, key, all_x, from_zero)
    ax.set_xlabel(what)
    ax.set_ylabel("loss [nats/token]")
    note = "; evaluation time excluded" if key == "elapsed_s" else ""
    ax.set_title(f"{report.sweep_name}: validation loss vs {what.split(' [')[0]}\n{report.setting}{note}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, title="markers: evaluations", title_fontsize=7)
    fig.tight_layout()
    return fig, ax


def plot_curves(report: Report, out_dir: Path) -> list[Path]:
    plt = _pyplot()
    paths = []
    for key, stem in (("flops", "loss_vs_flops"), ("elapsed_s", "loss_vs_time")):
        fig, _ = curves_figure(report, key)
        paths += _save(plt, fig, out_dir, stem)
    return paths


# ------------------------------------------------------------------------------------------ expert load


def _layers(records: list[dict[str, Any]], stat: str) -> list[int]:
    found = set()
    for r in records:
        for k in r:
            if k.startswith("moe/layer") and k.endswith("/" + stat):
                found.add(int(k.split("/")[1].removeprefix("layer")))
    return sorted(found)


def load_matrix(run: Run):
    """(steps, load, labels): every expert's load over the mean (its share of its layer's assignments times E; 1 is
    an even share) at each logged step, rows layer by layer ([layer*E, steps]); labels (layer, E) per block."""
    import numpy as np

    routed = [rec for rec in run.records  # the training records (the step-0 evaluation routed no training batch)
              if rec["step"] > 0 and any(k.endswith("/tokens_per_expert") for k in rec)]
    rows, labels = [], []
    for layer in _layers(routed, "tokens_per_expert"):
        key = f"moe/layer{layer}/tokens_per_expert"
        counts = [np.asarray(rec[key], dtype=float) for rec in routed if rec.get(key) is not None]
        if not counts or len({c.shape for c in counts}) != 1 or len(counts) != len(routed):
            continue
        mat = np.stack([c / max(float(c.sum()), 1.0) * c.size for c in counts])  # [steps, E]
        rows.append(mat.T)
        labels.append((layer, mat.shape[1]))
    steps = [rec["step"] for rec in routed]
    return steps, (np.concatenate(rows, axis=0) if rows else None), labels


def expert_load_figure(report: Report):
    """The expert-load figure, or None without MoE runs: (figure, the heat maps' meshes, the colour bar). Every heat
    map shares one norm, so one colour means one load in every run."""
    moe_runs = [r for r in report.runs if r.is_moe and _layers(r.records, "max_load")]
    if not moe_runs:
        return None
    plt = _pyplot()
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    mats = {r.name: load_matrix(r) for r in moe_runs}
    peak = max([float(m[1].max()) for m in mats.values() if m[1] is not None] + [2.0])
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=peak)  # white: an even share; blue: idle; red: overloaded
    fig, axes = plt.subplots(len(moe_runs), 2, figsize=(12, 3.0 * len(moe_runs) + 0.8), squeeze=False,
                             layout="constrained")
    meshes = []
    for (ax_l, ax_h), r in zip(axes, moe_runs):
        for layer in _layers(r.records, "max_load"):
            pts = [(rec["step"], rec[f"moe/layer{layer}/max_load"]) for rec in r.records
                   if rec.get(f"moe/layer{layer}/max_load") is not None]
            ax_l.plot(*zip(*pts), marker=".", ms=3, lw=1.2, label=f"layer {layer}")
        ax_l.axhline(1.0, color="grey", ls=":", lw=1)
        ax_l.set_title(f"{r.name}: the busiest expert", fontsize=9)
        ax_l.set_xlabel("training step")
        ax_l.set_ylabel("max expert load / mean")
        ax_l.set_ylim(bottom=0)
        ax_l.legend(fontsize=7, ncol=2)
        ax_l.grid(True, alpha=0.3)
        steps, heat, labels = mats[r.name]
        if heat is None:
            ax_h.set_axis_off()
            continue
        s = np.asarray(steps, dtype=float)  # cell edges halfway between logged steps: uneven intervals stay honest
        mid = (s[1:] + s[:-1]) / 2 if len(s) > 1 else np.array([])
        edges = np.concatenate([[s[0] - (mid[0] - s[0] if len(mid) else 0.5)], mid,
                                [s[-1] + (s[-1] - mid[-1] if len(mid) else 0.5)]])
        meshes.append(ax_h.pcolormesh(edges, np.arange(heat.shape[0] + 1), heat, cmap="RdBu_r", norm=norm,
                                      rasterized=True))  # a bitmap inside the SVG: thousands of cells stay small
        ax_l.set_xlim(edges[0], edges[-1])  # the two panels of a run share their steps
        ax_h.invert_yaxis()
        edge = 0
        ticks, names = [], []
        for layer, n in labels:
            if edge:
                ax_h.axhline(edge, color="black", lw=0.8)
            ticks.append(edge + n / 2)
            names.append(f"layer {layer}")
            edge += n
        ax_h.set_yticks(ticks, names, fontsize=7)
        ax_h.set_title(f"{r.name}: each expert's load (rows: experts by layer)", fontsize=9)
        ax_h.set_xlabel("training step")
    bar = None
    if meshes:
        bar = fig.colorbar(meshes[0], ax=axes[:, 1].tolist(), label="expert load / mean (1 = even share)", shrink=0.9)
    fig.suptitle(f"{report.sweep_name}: expert load over training\n{report.setting}", fontsize=10)
    return fig, meshes, bar


def plot_expert_load(report: Report, out_dir: Path) -> list[Path]:
    """expert_load.png and .svg; [] without MoE runs."""
    made = expert_load_figure(report)
    if made is None:
        return []
    return _save(_pyplot(), made[0], out_dir, "expert_load")
