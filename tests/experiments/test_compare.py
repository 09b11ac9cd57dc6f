"""The dense-versus-sparse report (experiments/compare.py) and the sweep around it: the compute multiplier on
synthetic curves with a known answer, a real two-run Hydra multirun sweep (table, CSV and plots equal to the
runs' metrics.jsonl, the sweep's group, its wandb runs read back offline), the launcher and sweeper configs,
and the errors for bad sweep directories."""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from tests.wandb_log import wandb_records
from experiments.compare import build_report, first_reach, interp_at, main, multiplier, write_report
from experiments.hydra_conf import CONFIG_MODULE, register_configs

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model=tiny_dense", "model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.d_ff=64",
    "model.max_seq_len=32", "trainer.batch_size=4", "trainer.seq_len=16", "trainer.eval_batches=2",
    "trainer.progress=false", "trainer.device=cpu", "trainer.log_interval=1", "trainer.eval_interval=2",
    "data=text", "data.tokenizer=byte",
]

register_configs()


def _cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------ synthetic runs


def fake_run(root: Path, name: str, flops: list[float], losses: list[float], *, seconds: list[float] | None = None,
             status: str = "finished", fingerprint: str = "abc", vocab: int = 257, moe: bool = False,
             max_steps: int | None = None, twin: str | None = "", overrides: list[str] | None = None,
             provenance: dict | None = None, start_loss: float | None = None, init_from: str | None = None,
             experts: int = 4, params_total: int | None = None) -> Path:
    """A run directory as experiments.train writes it, with a validation curve of our choosing (twin: the directory
    name unless given; overrides and provenance go into run.json as the trainer writes them; start_loss: a step-0
    evaluation)."""
    path = root / name
    path.mkdir(parents=True)
    seconds = seconds or [f / 1e9 for f in flops]
    fpt = 1000.0
    records = [{"step": i + 1, "tokens": int(f / fpt), "flops": f, "train_loss": l + 0.1, "elapsed_s": s,
                "tokens_per_s": 1.0, "val_loss": l} for i, (f, l, s) in enumerate(zip(flops, losses, seconds))]
    if start_loss is not None:
        records.insert(0, {"step": 0, "tokens": 0, "flops": 0.0, "elapsed_s": 0.0, "val_loss": start_loss})
    if moe:
        for i, r in enumerate(rec for rec in records if rec["step"] > 0):
            r["moe/layer0/max_load"] = 1.5 - 0.1 * i
            r["moe/layer0/tokens_per_expert"] = [10.0 + i, 20.0, 30.0, 40.0 - i] + [25.0] * (experts - 4)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    model = {"moe": {"num_experts": experts, "router": {"top_k": 1}}} if moe else {"moe": {"num_experts": 8}}
    info = {"status": status, "params_total": params_total or (4000 if moe else 1000), "params_active": 1000, "flops_per_token": fpt,
            "data_fingerprint": fingerprint, "vocab_size": vocab, "sparse_layers": [0] if moe else [],
            "twin": name if twin == "" else twin, "group": root.name,
            "config": {"model": model, "init_from": init_from, "trainer": {"max_steps": max_steps or len(flops)}}}
    if overrides is not None or provenance is not None:
        info["provenance"] = {**(provenance or {}), "overrides": overrides or []}
    (path / "run.json").write_text(json.dumps(info))
    return path


A, B = 10.0, 0.25
DENSE_F = [1e12, 2e12, 4e12, 8e12, 1.6e13]


def dense_loss(f: float) -> float:
    return A - B * math.log(f)


def moe_loss(f: float) -> float:  # reaches any loss with 4x fewer FLOPs than the dense curve
    return A - B * math.log(4 * f)


