"""experiment=upcycle_vs_dense end to end on a tiny self-made dense checkpoint: the callback writes the starting
points, the sweep trains dense and upcycled from them, and compare reports both against dense; the upcycled run
starts at the dense run's loss (the same function at step 0). The scratch starting point is checked on its own
(one training run fewer: the end-to-end test is the slow part of this file)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.upcycle_vs_dense import StartingPoints, prepare, sunk_cost
from moe.checkpoint import load_config, save_checkpoint
from moe.model import Transformer
from moe.presets import get_preset
from tests.conftest import REPO_ROOT

STEPS = 4


def tiny_dense_checkpoint(path: Path) -> Path:
    """A 2-layer dense model over the byte tokenizer's 257 ids, saved without a tokenizer (data.tokenizer decides)."""
    cfg = get_preset("tiny_dense").replace(n_layer=2, d_model=32, n_head=2, d_ff=64, max_seq_len=32, vocab_size=257)
    torch.manual_seed(3)
    model = Transformer(cfg)
    with torch.no_grad():
        model.embed.weight.mul_(20.0)  # confident (wrong) predictions: a loss far from a fresh model's ln 257
    return save_checkpoint(path, model)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, text_corpus):
    root = tmp_path_factory.mktemp("uvd")
    source = tiny_dense_checkpoint(root / "released")
    sweep_dir = root / "sweep"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.train", "-m", "experiment=upcycle_vs_dense",
         f"hydra.callbacks.starting_points.source={source}", f"hydra.sweep.dir={sweep_dir}",
         "hydra.callbacks.starting_points.upcycle.num_experts=4", "hydra.callbacks.starting_points.variants=[dense,upcycled]",
         "data=text", f"data.path={text_corpus}", "data.tokenizer=byte",
         f"trainer.max_steps={STEPS}", "trainer.eval_interval=2", "trainer.log_interval=2", "trainer.batch_size=2",
         "trainer.seq_len=16", "trainer.eval_batches=2", "trainer.progress=false", "trainer.device=cpu"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return sweep_dir, proc


def test_the_sweep_trains_both_runs_from_the_starting_points(sweep):
    sweep_dir, proc = sweep
    init = sweep_dir / "init"
    assert (init / "dense").is_symlink()  # the source is already a Switchyard checkpoint: used as it is
    up = load_config(init / "upcycled")
    assert up.sparse_layers == (1,) and up.moe.num_experts == 4 and not (init / "scratch").exists()
    assert "EXACT" in proc.stdout and "layer   1: 4/4" in proc.stdout  # the step-0 check, every expert used
    assert "router calibration: a passage of the training split (corpus.txt[train]" in proc.stdout  # data= of the runs
    runs = {name: records(sweep_dir / name) for name in ("dense", "upcycled")}
    for name, recs in runs.items():
        info = json.loads((sweep_dir / name / "run.json").read_text())
        assert info["status"] == "finished" and info["config"]["init_from"] == str(init / name)
        evals = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
        assert [s for s, _ in evals] == [0, 2, 4], name  # curves from step 0
        assert recs[-1]["tokens"] == STEPS * 2 * 16  # the same tokens for every variant
    step0 = {name: next(r["val_loss"] for r in recs if r["step"] == 0) for name, recs in runs.items()}
    assert abs(step0["upcycled"] - step0["dense"]) <= 1e-4  # identical function at step 0
    assert step0["dense"] > 6.0  # the self-made checkpoint's confident guesses: far from a fresh model's ln 257
    # the MoE runs spend more FLOPs per token (top-2 of 4 full-width experts on the sparse layer)
    assert runs["upcycled"][-1]["flops"] > runs["dense"][-1]["flops"]
    cost = json.loads((init / "sunk_cost.json").read_text())
    assert cost["pretraining_tokens"] is None and "unknown" in cost["where"]


def test_compare_reports_the_sweep_against_dense(sweep, capsys):
    from experiments.compare import main

    sweep_dir, _ = sweep
    assert main([str(sweep_dir), "--no-plots"]) == 0, capsys.readouterr().err
    rows = {}
    with open(sweep_dir / "comparison.csv") as f:
        for row in csv.DictReader(f):
            rows[row["run"]] = row
    assert set(rows) == {"dense", "upcycled"}  # named by variant: init/ holds no run
    assert float(rows["dense"]["flop_multiplier"]) == 1.0  # the baseline is the run named dense


