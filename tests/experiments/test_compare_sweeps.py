"""What experiments.compare makes of a sweep (fake run directories written by hand): rows named by the overrides that
vary and shown as columns, the baseline rule it prints, the timing warnings from run.json's provenance, symlinked
run directories, step-0 starts, and the figures (PNG and SVG, one colour scale for every expert-load heat map)."""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest

from experiments.compare import build_report, write_report
from experiments.compare_runs import parse_overrides
from experiments.eval_file import write_eval_file
from tests.experiments.test_compare import DENSE_F, dense_loss, fake_run

COMMON = ["model=tiny_moe", "data.tokenizer=byte", "trainer.max_steps=5", "data.path=/data/corpus.txt"]


def routing_sweep(root: Path, routers=("topk", "switch", "expert_choice"), **kw) -> Path:
    """A `-m routing=...` sweep of MoE runs in Hydra's numbered folders (as before runs were named)."""
    for i, router in enumerate(routers):
        losses = [dense_loss(f) - 0.01 * i for f in DENSE_F]
        fake_run(root, str(i), DENSE_F, losses, moe=True, twin=None, overrides=[f"routing={router}", *COMMON], **kw)
    return root


def test_parse_overrides():
    assert parse_overrides(["routing=switch", "+model.moe.x=1", "++a.b=c=d", "~logger", "-m", "--multirun"]) == \
        {"routing": "switch", "model.moe.x": "1", "a.b": "c=d", "logger": "(deleted)"}


def test_a_routing_sweep_names_its_rows_by_router(tmp_path):
    report = build_report(routing_sweep(tmp_path / "sw"))
    assert report.varied == ["routing"]  # model, data.tokenizer, trainer.max_steps and the path are the same
    assert sorted(r["run"] for r in report.rows) == ["routing=expert_choice", "routing=switch", "routing=topk"]
    assert {r["run"]: r["override:routing"] for r in report.rows}["routing=switch"] == "switch"
    paths = write_report(report, plots=False)
    md = paths["comparison.md"].read_text()
    assert "| run | routing | experts |" in md and "| routing=switch | switch | 4 |" in md
    with paths["comparison.csv"].open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:2] == ["run", "override:routing"]


def test_varied_keys_leave_out_paths_hydra_and_logging(tmp_path):
    root = tmp_path / "sw"
    for i, (router, steps) in enumerate([("topk", 6), ("switch", 6), ("switch", 12)]):
        fake_run(root, f"job{i}", DENSE_F, [5.0 - i] * 5, moe=True, twin=None,
                 overrides=[f"routing={router}", f"trainer.max_steps={steps}", f"data.path=/c/{i}.txt",
                            f"hydra.run.dir=/r/{i}", f"logger.name=n{i}", f"init_from=/ckpt/{i}", f"tag=a/{i}"])
    report = build_report(root)
    assert report.varied == ["routing", "trainer.max_steps"]
    assert sorted(r.name for r in report.runs) == ["routing=switch,trainer.max_steps=12",
                                                   "routing=switch,trainer.max_steps=6", "routing=topk,trainer.max_steps=6"]


def test_old_runs_read_hydras_overrides_file(tmp_path):
    """Runs written before run.json recorded its overrides: .hydra/overrides.yaml names them, and their time
    columns get the warning that they cannot be checked."""
    root = tmp_path / "sw"
    for i, router in enumerate(("topk", "switch")):
        path = fake_run(root, str(i), DENSE_F, [5.0 - i] * 5, moe=True, twin=None)
        (path / ".hydra").mkdir()
        (path / ".hydra" / "overrides.yaml").write_text(f"- routing={router}\n- trainer.max_steps=5\n")
    report = build_report(root)
    assert [r.name for r in report.runs] == ["routing=switch", "routing=topk"]  # one shape: by name
    assert report.warnings == ["no provenance in run.json for routing=switch, routing=topk (written before it was "
                               "recorded): concurrency and machines cannot be checked for these rows"]


def test_names_fall_back_to_twins_and_directories(tmp_path):
    root = tmp_path / "sw"
    for twin in ("dense", "moe_e8_k2"):
        fake_run(root, twin, DENSE_F, [5.0] * 5, overrides=["experiment=demo", f"twin={twin}"])
    fake_run(root, "same_a", DENSE_F, [5.0] * 5, twin=None, overrides=["experiment=demo", "twin=x", "seed=1"])
    fake_run(root, "same_b", DENSE_F, [5.0] * 5, twin=None, overrides=["experiment=demo", "twin=x", "seed=1"])
    names = {r.rel: r.name for r in build_report(root).runs}
    # seed varies too, so rows are named by both keys; the two identical runs are told apart by their folders
    assert names == {"dense": "twin=dense,seed=(default)", "moe_e8_k2": "twin=moe_e8_k2,seed=(default)",
                     "same_a": "same_a", "same_b": "same_b"}


