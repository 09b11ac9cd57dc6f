"""The figures of the dense-versus-sparse report (experiments.compare): validation loss against training FLOPs and
seconds, and each MoE run's expert load over its steps."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from experiments.compare import Report


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the comparison plots need matplotlib: pip install 'switchyard-moe[plots]' "
                          "(or pass --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(report: Report, out_dir: Path) -> list[Path]:
    plt = _pyplot()
    paths = []
    for key, xlabel, fname, budget in (("flops", "training FLOPs", "loss_vs_flops.png", report.budget_flops),
                                       ("elapsed_s", "training seconds (evaluation excluded)", "loss_vs_time.png",
                                        report.budget_s)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in report.runs:
            xs, ys = [p[key] for p in r.curve], [p["val_loss"] for p in r.curve]
            base = r is report.baseline
            ax.plot(xs, ys, marker="o", ms=3, lw=2.2 if base else 1.4, color="black" if base else None,
                    label=r.name + (" (baseline)" if base else ""))
        ax.axhline(report.target_loss, color="grey", ls=":", lw=1)
        ax.axvline(budget, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel + " (log)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"validation loss vs {xlabel.split(' (')[0]}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _layers(records: list[dict[str, Any]], stat: str) -> list[int]:
    found = set()
    for r in records:
        for k in r:
            if k.startswith("moe/layer") and k.endswith("/" + stat):
                found.add(int(k.split("/")[1].removeprefix("layer")))
    return sorted(found)


def plot_expert_load(report: Report, out_dir: Path) -> Optional[Path]:
    """One row per MoE run: max_load of each sparse layer vs step, and a heatmap of each expert's share of its
    layer's assignments (rows: layer/expert, columns: logged steps)."""
    moe_runs = [r for r in report.runs if r.is_moe and _layers(r.records, "max_load")]
    if not moe_runs:
        return None
    plt = _pyplot()
    import numpy as np

    fig, axes = plt.subplots(len(moe_runs), 2, figsize=(12, 3.2 * len(moe_runs)), squeeze=False)
    for (ax_l, ax_h), r in zip(axes, moe_runs):
        for layer in _layers(r.records, "max_load"):
            pts = [(rec["step"], rec[f"moe/layer{layer}/max_load"]) for rec in r.records
                   if rec.get(f"moe/layer{layer}/max_load") is not None]
            ax_l.plot(*zip(*pts), label=f"layer {layer}")
        ax_l.axhline(1.0, color="grey", ls=":", lw=1)
        ax_l.set_title(f"{r.name}: busiest expert / even share")
        ax_l.set_xlabel("step")
        ax_l.set_ylabel("max_load")
        ax_l.legend(fontsize=7, ncol=2)
        ax_l.grid(True, alpha=0.3)
        routed = [rec for rec in r.records if rec["step"] > 0]  # the step-0 evaluation routed no training batch
        rows, labels, steps = [], [], [rec["step"] for rec in routed]
        for layer in _layers(routed, "tokens_per_expert"):
            counts = np.array([rec.get(f"moe/layer{layer}/tokens_per_expert") or [] for rec in routed], dtype=object)
            mat = np.array([np.asarray(c, dtype=float) / max(float(np.sum(c)), 1.0) for c in counts])
            if mat.ndim != 2:
                continue
            rows.append(mat.T)
            labels.append((layer, mat.shape[1]))
        if rows:
            heat = np.concatenate(rows, axis=0)
            im = ax_h.imshow(heat, aspect="auto", interpolation="nearest", cmap="viridis",
                             extent=(steps[0], steps[-1], heat.shape[0], 0))
            fig.colorbar(im, ax=ax_h, label="share of the layer's assignments")
            edge = 0
            for layer, n in labels:
                ax_h.axhline(edge, color="white", lw=0.6)
                ax_h.text(steps[0], edge + n / 2, f" L{layer}", color="white", va="center", fontsize=7)
                edge += n
            ax_h.set_title(f"{r.name}: tokens per expert (rows: layer, expert)")
            ax_h.set_xlabel("step")
            ax_h.set_yticks([])
    fig.tight_layout()
    path = out_dir / "expert_load.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ entry point