def test_sunk_cost_of_smollm2_comes_from_its_model_card():
    cost = sunk_cost(134_515_008, "/x/SmolLM2-135M-Instruct.Q4_1.gguf", "gguf llama")
    assert cost["pretraining_tokens"] == 2e12 and "model card" in cost["where"]
    assert cost["pretraining_flops"] == pytest.approx(6 * 134_515_008 * 2e12)  # 1.61e21
    given = sunk_cost(1000, "mine", "switchyard", tokens=5e9, where="my training log")
    assert given["pretraining_flops"] == 6 * 1000 * 5e9 and given["where"] == "my training log"


def test_bad_starting_points_are_named(tmp_path):
    with pytest.raises(ValueError, match="hydra.callbacks.starting_points.source=PATH"):
        prepare(StartingPoints(source=None, init_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(StartingPoints(source=str(tmp_path / "nope"), init_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"\['sparse'\] are not variants"):
        prepare(StartingPoints(source=str(tmp_path), init_dir=str(tmp_path), variants=["dense", "sparse"]))


def test_scratch_is_the_upcycled_shape_with_fresh_weights(tmp_path):
    from moe.checkpoint import load_model

    source = tiny_dense_checkpoint(tmp_path / "released")
    out = prepare(StartingPoints(source=str(source), init_dir=str(tmp_path / "init"), variants=["scratch"], seed=5,
                                 upcycle={"num_experts": 4, "verify": False}))
    assert sorted(out) == ["scratch", "sunk_cost", "text"]
    up, scratch = load_model(tmp_path / "init" / "upcycled"), load_model(out["scratch"])
    assert up.cfg == scratch.cfg and up.cfg.moe.num_experts == 4  # the shape the comparison holds fixed
    torch.manual_seed(5)
    fresh = Transformer(up.cfg)  # what the trainer builds with seed=5 and no init_from
    for (name, a), b, c in zip(scratch.state_dict().items(), up.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, c), name
        if name.endswith("experts.w_up"):
            assert not torch.equal(a, b)  # not the copied FFN
    again = prepare(StartingPoints(source=str(source), init_dir=str(tmp_path / "init"), variants=["scratch"]))
    assert again["sunk_cost"] == out["sunk_cost"] and "scratch:" not in again["text"]  # written once, then reused


def test_the_new_router_is_calibrated_on_the_training_split(tmp_path, text_corpus, monkeypatch):
    """calibration=train (the default) hands the upcycle app a passage of the runs' training split as its
    verification and calibration text; builtin leaves the app's sample; an explicit verify_text is kept."""
    from experiments.data import load_documents, split_documents
    from experiments.data_config import DataConfig
    from experiments.upcycle_vs_dense import CALIBRATION_CHARS, training_passage

    data = DataConfig(source="text", path=str(text_corpus), tokenizer="byte")
    train, val = split_documents(load_documents(data), data.val_fraction, data.split_seed)
    name, passage = training_passage(data)
    start = train[0].text.index(passage)
    assert name == train[0].name and len(passage) == CALIBRATION_CHARS and train[0].text[start - 1] == "\n"
    assert start > 0 and not any(passage[:200] in d.text for d in val)  # the middle of the text, none of validation
    assert training_passage(DataConfig(source="tokens", path="x.bin", vocab_size=300)) is None

    given = []
    monkeypatch.setattr("experiments.upcycle.run_upcycle", lambda opts: given.append(opts) or {"text": ""})
    source = tiny_dense_checkpoint(tmp_path / "released")

    def run(calibration: str, init: str, **upcycle):
        sp = StartingPoints(source=str(source), init_dir=str(tmp_path / init), variants=["dense", "upcycled"],
                            upcycle={"num_experts": 4, **upcycle}, calibration=calibration)
        return prepare(sp, data)["text"]

    assert f"a passage of the training split ({name}, {CALIBRATION_CHARS} characters)" in run("train", "a")
    assert given[-1]["verify_text"] == passage
    assert "built-in sample (calibration=builtin)" in run("builtin", "b") and "verify_text" not in given[-1]
    run("train", "c", verify_text="my own text")
    assert given[-1]["verify_text"] == "my own text"
    with pytest.raises(ValueError, match="starting_points.calibration='dev'"):
        run("dev", "d")