def test_a_twin_sweep_keeps_the_twin_names(tmp_path):
    root = tmp_path / "demo"
    for twin in ("dense", "moe_e8_k2", "moe_e16_k2"):
        fake_run(root, twin, DENSE_F, [5.0] * 5, moe=twin != "dense", experts={"dense": 4, "moe_e8_k2": 8, "moe_e16_k2": 16}[twin],
                 overrides=["experiment=demo", f"twin={twin}"])
    report = build_report(root)
    assert [r.name for r in report.runs] == ["dense", "moe_e8_k2", "moe_e16_k2"] and report.varied == ["twin"]
    assert report.baseline_rule == "the run with twin=dense"


# ------------------------------------------------------------------------------------------ the baseline rule


def test_baseline_rule_dense_model_then_default_router_then_first(tmp_path):
    root = tmp_path / "a"
    fake_run(root, "moe", DENSE_F, [4.0] * 5, moe=True, twin=None, overrides=["model=tiny_moe"])
    fake_run(root, "big", DENSE_F, [4.0] * 5, twin=None, overrides=["model=gpt3_small"], params_total=9000)
    fake_run(root, "small", DENSE_F, [4.5] * 5, twin=None, overrides=["model=tiny_dense"])
    report = build_report(root)
    assert report.baseline.name == "model=tiny_dense"
    assert report.baseline_rule == "the smallest of the 2 runs without sparse layers"

    root = tmp_path / "b"
    fake_run(root, "0", DENSE_F, [4.0] * 5, moe=True, twin=None, overrides=["routing=switch"])
    fake_run(root, "1", DENSE_F, [4.0] * 5, moe=True, twin=None, overrides=["trainer.max_steps=5"])
    report = build_report(root)
    assert report.baseline.rel == "1" and "default router" in report.baseline_rule
    assert report.rows[0]["override:routing"] == "(default)"

    report = build_report(routing_sweep(tmp_path / "c"))
    assert report.baseline.name == "routing=expert_choice"  # the first in the table's order (by name here)
    assert "first row" in report.baseline_rule and "--baseline NAME" in report.baseline_rule
    assert build_report(tmp_path / "c", baseline="routing=switch").baseline.rel == "1"  # by override
    assert build_report(tmp_path / "c", baseline="2").baseline.name == "routing=expert_choice"  # by folder


