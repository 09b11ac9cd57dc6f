"""The scaling study's numbers (experiments/scaling_study.py report): one row per (budget, twin) of a sweep of
FLOP-matched twins, the multipliers at every evaluation, the trend to 2x, and the bare-step ratios beside them.

Definitions are experiments.compare's: at a budget of N steps the baseline (dense) has validation loss L*(N) after
F*(N) training FLOPs and T*(N) seconds; a twin's FLOP (time) multiplier is F*(N) / F(L*(N)) (T*(N) / T(L*(N))),
where F(L) is where the twin's validation curve first reaches L, log-linear between the bracketing evaluations
(experiments.compare.multiplier). A twin's curve is read in full (a constant-LR run's prefix is a shorter run),
so a multiplier below 1 (the twin needs more than N steps) is a number, not "not reached".

Routing statistics (the runs' metrics.jsonl, moe/layer{i}/...): max_load is the busiest expert's rows over the mean
(1 = even), averaged over the layers and over the logged steps in (N/2, N] (after warm-up); dead is the number of
experts that received no row in a logged step, summed over layers, averaged alike. Rows per expert: the routed
rows an expert gets per step at an even load, tokens_per_step * k / E, and over the whole budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from experiments.compare import SLACK, interp_at, multiplier
from experiments.compare_runs import Run, find_runs

TARGET = 2.0  # the FLOP multiplier the issue asks for (issue 16's target)
MIN_TREND_STEP = 100  # multipliers before this many steps are left out of the trend (warm-up, unigram phase)


@dataclass
class Twin:
    """What a row needs of one run."""
    run: Run
    family: str  # "dense", "top-1", "top-2", "top-k + shared" (fine-grained with shared experts)
    experts: int  # E routed experts per sparse layer (1 for dense: the Switch Transformer's E = 1 point)
    top_k: int  # k experts chosen per token (1 for dense)
    shared: int  # s shared experts per sparse layer
    tokens_per_step: int  # trainer.batch_size * seq_len * grad_accum
    schedule: str  # optim.schedule of the run
    max_steps: int  # trainer.max_steps of the run

    @property
    def trained(self) -> int:
        """The last evaluated step (a stopped constant-LR run is read up to it)."""
        return int(self.run.curve[-1]["step"]) if self.run.curve else 0

    @property
    def name(self) -> str:
        return self.run.name  # the twin's (build_study)

    @property
    def fpt(self) -> float:
        return float(self.run.info.get("flops_per_token") or 0.0)


@dataclass
class Study:
    root: Path
    twins: list[Twin]  # finished runs, dense first, then by family and E
    base: Twin  # the dense twin
    budgets: list[int]  # steps at which the tables are read
    rows: list[dict[str, Any]]  # one per (budget, twin): see budget_row
    curves: dict[str, list[tuple[int, Optional[float], Optional[float]]]]  # twin -> (N, FLOP mult, time mult) at every evaluation
    bench: dict[str, float] = field(default_factory=dict)  # twin -> bare-step time ratio against dense (median of pairs)
    bench_header: str = ""  # experiments.bench_step's first line (machine, threads, date, load)
    left_out: list[str] = field(default_factory=list)  # runs not in the study and why


def twin_of(run: Run) -> Twin:
    moe = run.model.get("moe") or {}
    trainer = run.config.get("trainer") or {}
    tokens = int(trainer.get("batch_size", 0)) * int(trainer.get("seq_len", 0)) * int(trainer.get("grad_accum", 1))
    schedule = str((run.config.get("optim") or {}).get("schedule", "cosine"))
    if not run.is_moe:
        return Twin(run, "dense", 1, 1, 0, tokens, schedule, int(run.max_steps or 0))
    e, k = int(moe.get("num_experts", 0)), int((moe.get("router") or {}).get("top_k", 0))
    s = int(moe.get("num_shared_experts") or 0)
    family = "top-k + shared" if s else f"top-{k}"
    return Twin(run, family, e, k, s, tokens, schedule, int(run.max_steps or 0))


FAMILIES = ("dense", "top-1", "top-2", "top-k + shared")


def _order(t: Twin) -> tuple:
    fam = FAMILIES.index(t.family) if t.family in FAMILIES else len(FAMILIES)
    return fam, t.top_k, t.experts, t.shared, t.name


def _point_at(run: Run, step: int) -> Optional[dict[str, float]]:
    return next((p for p in run.curve if int(p["step"]) == step), None)


def readable_budget(t: Twin, steps: int) -> Optional[str]:
    """None when the run can be read at `steps`, else why not."""
    if steps > t.trained:
        return f"evaluated up to step {t.trained}, before {steps}"
    if steps != t.max_steps and t.schedule != "constant":
        return (f"optim.schedule={t.schedule} decays over its own {t.max_steps} steps, so its first {steps} steps are "
                f"not a {steps}-step run; read it only at {t.max_steps} (or train with optim.schedule=constant)")
    if _point_at(t.run, steps) is None:
        return f"no evaluation at step {steps} (trainer.eval_interval must divide it)"
    return None


def routing_stats(run: Run, steps: int) -> dict[str, Optional[float]]:
    """max_load and dead (see the module docstring) over the logged steps in (steps/2, steps]."""
    recs = [r for r in run.records if steps / 2 < r.get("step", 0) <= steps]
    loads, dead = [], []
    for r in recs:
        ml = [v for k, v in r.items() if k.startswith("moe/layer") and k.endswith("/max_load") and v is not None]
        dd = [v for k, v in r.items() if k.startswith("moe/layer") and k.endswith("/dead_experts") and v is not None]
        if ml:
            loads.append(sum(ml) / len(ml))
        if dd:
            dead.append(float(sum(dd)))
    mean = (lambda xs: sum(xs) / len(xs) if xs else None)
    worst = [max(v for k, v in r.items() if k.endswith("/max_load")) for r in recs if any(k.endswith("/max_load") for k in r)]
    return {"max_load": mean(loads), "max_load_worst": max(worst) if worst else None, "dead_experts": mean(dead)}


def _curve(run: Run, key: str) -> tuple[list[float], list[float]]:
    return [p[key] for p in run.curve], [p["val_loss"] for p in run.curve]


def multipliers_at(t: Twin, base: Twin, steps: int) -> dict[str, Any]:
    """The FLOP and time multipliers of t against dense's loss at `steps` (1.0 for dense itself)."""
    b = _point_at(base.run, steps)
    assert b is not None  # readable_budget checked it
    if t is base:
        return {"flops_to_base_loss": b["flops"], "flop_multiplier": 1.0, "flop_reach": "baseline",
                "time_to_base_loss": b["elapsed_s"], "time_multiplier": 1.0, "time_reach": "baseline"}
    out: dict[str, Any] = {}
    for kind, key, budget in (("flop", "flops", b["flops"]), ("time", "elapsed_s", b["elapsed_s"])):
        x, m, how = multiplier(budget, b["val_loss"], *_curve(t.run, key))
        out.update({f"{'flops' if kind == 'flop' else 'time'}_to_base_loss": x, f"{kind}_multiplier": m,
                    f"{kind}_reach": how})
    return out


