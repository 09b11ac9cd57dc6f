"""experiments.convert_checkpoint: full -> sharded -> full is the identity, bit for bit (weights, moments, counters,
RNG); a sharded checkpoint loads for generate/export (moe.checkpoint.load_model) and resumes under trainer=single
with the uninterrupted run's next loss; bad input is named."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from experiments.convert_checkpoint import convert, main
from experiments.metrics import read_metrics
from experiments.trainer import Trainer
from moe.checkpoint import load_model
from moe.manifest import DamagedCheckpoint
from moe.sharded_checkpoint import METADATA_FILE, SHARDED_DIR
from tests.experiments.test_train import make_run

STEPS = ["optim.schedule=constant", "optim.warmup_steps=0", "trainer.ckpt_interval=1", "trainer.keep_checkpoints=4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, text_corpus):
    root = tmp_path_factory.mktemp("convert")
    Trainer(make_run(root / "run", text_corpus, *STEPS, "trainer.max_steps=4")).fit()
    return root / "run"


def test_round_trip_is_bitwise(run, tmp_path):
    src = run / "checkpoints" / "step_3"
    sharded = convert(src, tmp_path / "sharded")
    assert (sharded / SHARDED_DIR / METADATA_FILE).is_file() and not (sharded / "model.safetensors").exists()
    assert (sharded / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    back = convert(sharded, tmp_path / "full")
    for name in ("model.safetensors", "trainer_state.safetensors"):
        a, b = load_file(str(src / name)), load_file(str(back / name))
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((src / "trainer_state.json").read_text()) == json.loads((back / "trainer_state.json").read_text())
    meta_a, meta_b = (json.loads((d / "config.json").read_text()) for d in (src, back))
    assert meta_a == meta_b


def test_sharded_checkpoint_loads_for_generate(run, tmp_path):
    src = run / "checkpoints" / "step_3"
    sharded = convert(src, tmp_path / "sharded")
    idx = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    a, b = load_model(src).eval(), load_model(sharded).eval()
    with torch.no_grad():
        assert torch.equal(a(idx).logits, b(idx).logits)


def test_sharded_checkpoint_resumes_with_the_next_loss(run, tmp_path, text_corpus):
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    ckpts = resumed / "checkpoints"
    shutil.rmtree(ckpts / "step_4")
    convert(ckpts / "step_3", tmp_path / "step_3_sharded")
    shutil.rmtree(ckpts / "step_3")
    shutil.move(tmp_path / "step_3_sharded", ckpts / "step_3")
    Trainer(make_run(resumed, text_corpus, *STEPS, "trainer.max_steps=4", "resume=auto")).fit()
    want = {r["step"]: r["train_loss"] for r in read_metrics(run)}
    got = {r["step"]: r["train_loss"] for r in read_metrics(resumed)}
    assert got[4] == want[4]  # one process, the same arithmetic: bit for bit


def test_bad_input_is_named(run, tmp_path, capsys):
    src = run / "checkpoints" / "step_3"
    with pytest.raises(ValueError, match="is already full"):
        convert(src, tmp_path / "x", to="full")
    (tmp_path / "exists").mkdir()
    with pytest.raises(ValueError, match="exists; choose a new destination"):
        convert(src, tmp_path / "exists")
    damaged = tmp_path / "damaged"
    shutil.copytree(src, damaged)
    with open(damaged / "model.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    with pytest.raises(DamagedCheckpoint, match="model.safetensors"):
        convert(damaged, tmp_path / "y")
    sharded = convert(src, tmp_path / "s")
    (sharded / SHARDED_DIR / "__0_0.distcp").unlink()
    with pytest.raises(DamagedCheckpoint, match="__0_0.distcp"):
        convert(sharded, tmp_path / "z")
    main([str(src), str(tmp_path / "cli")])
    assert "sharded" in capsys.readouterr().out