def test_the_rule_is_printed(tmp_path, capsys):
    from experiments.compare import main

    assert main([str(routing_sweep(tmp_path / "sw")), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "Baseline routing=expert_choice (no dense run and no default router: the first row" in out
    assert "varied: `routing`" in out


# ------------------------------------------------------------------------------------------ time columns


def machine(host="node1", cpu="Xeon", start="2026-12-01T10:00:00+00:00", end="2026-12-01T10:10:00+00:00", load=0.5):
    return {"host": host, "cpu": {"model": cpu, "count": 2, "usable": 2}, "gpus": [], "started_at": start,
            "ended_at": end, "load_at_start": [load, load, load]}


def test_concurrent_runs_are_named(tmp_path):
    root = tmp_path / "sw"
    fake_run(root, "dense", DENSE_F, [5.0] * 5, provenance=machine(), overrides=["twin=dense"])
    fake_run(root, "moe_e8_k1", DENSE_F, [5.0] * 5, provenance=machine(start="2026-12-01T10:09:00+00:00",
             end="2026-12-01T10:20:00+00:00"), overrides=["twin=moe_e8_k1"])
    fake_run(root, "moe_e8_k2", DENSE_F, [5.0] * 5, provenance=machine(start="2026-12-01T10:20:00+00:00",
             end="2026-12-01T10:30:00+00:00"), overrides=["twin=moe_e8_k2"])  # starts as the last one ends: fine
    report = build_report(root)
    assert report.warnings == ["concurrent runs: dense with moe_e8_k1 overlapped in wall-clock time on one machine, "
                               "so their seconds (tokens/s, loss @ base time, time multiplier) include sharing it"]
    md = write_report(report, plots=False)["comparison.md"].read_text()
    assert "⚠ concurrent runs: dense with moe_e8_k1" in md


def test_different_machines_and_busy_starts_are_named(tmp_path):
    root = tmp_path / "sw"
    fake_run(root, "dense", DENSE_F, [5.0] * 5, provenance=machine(), overrides=["twin=dense"])
    fake_run(root, "moe_e8_k1", DENSE_F, [5.0] * 5, overrides=["twin=moe_e8_k1"],
             provenance=machine(host="node2", start="2026-12-01T10:05:00+00:00", load=7.5))  # overlaps, elsewhere
    warnings = build_report(root).warnings
    assert warnings == ["different machines: dense on node1 (Xeon; no GPU); moe_e8_k1 on node2 (Xeon; no GPU); "
                        "seconds compare only within one machine",
                        "busy machine at start: moe_e8_k1 (load 7.5 on 2 CPUs); other work shared the CPUs"]


def test_runs_of_different_commits_or_dirty_trees_are_named(tmp_path):
    root = tmp_path / "sw"
    same = {"commit": "a" * 40, "dirty": False}
    fake_run(root, "dense", DENSE_F, [5.0] * 5, provenance={**machine(), "git": same}, overrides=["twin=dense"])
    fake_run(root, "moe_e8_k1", DENSE_F, [5.0] * 5, overrides=["twin=moe_e8_k1"],
             provenance={**machine(start="2026-12-01T10:10:00+00:00", end="2026-12-01T10:20:00+00:00"), "git": same})
    assert build_report(root).warnings == []  # one commit, clean: nothing to say
    fake_run(root, "moe_e8_k2", DENSE_F, [5.0] * 5, overrides=["twin=moe_e8_k2"],
             provenance={**machine(start="2026-12-01T10:20:00+00:00", end="2026-12-01T10:30:00+00:00"),
                         "git": {"commit": "b" * 40, "dirty": True}})
    assert build_report(root).warnings == [
        "different code: dense, moe_e8_k1 at aaaaaaa; moe_e8_k2 at bbbbbbb with uncommitted changes; their seconds "
        "and losses may differ by the code, not only the model"]


# ------------------------------------------------------------------------------------------ directories, step 0


def test_symlinked_run_directories_are_followed_once(tmp_path):
    elsewhere = tmp_path / "scratch"
    fake_run(elsewhere, "moe_e8_k1", DENSE_F, [4.0] * 5, moe=True)
    root = tmp_path / "sw"
    fake_run(root, "dense", DENSE_F, [dense_loss(f) for f in DENSE_F])
    os.symlink(elsewhere / "moe_e8_k1", root / "moe_e8_k1")
    os.symlink(root, root / "dense" / "loop")  # a link back up must not loop
    rec = {"checkpoint": str(elsewhere / "moe_e8_k1" / "checkpoints" / "step_5"), "run_dir": str(root / "moe_e8_k1"),
           "step": 5, "nats_per_token": 1.25, "bits_per_byte": 1.8, "data": {"text_fingerprint": "t", "split": "val"}}
    write_eval_file(elsewhere / "moe_e8_k1", [rec])  # eval.json inside the linked run is found too
    report = build_report(root)
    assert sorted(r.name for r in report.runs) == ["dense", "moe_e8_k1"]
    assert {r["run"]: r["eval_nats_per_token"] for r in report.rows} == {"dense": None, "moe_e8_k1": 1.25}


def test_init_from_runs_show_their_start(tmp_path):
    root = tmp_path / "uvd"
    fake_run(root, "dense", DENSE_F, [3.0, 2.9, 2.8, 2.7, 2.6], start_loss=3.1, twin=None, init_from="/i/dense",
             overrides=["init_from=/i/dense"])
    fake_run(root, "upcycled", DENSE_F, [3.0, 2.8, 2.6, 2.5, 2.4], start_loss=3.1, moe=True, twin=None,
             init_from="/i/upcycled", overrides=["init_from=/i/upcycled"])
    report = build_report(root)
    assert [r.name for r in report.runs] == ["dense", "upcycled"] and report.varied == []  # a path names no row
    assert report.baseline.name == "dense" and report.from_checkpoint
    assert [r["start_val_loss"] for r in report.rows] == [3.1, 3.1]
    assert report.baseline.curve[0]["step"] == 1  # the multipliers' curve stays on log-safe points
    md = write_report(report, plots=False)["comparison.md"].read_text()
    dense_row = next(line for line in md.splitlines() if line.startswith("| **dense** |"))
    assert "val loss @ step 0" in md and "| 3.1000 | 2.6000 |" in dense_row  # the start, then the final loss


# ------------------------------------------------------------------------------------------ figures


def test_figures_are_png_and_svg_with_readable_axes(tmp_path):
    pytest.importorskip("matplotlib")
    from experiments.compare_plots import curves_figure

    root = tmp_path / "sw"
    fake_run(root, "dense", DENSE_F, [dense_loss(f) for f in DENSE_F], start_loss=6.0, overrides=["twin=dense"],
             max_steps=5)
    fake_run(root, "moe_e4_k1", DENSE_F, [dense_loss(f) - 0.1 for f in DENSE_F], start_loss=6.0, moe=True,
             overrides=["twin=moe_e4_k1"], max_steps=5)
    report = build_report(root)
    paths = write_report(report)
    for stem in ("loss_vs_flops", "loss_vs_time", "expert_load"):
        assert paths[f"{stem}.png"].read_bytes()[:4] == b"\x89PNG"
        assert b"<svg" in paths[f"{stem}.svg"].read_bytes()[:1000]
    fig, ax = curves_figure(report, "flops")
    assert ax.get_xscale() == "linear" and ax.get_xlim()[0] == 0  # drawn from step 0
    assert ax.get_xlabel() == "training FLOPs" and ax.get_ylabel() == "loss [nats/token]"
    assert ax.lines[0].get_xdata()[0] == 0 and ax.lines[0].get_marker() == "o"  # every evaluation a marker
    assert len(ax.lines[0].get_xdata()) == 6  # step 0 and the five evaluations
    assert "sw: validation loss vs training FLOPs" in ax.get_title() and "5 steps" in ax.get_title()
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert any(label.endswith("T") for label in labels)  # SI suffixes: 1e13 FLOPs reads 10T
    fig, ax = curves_figure(report, "elapsed_s")
    assert ax.get_xlabel() == "training time [s]" and "evaluation time excluded" in ax.get_title()


def test_log_axis_only_over_decades_without_step_0(tmp_path):
    pytest.importorskip("matplotlib")
    from experiments.compare_plots import curves_figure

    root = tmp_path / "sw"
    flops = [1e9 * 10 ** i for i in range(5)]  # four decades
    fake_run(root, "dense", flops, [dense_loss(f) for f in flops])
    fig, ax = curves_figure(build_report(root), "flops")
    assert ax.get_xscale() == "log"
    ticks = [t for t in ax.get_xticks() if flops[0] <= t <= flops[-1]]
    assert len(ticks) >= 9  # 1, 2 and 5 in every decade, not one label per decade


def test_expert_load_heat_maps_share_one_colour_scale(tmp_path):
    pytest.importorskip("matplotlib")
    from experiments.compare_plots import expert_load_figure

    root = tmp_path / "sw"
    fake_run(root, "moe_e4_k1", DENSE_F, [4.0] * 5, moe=True)  # shares up to 0.4 of 4 experts: load 1.6
    fake_run(root, "moe_e8_k1", DENSE_F, [4.0] * 5, moe=True, experts=8)  # 40 of 200 tokens on 8: load 1.6
    fig, meshes, bar = expert_load_figure(build_report(root, baseline="moe_e4_k1"))
    assert len(meshes) == 2 and meshes[0].get_clim() == meshes[1].get_clim() == (0.0, 2.0)
    assert meshes[0].norm is meshes[1].norm and bar.mappable is meshes[0]  # one norm, one colour bar
    assert sum(1 for a in fig.axes if a.get_label() == "<colorbar>") == 1
    assert bar.ax.get_ylabel() == "expert load / mean (1 = even share)"
    assert fig.axes[0].get_ylabel() == "max expert load / mean"
    heat = meshes[0].get_array().reshape(4, 5)  # [experts, steps]
    assert heat[:, 0].tolist() == pytest.approx([0.4, 0.8, 1.2, 1.6]) and math.isclose(heat[:, 0].sum(), 4.0)


def test_one_run_directory_is_named_by_its_folder(tmp_path):
    run = fake_run(tmp_path, "my_run", DENSE_F, [dense_loss(f) for f in DENSE_F], twin=None)
    report = build_report(run)
    assert [r.name for r in report.runs] == ["my_run"] and report.baseline.rel == "."
    assert build_report(run, baseline="my_run").baseline.name == "my_run"