def test_interpolation_is_log_linear():
    xs, ys = [1.0, 100.0], [5.0, 3.0]
    assert interp_at(xs, ys, 10.0) == pytest.approx(4.0)  # halfway in log x
    assert interp_at(xs, ys, 1.0) == 5.0 and interp_at(xs, ys, 100.0) == 3.0
    assert interp_at(xs, ys, 0.5) is None and interp_at(xs, ys, 200.0) is None
    assert interp_at(xs, ys, 100.5) is None and interp_at(xs, ys, 100.5, slack=0.01) == 3.0  # twins' 1% tolerance
    assert interp_at(xs, ys, 102.0, slack=0.01) is None
    assert first_reach(xs, ys, 4.0) == (pytest.approx(10.0), "interpolated")
    assert first_reach(xs, ys, 5.5) == (1.0, "at_first")
    assert first_reach(xs, ys, 2.0) == (None, "not_reached")
    assert first_reach([1, 10, 100], [5, 3, 4], 3.5)[0] == pytest.approx(10 ** 0.75)  # the first crossing counts


def test_multiplier_is_exactly_four_on_known_curves():
    moe_f = [1e12, 3e12, 9e12, 2.7e13]  # the crossing (4e12) falls between two evaluations
    x, m, how = multiplier(DENSE_F[-1], dense_loss(DENSE_F[-1]), moe_f, [moe_loss(f) for f in moe_f])
    assert how == "interpolated"
    assert x == pytest.approx(4e12, rel=1e-12) and m == pytest.approx(4.0, rel=1e-12)


def test_report_on_synthetic_sweep(tmp_path):
    sweep = tmp_path / "synthetic"
    fake_run(sweep, "dense", DENSE_F, [dense_loss(f) for f in DENSE_F], seconds=[f / 1e11 for f in DENSE_F])
    moe_f = [1e12, 3e12, 9e12, 2.7e13]
    # Twice the FLOPs per second of the dense run: 4x fewer FLOPs at half the cost each -> 8x fewer seconds.
    fake_run(sweep, "moe_e4_k1", moe_f, [moe_loss(f) for f in moe_f], seconds=[f / 2e11 for f in moe_f], moe=True)
    fake_run(sweep, "flat", DENSE_F, [9.0] * 5)  # never reaches the dense loss
    fake_run(sweep, "early", [2e13, 4e13], [1.0, 0.5])  # below the target at its first evaluation
    fake_run(sweep, "died", DENSE_F[:2], [dense_loss(f) for f in DENSE_F[:2]], status="running", max_steps=5)
    report = build_report(sweep)
    rows = {r["run"]: r for r in report.rows}
    assert report.baseline.name == "dense" and list(rows)[0] == "dense"
    assert report.target_loss == dense_loss(DENSE_F[-1]) and report.budget_flops == DENSE_F[-1]
    moe = rows["moe_e4_k1"]
    assert moe["flop_multiplier"] == pytest.approx(4.0, rel=1e-12) and moe["flop_reach"] == "interpolated"
    assert moe["time_multiplier"] == pytest.approx(8.0, rel=1e-12)
    assert moe["loss_at_base_flops"] == pytest.approx(moe_loss(DENSE_F[-1]), rel=1e-12)
    assert rows["dense"]["flop_multiplier"] == 1.0 and rows["dense"]["loss_at_base_flops"] == report.target_loss
    assert rows["flat"]["flop_reach"] == "not_reached" and rows["flat"]["flop_multiplier"] is None
    assert rows["early"]["flop_reach"] == "at_first" and rows["early"]["flop_multiplier"] == pytest.approx(1.6e13 / 2e13)
    assert rows["early"]["loss_at_base_flops"] is None  # its curve starts after the dense budget
    assert "died" not in rows and [r.name for r in report.left_out] == ["died"]
    assert "status 'running'" in report.left_out[0].problem and "step 2 of 5" in report.left_out[0].problem
    paths = write_report(report, plots=False)
    md = paths["comparison.md"].read_text()
    assert "not reached" in md and "4.00×" in md and "8.00×" in md and "≥ 0.80×" in md
    assert "died" in md and "log-linearly in FLOPs" in md
    with paths["comparison.csv"].open() as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["dense", "early", "flat", "moe_e4_k1"]  # dense runs first, then MoE
    assert float(table[3]["flop_multiplier"]) == pytest.approx(4.0, rel=1e-12)


