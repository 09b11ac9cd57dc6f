"""trainer=deepspeed equals trainer=single: 3 steps on 1 and 2 processes, ZeRO 0, 1 and 2, with and without expert
parallelism, give the single process's losses and gradient norms; the weights after 3 steps equal the single run's
(expert gradients reduced over their expert-data-parallel group only); a run resumed from its step-3 checkpoint
gives the uninterrupted run's 4th step bit for bit, and one resumed at another ZeRO stage and ep (with activation
checkpointing) gives it within round-off; DeepSpeed's own checkpoint converts to ours (experiments.convert_deepspeed:
with expert shards, and bf16 with the fp32 masters of the ZeRO files), reading DeepSpeed's pickles as plain data
only; bad settings fail before any process group. Both launchers: torchrun and deepspeed --no_local_rank."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from experiments.convert_deepspeed import DEEPSPEED_GLOBALS, convert, load_deepspeed_file
from experiments.engines.deepspeed import EXPERT_SHARD_FILE, EXPERT_SHARD_META
from experiments.metrics import read_metrics
from experiments.trainer import Trainer
from experiments.trainer_state import load_trainer_state
from moe.checkpoint import load_model
from tests.distributed._spawn import TORCHRUN_ENV, assert_refused, launch_train
from tests.experiments.test_train import REPO_ROOT, TINY, data_overrides, make_run

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.distributed

# A constant schedule: the first 3 steps of a 4-step run are a 3-step run. aux and z losses stay on (defaults).
STEPS = ["optim.schedule=constant", "optim.warmup_steps=0", "trainer.threads=1", "trainer.ckpt_interval=1",
         "trainer.keep_checkpoints=4"]
LOSS_TOL = 2e-6


def launch(nproc: int, run_dir, corpus, *overrides: str, launcher: str = "torchrun") -> None:
    launch_train(nproc, ["model=tiny_moe", *data_overrides(corpus), *TINY, *STEPS, "trainer=deepspeed",
                         f"hydra.run.dir={run_dir}", *overrides], launcher)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_corpus):
    root = tmp_path_factory.mktemp("deepspeed")
    single = root / "single"
    Trainer(make_run(single, text_corpus, *STEPS, "trainer.max_steps=4")).fit()
    out = {"single": single}
    # ZeRO 1, 2 ranks, ep=2, uninterrupted to step 4, DeepSpeed's own checkpoints too
    out["z1_ep2"] = root / "z1_ep2"
    launch(2, out["z1_ep2"], text_corpus, "deepspeed=zero1", "model.moe.expert_parallel=2", "trainer.max_steps=4",
           "deepspeed.engine_checkpoint=true")
    # the same run resumed from its step-3 checkpoint: the same 4th step, bit for bit
    out["z1_ep2_resumed"] = root / "z1_ep2_resumed"
    shutil.copytree(out["z1_ep2"], out["z1_ep2_resumed"], ignore=shutil.ignore_patterns("step_4", "deepspeed"))
    launch(2, out["z1_ep2_resumed"], text_corpus, "deepspeed=zero1", "model.moe.expert_parallel=2",
           "trainer.max_steps=4", "resume=auto")
    # ZeRO 2 on 2 ranks without expert parallelism, under DeepSpeed's launcher; then resumed at ZeRO 0, ep=2
    out["z2"] = root / "z2"
    launch(2, out["z2"], text_corpus, "deepspeed=zero2", "trainer.max_steps=3", launcher="deepspeed")
    out["z2_metrics"] = read_metrics(out["z2"])
    launch(2, out["z2"], text_corpus, "deepspeed=zero0", "model.moe.expert_parallel=2", "trainer.max_steps=4",
           "resume=auto", "trainer.activation_checkpointing=1")  # recomputing every block changes no number
    # ZeRO 0 in one process
    out["z0_one"] = root / "z0_one"
    launch(1, out["z0_one"], text_corpus, "deepspeed=zero0", "trainer.max_steps=3")
    # DeepSpeed's bf16 mode (ZeRO 2, 2 ranks): bf16 module weights, fp32 masters only in the ZeRO files
    out["z2_bf16"] = root / "z2_bf16"
    launch(2, out["z2_bf16"], text_corpus, "deepspeed=zero2", "trainer.precision=bf16", "trainer.max_steps=2",
           "deepspeed.engine_checkpoint=true")
    return out


def by_step(records, key):
    return {r["step"]: r[key] for r in records if key in r}


@pytest.mark.parametrize("name", ["z1_ep2", "z2", "z0_one"])
def test_three_steps_equal_single_process(runs, name):
    single = read_metrics(runs["single"])
    mine = runs["z2_metrics"] if name == "z2" else read_metrics(runs[name])
    for key in ("train_loss", "grad_norm", "load_balancing_loss", "router_z_loss"):
        want, got = by_step(single, key), by_step(mine, key)
        for step in (1, 2, 3):
            assert abs(got[step] - want[step]) <= LOSS_TOL * max(1.0, abs(want[step])), (name, key, step, got, want)
    counts = [k for k in mine[0] if k.endswith("tokens_per_expert")]
    assert counts and all(mine[0][k] == single[0][k] for k in counts)


@pytest.mark.parametrize("name", ["z1_ep2", "z0_one"])
def test_weights_after_three_steps_equal_single(runs, name):
    """Expert gradients are reduced over their expert-data-parallel group only: the updated experts (and everything
    else) equal the single run's; the checkpoint is our full-size format with the optimizer state in its layout."""
    mine, ref = runs[name] / "checkpoints" / "step_3", runs["single"] / "checkpoints" / "step_3"
    a, b = load_file(str(mine / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    state = load_trainer_state(mine, torch.device("cpu"))[0]
    ref_state = load_trainer_state(ref, torch.device("cpu"))[0]
    assert [len(g["params"]) for g in state["param_groups"]] == [len(g["params"]) for g in ref_state["param_groups"]]
    for i, s in ref_state["state"].items():
        assert float(state["state"][i]["step"]) == float(s["step"]) == 3.0
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state["state"][i][k], s[k], rtol=1e-3, atol=1e-7)


def test_resume_is_exact(runs):
    full, resumed = read_metrics(runs["z1_ep2"]), read_metrics(runs["z1_ep2_resumed"])
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for key in ("train_loss", "grad_norm", "val_loss"):
        assert by_step(resumed, key)[4] == by_step(full, key)[4], key  # bitwise
    single = read_metrics(runs["single"])
    assert abs(by_step(full, "train_loss")[4] - by_step(single, "train_loss")[4]) <= LOSS_TOL * 6


def test_resume_at_another_stage_and_ep_continues_the_single_run(runs):
    single, resumed = read_metrics(runs["single"]), read_metrics(runs["z2"])
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    want, got = by_step(single, "train_loss")[4], by_step(resumed, "train_loss")[4]
    assert abs(got - want) <= LOSS_TOL * abs(want), (got, want)
    run = json.loads((runs["z2"] / "run.json").read_text())
    assert run["status"] == "finished" and run["config"]["deepspeed"]["zero_stage"] == 0


def test_deepspeed_checkpoint_converts_to_ours(runs, tmp_path):
    """engine.save_checkpoint (with ep=2: rank 0's module state plus each rank's expert shards) -> our format:
    the same tensors as the run's own checkpoint of that step, and a model that loads in one process."""
    engine_dir = runs["z1_ep2"] / "deepspeed"
    assert (engine_dir / "latest").read_text().strip() == "step_4"
    tag = engine_dir / "step_3"
    assert (tag / "mp_rank_00_model_states.pt").is_file() and list(tag.glob("zero_pp_rank_*_optim_states.pt"))
    for rank in (0, 1):  # the expert shards: safetensors with their place in the metadata, no pickle
        with safe_open(str(tag / EXPERT_SHARD_FILE.format(ep_rank=rank)), framework="pt") as f:
            assert json.loads(f.metadata()[EXPERT_SHARD_META])["ep_rank"] == rank
    assert not list(tag.glob("switchyard_experts_*.pt"))
    out = convert(engine_dir, tmp_path / "converted", tag="step_3")
    ours = runs["z1_ep2"] / "checkpoints" / "step_3"
    a, b = load_file(str(out / "model.safetensors")), load_file(str(ours / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["step"] == 3
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_model(out).eval()(idx).logits, load_model(ours).eval()(idx).logits)
    # the command line, on the newest tag
    cmd = [sys.executable, "-m", "experiments.convert_deepspeed", str(engine_dir), str(tmp_path / "cli")]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(tmp_path / "cli" / "model.safetensors"))
    b = load_file(str(runs["z1_ep2"] / "checkpoints" / "step_4" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_bf16_checkpoint_converts_with_the_fp32_masters(runs, tmp_path):
    """bf16 module weights: the fp32 masters come from the ZeRO files, equal to the run's own checkpoint."""
    tag = runs["z2_bf16"] / "deepspeed" / "step_2"
    assert load_deepspeed_file(tag / "mp_rank_00_model_states.pt")["module"]["model.embed.weight"].dtype == \
        torch.bfloat16
    out = convert(tag, tmp_path / "converted")
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(runs["z2_bf16"] / "checkpoints" / "step_2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name, tag", [("z1_ep2", "step_3"), ("z2_bf16", "step_2")])
def test_deepspeed_files_need_only_the_allowed_globals(runs, name, tag):
    """Every pickle DeepSpeed writes for trainer=deepspeed (module state, ZeRO optimizer files) needs no global
    beyond torch's weights_only defaults and DEEPSPEED_GLOBALS; a new DeepSpeed that pickles more shows up here."""
    files = sorted((runs[name] / "deepspeed" / tag).glob("*.pt"))
    assert len(files) == 3  # mp_rank_00_model_states.pt and 2 ranks' optimizer states
    allowed = {n for _, n in DEEPSPEED_GLOBALS}
    for f in files:
        assert set(torch.serialization.get_unsafe_globals_in_checkpoint(f)) <= allowed, f
        assert isinstance(load_deepspeed_file(f), dict)


def test_converter_errors(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="latest"):
        convert(tmp_path, tmp_path / "out")
    broken = tmp_path / "broken"
    shutil.copytree(runs["z1_ep2"] / "deepspeed" / "step_3", broken)
    (broken / EXPERT_SHARD_FILE.format(ep_rank=1)).unlink()
    with pytest.raises(ValueError, match=r"expert shard files of ranks \[0\] found, expected 0..1"):
        convert(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- bad settings fail before any process group



@pytest.mark.parametrize("env, overrides, match", [
    ({}, [], r"trainer=deepspeed runs one process per rank under torchrun or the deepspeed launcher"),
    (TORCHRUN_ENV, ["model.moe.expert_parallel=4"], r"model.moe.expert_parallel=4 does not divide the world size 2"),
    (TORCHRUN_ENV, ["trainer.batch_size=3"], r"trainer.batch_size=3 is the global batch and must be divisible"),
    (TORCHRUN_ENV, ["deepspeed=zero0", "trainer.precision=bf16"], r"deepspeed.zero_stage=0 with bf16"),
])
def test_bad_deepspeed_launch(env, overrides, match, tmp_path, text_corpus, monkeypatch):
    assert_refused(make_run(tmp_path, text_corpus, "trainer=deepspeed", *overrides), env, match, tmp_path, monkeypatch)


def test_missing_deepspeed_names_the_extra(tmp_path, text_corpus, monkeypatch):
    for k, v in TORCHRUN_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed raises ImportError
    run = make_run(tmp_path, text_corpus, "trainer=deepspeed")
    with pytest.raises(ValueError, match=r"pip install -e '\.\[deepspeed\]'"):
        Trainer(run)
    assert not dist.is_initialized()


@pytest.mark.parametrize("overrides, match", [
    (["trainer=deepspeed", "deepspeed.zero_stage=3"], r"deepspeed.zero_stage=3 is not supported: DeepSpeed refuses "
                                                      r"ZeRO stage 3 with MoE layers"),
    (["trainer=deepspeed", "deepspeed.zero_stage=4"], r"deepspeed.zero_stage=4 must be 0, 1 or 2"),
    (["trainer=deepspeed", "deepspeed.offload_optimizer=cpu"], r"deepspeed.offload_optimizer='cpu' is not supported"),
    (["trainer=deepspeed", "deepspeed.contiguous_gradients=false", "model.moe.expert_parallel=2"],
     r"deepspeed.contiguous_gradients=false with model.moe.expert_parallel=2"),
    (["deepspeed=zero2"], r"deepspeed settings were given but trainer.kind='single'"),
])
def test_bad_deepspeed_config(overrides, match, tmp_path, text_corpus):
    with pytest.raises(ValueError, match=match):
        make_run(tmp_path, text_corpus, *overrides)
