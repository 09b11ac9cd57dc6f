"""The scaling study (experiments/scaling_study.py, scaling_tables.py, scaling_report.py, scaling_plots.py): a real
two-twin sweep trained in two phases (to 2 steps, then resumed to 4) and its report, whose tables must equal
the runs' metrics.jsonl; the trend to 2x on a known line; budgets refused where a schedule makes them invalid."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from experiments.scaling_report import write_report
from experiments.scaling_study import main, run_sweep, sweep_twins, trained_steps
from experiments.scaling_tables import build_study, read_bench, trend_to
from tests.experiments.test_compare import REPO_ROOT, TINY, fake_run

TWINS = ["dense", "moe_e4_k1"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, text_corpus) -> Path:
    root = tmp_path_factory.mktemp("scaling") / "scaling"
    codes = run_sweep(root, TWINS, steps=[2, 4], jobs=2, cwd=REPO_ROOT,
                      overrides=[*TINY, f"data.path={text_corpus}", "trainer.log_interval=1"])
    assert codes == {(t, n): 0 for n in (2, 4) for t in TWINS}, [(root / f"{t}.log").read_text()[-2000:] for t in TWINS]
    return root


def _records(root: Path, twin: str) -> list[dict]:
    return [json.loads(line) for line in (root / twin / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _reach(records: list[dict], target: float) -> float:
    """Where the curve (evaluations after step 0) first gets to target, log-linear in FLOPs: written out here, not
    taken from experiments.compare, so the table is checked against an independent reading of the metrics."""
    pts = [(r["flops"], r["val_loss"]) for r in records if r.get("val_loss") is not None and r["step"] > 0]
    for i, (x, y) in enumerate(pts):
        if y <= target:
            if i == 0:
                return x
            (x0, y0) = pts[i - 1]
            return math.exp(math.log(x0) + (y0 - target) / (y0 - y) * (math.log(x) - math.log(x0)))
    return math.nan


def test_the_sweep_runs_in_phases_and_resumes(sweep):
    for twin in TWINS:
        info = json.loads((sweep / twin / "run.json").read_text())
        assert info["status"] == "finished" and info["config"]["optim"]["schedule"] == "constant"
        assert trained_steps(sweep / twin) == 4
        steps = [r["step"] for r in _records(sweep, twin)]
        assert steps == [0, 1, 2, 3, 4]  # phase 2 continued from step 2's checkpoint: no step twice, none missing
        assert "resumed from" in (sweep / f"{twin}.log").read_text()
    assert run_sweep(sweep, TWINS, steps=[4], cwd=REPO_ROOT) == {(t, 4): 0 for t in TWINS}  # already there: skipped


def test_the_tables_equal_the_metrics(sweep, tmp_path):
    bench = tmp_path / "bench.md"
    bench.write_text("# bare step, demo shapes, 1 thread(s)\n| model | min ms | vs dense (min) | vs dense (median of pairs) |\n"
                     "|---|---:|---:|---:|\n| dense | 10.0 | 1.000x | 1.000x |\n| moe_e4_k1 | 12.5 | 1.250x | 1.300x |\n")
    study = build_study(sweep, [2, 4], bench)
    paths = write_report(study, tmp_path / "out")
    dense, moe = _records(sweep, "dense"), _records(sweep, "moe_e4_k1")
    fpt = {t: json.loads((sweep / t / "run.json").read_text())["flops_per_token"] for t in TWINS}
    rows = {(r["budget_steps"], r["twin"]): r for r in study.rows}
    assert set(rows) == {(n, t) for n in (2, 4) for t in TWINS}
    for n in (2, 4):
        d, m = dense[n], moe[n]  # records are one per step (log_interval=1), step 0 first
        assert d["step"] == m["step"] == n
        assert rows[n, "dense"]["val_loss"] == d["val_loss"] and rows[n, "moe_e4_k1"]["val_loss"] == m["val_loss"]
        assert rows[n, "dense"]["flop_multiplier"] == 1.0
        reach = _reach(moe, d["val_loss"])
        got = rows[n, "moe_e4_k1"]["flop_multiplier"]
        assert (math.isnan(reach) and got is None) or got == pytest.approx(d["flops"] / reach, rel=1e-12)
        if got is not None:
            assert rows[n, "moe_e4_k1"]["time_multiplier_bare"] == pytest.approx(
                got * fpt["moe_e4_k1"] / fpt["dense"] / 1.3, rel=1e-12)
        # 4 x 16 tokens per step, top-1 over 4 experts: 16 rows per expert per step
        assert rows[n, "moe_e4_k1"]["rows_per_expert_step"] == 16 and rows[n, "moe_e4_k1"]["rows_per_expert_budget"] == 16 * n
        loads = [sum(r[f"moe/layer{i}/max_load"] for i in (0, 1)) / 2 for r in moe if n / 2 < r["step"] <= n]
        assert rows[n, "moe_e4_k1"]["max_load"] == pytest.approx(sum(loads) / len(loads), rel=1e-12)
    with (tmp_path / "out" / "study.csv").open() as f:
        csv_rows = {(int(r["budget_steps"]), r["twin"]): r for r in csv.DictReader(f)}
    assert float(csv_rows[4, "moe_e4_k1"]["val_loss"]) == moe[4]["val_loss"]
    md = paths["tables.md"].read_text()
    assert f"| **dense** | 1 | 1 | 0 | {dense[4]['val_loss']:.4f} |" in md
    assert f"| 4 | {moe[2]['val_loss']:.4f} | — | {moe[4]['val_loss']:.4f} | — |" in md  # loss against E
    assert "bare step, demo shapes" in md and "1.30×" in md
    for stem in ("loss_vs_experts", "multiplier_vs_steps", "balance_vs_experts"):
        assert paths[f"{stem}.png"].read_bytes()[:4] == b"\x89PNG" and paths[f"{stem}.svg"].stat().st_size > 0


def test_budgets_are_refused_where_the_schedule_depends_on_the_length(tmp_path):
    for name, moe in (("dense", False), ("moe_e8_k2", True)):
        fake_run(tmp_path, name, [1e9, 2e9, 4e9], [3.0, 2.5, 2.2], moe=moe, max_steps=3, twin=name)
    with pytest.raises(ValueError, match="optim.schedule=.* decays over its own 3 steps"):
        build_study(tmp_path, [2])
    assert build_study(tmp_path).budgets == [3]  # its own length is a budget
    assert main(["report", str(tmp_path / "nowhere")]) == 2


def test_trend_to_the_target_on_a_known_line():
    pts = [(n, 0.5 + 0.25 * math.log(n)) for n in (100, 200, 400, 800)]
    tr = trend_to(pts, target=2.0)
    assert tr["b"] == pytest.approx(0.25) and tr["steps"] == pytest.approx(math.exp(6.0))
    assert math.isinf(trend_to([(n, 1.2) for n in (100, 200, 400)])["steps"])  # flat: never
    assert trend_to([(100, 1.0), (200, None)]) is None


def test_bench_tables_are_read_and_bad_ones_named(tmp_path):
    f = tmp_path / "b.md"
    f.write_text("| model | min ms | vs dense (min) | vs dense (median of pairs) |\n| dense | 1 | 1.000x | 1.000x |\n"
                 "| moe_e8_k2 | 2 | 1.100x | 1.150x |\n")
    assert read_bench(f)[1] == {"dense": 1.0, "moe_e8_k2": 1.15}
    f.write_text("nothing\n")
    with pytest.raises(ValueError, match="no '\\| model"):
        read_bench(f)


def test_the_experiment_lists_the_study_twins():
    twins = sweep_twins()
    assert twins[0] == "dense" and {f"moe_e{e}_k{k}" for e in (2, 4, 8, 16, 32, 64) for k in (1,)} <= set(twins)
    assert {f"moe_e{e}_k2" for e in (4, 8, 16, 32, 64, 128, 256)} | {"moe_e64_k8_s1", "moe_e256_k8_s1"} <= set(twins)