# ------------------------------------------------------------------------------------------ bad sweep dirs


def test_missing_and_empty_sweep_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_report(tmp_path / "nowhere")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="no runs in .*empty"):
        build_report(tmp_path / "empty")


def test_no_finished_runs(tmp_path):
    fake_run(tmp_path / "s", "dense", DENSE_F[:2], [5.0, 4.0], status="running")
    fake_run(tmp_path / "s", "moe_e8_k1", DENSE_F[:1], [5.0], status="interrupted", moe=True)
    bad = fake_run(tmp_path / "s", "moe_e8_k2", DENSE_F[:1], [5.0], status="failed", moe=True)
    info = json.loads((bad / "run.json").read_text())
    (bad / "run.json").write_text(json.dumps({**info, "summary": {"error": "FloatingPointError: loss became nan"}}))
    with pytest.raises(ValueError, match=r"no finished runs .*dense: unfinished: status 'running'.*moe_e8_k1: unfinished: "
                                         r"status 'interrupted'.*moe_e8_k2: .*failed \(FloatingPointError: loss became nan\)"):
        build_report(tmp_path / "s")


def test_different_data_is_refused_naming_the_runs(tmp_path):
    fake_run(tmp_path / "s", "dense", DENSE_F, [5.0] * 5)
    fake_run(tmp_path / "s", "moe_e8_k1", DENSE_F, [4.0] * 5, fingerprint="other", moe=True)
    with pytest.raises(ValueError, match=r"different data or tokenizers .*data_fingerprint=abc: dense; "
                                         r"data_fingerprint=other: moe_e8_k1"):
        build_report(tmp_path / "s")


def test_different_vocabularies_are_refused(tmp_path):
    fake_run(tmp_path / "s", "dense", DENSE_F, [5.0] * 5)
    fake_run(tmp_path / "s", "moe_e8_k1", DENSE_F, [4.0] * 5, vocab=4096, moe=True)
    with pytest.raises(ValueError, match=r"different vocabulary sizes.*vocab_size=257: dense; vocab_size=4096: moe_e8_k1"):
        build_report(tmp_path / "s")


def test_no_dense_baseline_takes_the_first_row_and_says_so(tmp_path):
    fake_run(tmp_path / "s", "moe_e8_k1", DENSE_F, [4.0] * 5, moe=True)
    report = build_report(tmp_path / "s")
    assert report.baseline.name == "moe_e8_k1" and "first row" in report.baseline_rule
    with pytest.raises(ValueError, match="--baseline 'dense' is not a finished run"):
        build_report(tmp_path / "s", baseline="dense")
    assert build_report(tmp_path / "s", baseline="moe_e8_k1").rows[0]["flop_multiplier"] == 1.0


