"""trainer=ddp (torch DDP) under torchrun equals trainer=single: 3 steps at ep=2 on 2 ranks give the single process's
losses, gradient norms and validation loss; its checkpoint is full-size (equal to the single run's, loadable in one
process), and a 4-rank ep=4 run with activation checkpointing resumes from it to give the single run's 4th step.
Bad launches fail first."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from experiments.metrics import read_metrics
from experiments.trainer import Trainer
from experiments.trainer_state import load_trainer_state
from moe.checkpoint import load_model
from tests.distributed._spawn import TORCHRUN_ENV, assert_refused, launch_train
from tests.experiments.test_train import TINY, data_overrides, make_run

pytestmark = pytest.mark.distributed

# A constant schedule: the first 3 steps of a 4-step run are a 3-step run. aux and z losses stay on (defaults).
STEPS = ["optim.schedule=constant", "optim.warmup_steps=0", "trainer.threads=1", "trainer.ckpt_interval=1",
         "trainer.keep_checkpoints=4"]
LOSS_TOL = 2e-6


def torchrun(nproc: int, run_dir, corpus, *overrides: str) -> None:
    launch_train(nproc, ["model=tiny_moe", *data_overrides(corpus), *TINY, *STEPS, "trainer=ddp",
                         f"hydra.run.dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_corpus):
    root = tmp_path_factory.mktemp("ddp")
    single = root / "single"
    Trainer(make_run(single, text_corpus, *STEPS, "trainer.max_steps=4")).fit()
    ddp = root / "ddp"
    torchrun(2, ddp, text_corpus, "trainer.max_steps=3", "model.moe.expert_parallel=2")
    ep2_metrics = read_metrics(ddp)
    # the same directory, 4 ranks, ep=4: resumes the ep=2 checkpoint of step 3 (weights and optimizer split), with
    # every block's activations recomputed in the backward (which changes no number)
    torchrun(4, ddp, text_corpus, "trainer.max_steps=4", "model.moe.expert_parallel=4", "resume=auto",
             "trainer.activation_checkpointing=1")
    return {"single": single, "ddp": ddp, "ep2_metrics": ep2_metrics}


def by_step(records, key):
    return {r["step"]: r[key] for r in records if key in r}


def test_ddp_three_steps_equal_single_process(runs):
    single, ddp = read_metrics(runs["single"]), runs["ep2_metrics"]
    assert [r["step"] for r in ddp] == [1, 2, 3]
    for key in ("train_loss", "grad_norm", "load_balancing_loss", "router_z_loss"):
        want, got = by_step(single, key), by_step(ddp, key)
        for step in (1, 2, 3):
            assert abs(got[step] - want[step]) <= LOSS_TOL * max(1.0, abs(want[step])), (key, step, got, want)
    counts = [k for k in ddp[0] if k.endswith("tokens_per_expert")]
    assert counts and all(ddp[0][k] == single[0][k] for k in counts), "routing counts are summed over the ranks"


def test_checkpoint_is_full_size_and_loads_in_one_process(runs):
    mine = runs["ddp"] / "checkpoints" / "step_3"
    ref = runs["single"] / "checkpoints" / "step_3"
    a, b = load_file(str(mine / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    state = load_trainer_state(mine, torch.device("cpu"))[0]["state"]
    ref_state = load_trainer_state(ref, torch.device("cpu"))[0]["state"]
    for i in ref_state:
        assert state[i]["exp_avg"].shape == ref_state[i]["exp_avg"].shape
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    m1, m2 = load_model(mine).eval(), load_model(ref).eval()  # saved at ep=2, loaded at ep=1
    with torch.no_grad():
        torch.testing.assert_close(m1(idx).logits, m2(idx).logits, rtol=1e-4, atol=1e-5)


def test_resume_at_ep4_from_ep2_checkpoint_continues_the_single_run(runs):
    single, resumed = read_metrics(runs["single"]), read_metrics(runs["ddp"])
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    want, got = by_step(single, "train_loss")[4], by_step(resumed, "train_loss")[4]
    assert abs(got - want) <= LOSS_TOL * abs(want), (got, want)
    assert abs(by_step(resumed, "val_loss")[4] - by_step(single, "val_loss")[4]) <= LOSS_TOL * 5
    run = json.loads((runs["ddp"] / "run.json").read_text())
    assert run["status"] == "finished" and run["config"]["model"]["moe"]["expert_parallel"] == 4


# ---------------------------------------------------------------- bad launches fail before any process group



@pytest.mark.parametrize("env, overrides, match", [
    ({}, [], r"trainer=ddp runs one process per rank under torchrun"),
    (TORCHRUN_ENV, ["model.moe.expert_parallel=4"], r"model.moe.expert_parallel=4 does not divide the world size 2"),
    (TORCHRUN_ENV, ["trainer.batch_size=3"], r"trainer.batch_size=3 is the global batch and must be divisible"),
])
def test_bad_ddp_launch(env, overrides, match, tmp_path, text_corpus, monkeypatch):
    assert_refused(make_run(tmp_path, text_corpus, "trainer=ddp", *overrides), env, match, tmp_path, monkeypatch)