def budget_row(t: Twin, base: Twin, steps: int, bench: dict[str, float]) -> dict[str, Any]:
    p = _point_at(t.run, steps)
    b = _point_at(base.run, steps)
    assert p is not None and b is not None
    rows_step = t.tokens_per_step * t.top_k / t.experts if t.family != "dense" else float(t.tokens_per_step)
    row: dict[str, Any] = {
        "budget_steps": steps, "twin": t.name, "family": t.family, "experts": t.experts, "top_k": t.top_k,
        "shared": t.shared, "params_total": t.run.info.get("params_total"), "flops_per_token": t.fpt,
        "val_loss": p["val_loss"], "loss_vs_dense": p["val_loss"] - b["val_loss"],
        "loss_at_base_flops": interp_at(*_curve(t.run, "flops"), b["flops"], SLACK),
        "tokens_per_s": p["tokens"] / p["elapsed_s"] if p["elapsed_s"] else None,
        "rows_per_expert_step": rows_step, "rows_per_expert_budget": rows_step * steps,
        **multipliers_at(t, base, steps), **routing_stats(t.run, steps),
    }
    ratio = bench.get(t.name)
    row["bare_step_ratio"] = ratio
    m = row["flop_multiplier"]
    # equal FLOPs per token to 1%: steps to L* = F(L*) / (tokens * fpt), seconds = steps * step time
    row["time_multiplier_bare"] = (m * (t.fpt / base.fpt) / ratio if m is not None and ratio and base.fpt else None)
    return row


def multiplier_curves(twins: list[Twin], base: Twin) -> dict[str, list[tuple[int, Optional[float], Optional[float]]]]:
    """twin -> (N, FLOP multiplier, time multiplier) at every step N where dense was evaluated and every
    prefix is a run (constant schedules; otherwise only the runs' own length)."""
    out = {}
    for t in twins:
        if t is base:
            continue
        pts = []
        for p in base.run.curve:
            n = int(p["step"])
            if readable_budget(base, n) is None and readable_budget(t, n) is None:
                m = multipliers_at(t, base, n)
                pts.append((n, m["flop_multiplier"], m["time_multiplier"]))
        out[t.name] = pts
    return out