def test_a_run_without_run_json_or_with_a_cut_line_is_left_out(tmp_path):
    fake_run(tmp_path / "s", "dense", DENSE_F, [dense_loss(f) for f in DENSE_F])
    orphan = tmp_path / "s" / "orphan"
    orphan.mkdir()
    (orphan / "metrics.jsonl").write_text('{"step": 1}\n')
    cut = fake_run(tmp_path / "s", "cut", DENSE_F, [4.0] * 5)
    with (cut / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "tok')
    report = build_report(tmp_path / "s")
    problems = {r.name: r.problem for r in report.left_out}
    assert "no run.json" in problems["orphan"] and "line 6 is not JSON" in problems["cut"]


def test_cli_errors_are_named(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "compare: sweep directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ a real sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, text_corpus) -> tuple[Path, subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """python -m experiments.train -m twin=dense,moe_e4_k1 (tiny, 4 steps, wandb offline), then compare. The runs'
    folders are named by what the sweep varies (conf/train.yaml's hydra.sweep.subdir: ${run_name:})."""
    root = tmp_path_factory.mktemp("sweeps")
    sweep_dir = root / "twins_sweep"
    train = _cli(["-m", "experiments.train", "-m", *TINY, f"data.path={text_corpus}", "trainer.max_steps=4",
                  "twin=dense,moe_e4_k1", "logger=wandb", "logger.mode=offline", f"hydra.sweep.dir={sweep_dir}"],
                 cwd=root)
    report = _cli(["-m", "experiments.compare", str(sweep_dir)], cwd=root)
    return sweep_dir, train, report


def test_sweep_names_its_folders_by_what_varies(sweep):
    sweep_dir, train, _ = sweep
    assert train.returncode == 0, train.stderr[-3000:]
    assert sorted(p.name for p in sweep_dir.iterdir() if (p / "run.json").is_file()) == ["twin=dense", "twin=moe_e4_k1"]
    for num, twin in enumerate(("dense", "moe_e4_k1")):
        prov = json.loads((sweep_dir / f"twin={twin}" / "run.json").read_text())["provenance"]
        assert prov["launcher"] == {"kind": "hydra-multirun", "job_num": num, "world_size": 1, "slurm_job_id": None,
                                    "hydra_launcher": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}
        assert f"twin={twin}" in prov["overrides"] and "trainer.max_steps=4" in prov["overrides"]
        assert prov["started_at"] < prov["ended_at"]


def test_sweep_runs_and_records_twin_and_group(sweep):
    sweep_dir, train, _ = sweep
    assert train.returncode == 0, train.stderr[-3000:]
    for twin in ("dense", "moe_e4_k1"):
        info = json.loads((sweep_dir / f"twin={twin}" / "run.json").read_text())
        assert info["status"] == "finished" and info["twin"] == twin and info["group"] == sweep_dir.name
        assert info["config"]["twin"] == twin and info["config"]["logger"]["group"] == sweep_dir.name
    a, b = (json.loads((sweep_dir / f"twin={t}" / "run.json").read_text()) for t in ("dense", "moe_e4_k1"))
    assert abs(a["flops_per_token"] - b["flops_per_token"]) / a["flops_per_token"] < 0.01
    assert a["data_fingerprint"] == b["data_fingerprint"]
    assert {k: v for k, v in a["config"].items() if k not in ("model", "twin", "run_dir")} == \
           {k: v for k, v in b["config"].items() if k not in ("model", "twin", "run_dir")}  # same data, tokens, schedule


def test_sweep_report_equals_the_metrics(sweep):
    sweep_dir, train, proc = sweep
    assert train.returncode == 0, train.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("comparison.md", "comparison.csv", "loss_vs_flops.png", "loss_vs_time.png", "expert_load.png",
                 "loss_vs_flops.svg", "loss_vs_time.svg", "expert_load.svg"):
        path = sweep_dir / name
        assert path.is_file() and path.stat().st_size > 0, name
        assert str(path) in proc.stdout  # the paths are printed
    assert (sweep_dir / "loss_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    assert "| **dense** | dense |" in proc.stdout and "| moe_e4_k1 | moe_e4_k1 |" in proc.stdout  # name, twin column
    assert "Baseline dense (the run with twin=dense)" in proc.stdout and "varied: `twin`" in proc.stdout
    assert "concurrent" not in proc.stdout  # one run after the other
    with (sweep_dir / "comparison.csv").open() as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"dense", "moe_e4_k1"}
    for name, row in rows.items():
        records = [json.loads(line) for line in (sweep_dir / f"twin={name}" / "metrics.jsonl").read_text().splitlines()]
        info = json.loads((sweep_dir / f"twin={name}" / "run.json").read_text())
        last = records[-1]
        assert float(row["final_val_loss"]) == last["val_loss"] == info["summary"]["final_val_loss"]
        assert int(row["tokens"]) == last["tokens"] and float(row["train_flops"]) == last["flops"]
        assert float(row["tokens_per_s"]) == last["tokens"] / last["elapsed_s"]
        assert int(row["params_total"]) == info["params_total"] and int(row["params_active"]) == info["params_active"]
        assert float(row["flops_per_token"]) == info["flops_per_token"]
    dense = [json.loads(line) for line in (sweep_dir / "twin=dense" / "metrics.jsonl").read_text().splitlines()]
    assert float(rows["dense"]["loss_at_base_flops"]) == dense[-1]["val_loss"]
    assert rows["moe_e4_k1"]["experts"] == "4" and rows["moe_e4_k1"]["top_k"] == "1"
    md = (sweep_dir / "comparison.md").read_text()
    assert f"Sweep {sweep_dir.name}: " in md and f"{dense[-1]['val_loss']:.4f}" in md


# ------------------------------------------------------------------------------------------ wandb, read back


def test_sweep_wandb_runs_have_axes_histograms_and_group(sweep):
    sweep_dir, train, _ = sweep
    assert train.returncode == 0, train.stderr[-3000:]
    files = glob.glob(str(sweep_dir / "twin=moe_e4_k1" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    records = wandb_records(Path(files[0]))
    kinds = [r.WhichOneof("record_type") for r in records]
    run = records[kinds.index("run")].run
    assert run.run_group == sweep_dir.name and run.display_name == "twin=moe_e4_k1"  # the run's folder
    metrics = {(m.metric.name or m.metric.glob_name): m.metric.step_metric for m in records
               if m.WhichOneof("record_type") == "metric"}
    assert {"tokens", "flops"} <= set(metrics)
    assert metrics["val_loss"] == "flops" and metrics["train_loss"] == "flops" and metrics["*"] == "tokens"
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in r.history.item})
    jsonl = [json.loads(line) for line in (sweep_dir / "twin=moe_e4_k1" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [r["step"] for r in jsonl] == [0, 1, 2, 3, 4]  # 0: the initial model
    assert rows[0]["val_loss"] == jsonl[0]["val_loss"] and rows[0]["flops"] == 0
    for row, rec in zip(rows[1:], jsonl[1:]):
        assert row["tokens"] == rec["tokens"] and row["flops"] == rec["flops"] and row["train_loss"] == rec["train_loss"]
        for layer in (0, 1):
            key = f"moe/layer{layer}/tokens_per_expert"
            assert row[f"{key}/_type"] == "histogram"
            assert row[f"{key}/values"] == rec[key] and row[f"{key}/bins"] == [0, 1, 2, 3, 4]  # bin e = expert e
    assert rows[-1]["val_loss"] == jsonl[-1]["val_loss"]


# ------------------------------------------------------------------------------------------ launchers and sweepers


def compose_hydra(overrides):
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_hydra(["experiment=dense_vs_moe", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.tasks_per_node == 1 and launcher.max_num_timeout == 3
    assert launcher.submitit_folder.startswith("runs/dense_vs_moe/") and launcher.submitit_folder.endswith("/.submitit/%j")


def test_joblib_launcher_and_optuna_sweeper_compose():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_hydra(["experiment=dense_vs_moe", "hydra/launcher=joblib"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    cfg = compose_hydra(["experiment=lr_search", "twin=moe_e8_k1"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert dict(sweeper.params) == {"optim.lr": "tag(log, interval(3e-4, 3e-2))"}
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and cfg.twin == "moe_e8_k1"


@pytest.mark.slow
def test_submitit_local_launcher_runs_one_step(tmp_path, text_corpus):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "submitit"
    proc = _cli(["-m", "experiments.train", "-m", *TINY, f"data.path={text_corpus}", "trainer.max_steps=1",
                 "twin=moe_e4_k2", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep_dir}",
                 "hydra.sweep.subdir=${twin}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((sweep_dir / "moe_e4_k2" / "run.json").read_text())
    assert info["status"] == "finished" and info["twin"] == "moe_e4_k2" and info["group"] == "submitit"
    assert (sweep_dir / ".submitit").is_dir()


@pytest.mark.slow
def test_optuna_lr_search_runs(tmp_path, text_corpus):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep_dir = tmp_path / "lr"
    proc = _cli(["-m", "experiments.train", "-m", "experiment=lr_search", *TINY, f"data.path={text_corpus}",
                 "trainer.max_steps=1", "twin=moe_e4_k1", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep_dir}"],
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = (sweep_dir / "optimization_results.yaml").read_text()
    assert "best_params" in result and "optim.lr" in result