def trend_to(points: Sequence[tuple[int, Optional[float]]], target: float = TARGET,
             min_step: int = MIN_TREND_STEP) -> Optional[dict[str, float]]:
    """A least-squares line m = a + b ln N through the (N, m) points from the later half of the steps (N >= the
    median step and >= min_step); where it reaches `target`: {"a", "b", "steps", "from", "to"}. None with fewer
    than 3 such points; steps = inf when the slope is not positive (the trend never gets there)."""
    pts = [(n, m) for n, m in points if m is not None and n >= min_step]
    if len(pts) < 3:
        return None
    mid = sorted(n for n, _ in pts)[len(pts) // 2]
    pts = [(n, m) for n, m in pts if n >= mid] if len([1 for n, _ in pts if n >= mid]) >= 3 else pts
    xs, ys = [math.log(n) for n, _ in pts], [m for _, m in pts]
    xm, ym = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - xm) ** 2 for x in xs)
    b = sum((x - xm) * (y - ym) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = ym - b * xm
    steps = math.exp((target - a) / b) if b > 0 else math.inf
    return {"a": a, "b": b, "steps": steps, "from": float(pts[0][0]), "to": float(pts[-1][0])}


def read_bench(path: Path) -> tuple[str, dict[str, float]]:
    """experiments.bench_step's printed table: (its header line, twin -> 'vs dense (median of pairs)')."""
    if not path.is_file():
        raise FileNotFoundError(f"--bench {path}: no such file; save `python -m experiments.bench_step --twins ...` there")
    header, ratios = "", {}
    for line in path.read_text().splitlines():
        if line.startswith("# bare step"):
            header = line.lstrip("# ")
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[3].endswith("x") and not cells[0].startswith("part"):
            try:
                ratios[cells[0]] = float(cells[3].rstrip("x"))
            except ValueError:
                continue
    if not ratios:
        raise ValueError(f"--bench {path}: no '| model | min ms | vs dense (min) | vs dense (median of pairs) |' "
                         f"rows; save the output of python -m experiments.bench_step")
    return header, ratios


def readable_prefix(run: Run) -> bool:
    """Whether an unfinished run (stopped, preempted, still running) can be read up to its last evaluation: only
    with a constant learning rate, whose every prefix is a shorter run."""
    status_ok = run.status in ("running", "preempted", "interrupted")
    return status_ok and bool(run.curve) and (run.config.get("optim") or {}).get("schedule") == "constant"


def build_study(root: str | Path, budgets: Optional[Sequence[int]] = None, bench: Optional[Path] = None) -> Study:
    """Reads the sweep below root; budgets None: the dense run's own length only."""
    runs, _ = find_runs(root)
    for r in runs:  # named by twin: the report's names also carry trainer.max_steps, which the phases vary
        r.name = str(r.info.get("twin") or r.name)
    done = [r for r in runs if r.problem is None or readable_prefix(r)]
    left_out = [f"{r.name}: {r.problem}" for r in runs if r not in done]
    left_out += [f"{r.name}: read up to its last evaluation, step {int(r.curve[-1]['step'])} ({r.problem})"
                 for r in done if r.problem]
    twins = sorted((twin_of(r) for r in done), key=_order)
    dense = [t for t in twins if t.family == "dense"]
    if not dense:
        raise ValueError(f"no finished dense run in {str(root)!r}: the study measures every twin against twin=dense; "
                         f"train it (python -m experiments.scaling_study run --twins dense)")
    base = dense[0]
    fps = {r.info.get("data_fingerprint") for r in done}
    if len(fps) > 1:
        raise ValueError(f"the runs in {str(root)!r} were trained on different data ({sorted(map(str, fps))}); "
                         f"one study reads one sweep")
    budgets = sorted(set(budgets or [base.max_steps]))
    header, ratios = read_bench(Path(bench)) if bench else ("", {})
    rows = []
    for n in budgets:
        why = readable_budget(base, n)
        if why:
            raise ValueError(f"--budgets {n}: the dense run cannot be read there ({why})")
        for t in twins:
            why = readable_budget(t, n)
            if why is None:
                rows.append(budget_row(t, base, n, ratios))
            else:
                left_out.append(f"{t.name} at {n} steps: {why}")
    return Study(Path(root), twins, base, budgets, rows, multiplier_curves(twins, base), ratios, header, left_out)
