"""trainer=fsdp under torchrun equals trainer=single on the same global batch: 3 steps on 2 processes (ep 1: experts
FSDP-sharded over both; ep 2 with activation checkpointing and the full checkpoint layout), on 4 processes (ep 2 x
2 FSDP shards of each expert bank) and on 4 as HSDP (2 replicas x 2 shards, ep 2) give the single process's losses
and gradient norms (relative 1e-6), routing counts, and weights (rtol 1e-5, atol 1e-6). The 4-process sharded
checkpoint resumes at 2 processes / ep 1 and under trainer=single, and the single run's full checkpoint under
trainer=fsdp at ep 2, each with the single run's next loss. Gradient accumulation (fsdp and ddp) equals single.
Bad meshes fail before any process group exists; a lost shard is named and passed over."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from experiments.metrics import read_metrics
from experiments.trainer import Trainer
from moe.sharded_checkpoint import METADATA_FILE, SHARDED_DIR, read_full
from tests.distributed._spawn import TORCHRUN_ENV, assert_refused
from tests.distributed.multi_run import launch_runs
from tests.distributed.test_ddp import STEPS, by_step
from tests.experiments.test_train import TINY, data_overrides, make_run

pytestmark = pytest.mark.distributed

TOL = 1e-6  # relative, on losses and gradient norms
KEYS = ("train_loss", "grad_norm", "load_balancing_loss", "router_z_loss")


def fsdp_run(run_dir, corpus, *overrides: str, trainer: str = "fsdp") -> tuple:
    """(run_dir, overrides) of a trainer=fsdp (or ddp) run, for launch_runs."""
    return run_dir, ["model=tiny_moe", *data_overrides(corpus), *TINY, *STEPS, f"trainer={trainer}", *overrides]


# gradient accumulation (2 micro-batches per step) and bf16 mixed precision: 2 steps, no checkpoints
ACCUM = ["trainer.max_steps=2", "trainer.grad_accum=2", "trainer.ckpt_interval=0"]
BF16 = ["trainer.max_steps=2", "trainer.precision=bf16", "trainer.ckpt_interval=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_corpus):
    """Every launched run of this module, in two torchrun launches (4 processes, then 2: tests.distributed.
    multi_run trains a launch's runs one after the other), and their single-process references."""
    root = tmp_path_factory.mktemp("fsdp")
    out = {name: root / name for name in ("single", "ep1", "ep2_recompute", "ep2x2", "hsdp", "resumed_fsdp",
                                          "resumed_single", "full_into_fsdp", "accum_single", "accum_fsdp",
                                          "accum_ddp", "bf16_single", "bf16_fsdp")}
    Trainer(make_run(out["single"], text_corpus, *STEPS, "trainer.max_steps=4")).fit()
    launch_runs(4, [fsdp_run(out["ep2x2"], text_corpus, "trainer.max_steps=3", "model.moe.expert_parallel=2"),
                    fsdp_run(out["hsdp"], text_corpus, "trainer.max_steps=3", "model.moe.expert_parallel=2",
                             "trainer.replicate=2")], root)
    # the 4-process / ep 2 run's sharded checkpoint of step 3, continued to step 4 at 2 processes / ep 1 (below)
    # and in one process under trainer=single
    shutil.copytree(out["ep2x2"], out["resumed_fsdp"])
    shutil.copytree(out["ep2x2"], out["resumed_single"])
    Trainer(make_run(out["resumed_single"], text_corpus, *STEPS, "trainer.max_steps=4", "resume=auto")).fit()
    # the single run's full checkpoint of step 3, continued under trainer=fsdp at 2 processes / ep 2 (below)
    shutil.copytree(out["single"], out["full_into_fsdp"])
    shutil.rmtree(out["full_into_fsdp"] / "checkpoints" / "step_4")
    Trainer(make_run(out["accum_single"], text_corpus, *STEPS, *ACCUM)).fit()
    Trainer(make_run(out["bf16_single"], text_corpus, *STEPS, *BF16)).fit()
    launch_runs(2, [
        fsdp_run(out["ep1"], text_corpus, "trainer.max_steps=3", "model.moe.expert_parallel=1"),
        fsdp_run(out["ep2_recompute"], text_corpus, "trainer.max_steps=3", "model.moe.expert_parallel=2",
                 "trainer.activation_checkpointing=1", "trainer.checkpoint_format=full"),
        fsdp_run(out["resumed_fsdp"], text_corpus, "trainer.max_steps=4", "model.moe.expert_parallel=1",
                 "resume=auto"),
        fsdp_run(out["full_into_fsdp"], text_corpus, "trainer.max_steps=4", "model.moe.expert_parallel=2",
                 "resume=auto"),
        # FSDP without gradient sync and DDP under no_sync until the last micro-batch
        fsdp_run(out["accum_fsdp"], text_corpus, *ACCUM, "model.moe.expert_parallel=2"),
        fsdp_run(out["accum_ddp"], text_corpus, *ACCUM, "model.moe.expert_parallel=2", trainer="ddp"),
        fsdp_run(out["bf16_fsdp"], text_corpus, *BF16, "model.moe.expert_parallel=2"),
    ], root)
    for name in ("ep1", "ep2_recompute", "ep2x2", "hsdp"):
        out[name + "_metrics"] = read_metrics(out[name])
    return out


def _close(got: float, want: float) -> bool:
    return abs(got - want) <= TOL * max(1.0, abs(want))


@pytest.mark.parametrize("name", ["ep1", "ep2_recompute", "ep2x2", "hsdp"])
def test_three_steps_equal_single_process(runs, name):
    single, mine = read_metrics(runs["single"]), runs[name + "_metrics"]
    assert [r["step"] for r in mine] == [1, 2, 3]
    for key in KEYS:
        want, got = by_step(single, key), by_step(mine, key)
        for step in (1, 2, 3):
            assert _close(got[step], want[step]), (name, key, step, got[step], want[step])
    counts = [k for k in mine[0] if k.endswith("tokens_per_expert")]
    assert counts and all(r[k] == s[k] for r, s in zip(mine, single) for k in counts), \
        "routing counts are summed over the ranks and counted once under recompute"


@pytest.mark.parametrize("name", ["ep1", "ep2x2", "hsdp"])
def test_sharded_checkpoint_holds_the_single_run_weights_and_moments(runs, name):
    folder = runs[name] / "checkpoints" / "step_3"
    assert (folder / SHARDED_DIR / METADATA_FILE).is_file() and not (folder / "model.safetensors").exists()
    shards = sorted(p.name for p in (folder / SHARDED_DIR).glob("*.distcp"))
    assert len(shards) == (4 if name != "ep1" else 2), shards  # every rank wrote its own pieces
    ref_dir = runs["single"] / "checkpoints" / "step_3"
    weights, moments = read_full(folder / SHARDED_DIR)
    ref = load_file(str(ref_dir / "model.safetensors"))
    assert weights.keys() == ref.keys()
    for k in ref:
        # 2e-6: where experts are sharded, the combine weight scales the expert outputs on the token's rank, while
        # the single run's sorted dispatch scales the narrower hidden rows (Experts.forward_sorted): (s h) W
        # against s (h W), fp32 reassociation; one value of 8,192 moved 1.24e-6 in 3 steps.
        torch.testing.assert_close(weights[k], ref[k], rtol=1e-5, atol=2e-6, msg=lambda m: f"{k}: {m}")
    ref_moments = load_file(str(ref_dir / "trainer_state.safetensors"))
    for key, t in ref_moments.items():
        if key.startswith("optimizer/") and not key.endswith("/step"):
            _, index, what = key.split("/")
            torch.testing.assert_close(moments[int(index)][what], t, rtol=1e-4, atol=1e-9,
                                       msg=lambda m: f"{key}: {m}")


def test_full_checkpoint_format_gathers_the_single_layout(runs):
    mine = runs["ep2_recompute"] / "checkpoints" / "step_3"
    assert not (mine / SHARDED_DIR).exists()
    a, b = load_file(str(mine / "model.safetensors")), load_file(str(runs["single"] / "checkpoints" / "step_3" /
                                                                     "model.safetensors"))
    assert a.keys() == b.keys()
    # Round-off, not layout: the two runs sum expert rows and reduce gradients in different orders, and AdamW's
    # normalised update m / sqrt(v) turns a near-cancelling gradient's relative round-off into up to ~1e-6 of weight
    # after 3 steps (one expert weight in 8,192 at 1.1e-6 since the fused update and the fused expert path). A weight in
    # the wrong place would be off by its own size, ~1e-2.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=2e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", ["resumed_fsdp", "resumed_single", "full_into_fsdp"])
def test_sharded_checkpoint_resumes_at_another_world_size(runs, name):
    single, resumed = read_metrics(runs["single"]), read_metrics(runs[name])
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for key in ("train_loss", "grad_norm"):
        assert _close(by_step(resumed, key)[4], by_step(single, key)[4]), (name, key)


@pytest.mark.parametrize("trainer", ["fsdp", "ddp"])
def test_gradient_accumulation_equals_single(trainer, runs):
    """2 micro-batches per step: FSDP without gradient sync and DDP under no_sync until the last one."""
    single, mine = read_metrics(runs["accum_single"]), read_metrics(runs[f"accum_{trainer}"])
    for key in KEYS:
        for step in (1, 2):
            assert _close(by_step(mine, key)[step], by_step(single, key)[step]), (trainer, key, step)


def test_bf16_mixed_precision_tracks_single_and_keeps_fp32_weights(runs):
    """trainer.precision=bf16 (what auto is on CUDA): bf16 compute from FSDP's gathered bf16 weights, fp32 gradient
    reduction and fp32 sharded masters. Losses track trainer=single's bf16 autocast (bf16 round-off, not 1e-6), and
    the checkpoint holds fp32 weights."""
    single, mine = read_metrics(runs["bf16_single"]), read_metrics(runs["bf16_fsdp"])
    for step in (1, 2):
        want, got = by_step(single, "train_loss")[step], by_step(mine, "train_loss")[step]
        assert abs(got - want) <= 1e-2 * abs(want), (step, got, want)
    # the run's only checkpoint is its last (ckpt_interval=0)
    weights, _ = read_full(runs["bf16_fsdp"] / "checkpoints" / "step_2" / SHARDED_DIR)
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_single_process_activation_checkpointing_changes_nothing(tmp_path, text_corpus):
    """trainer=single, on and off: the same losses and routing statistics, bit for bit."""
    got = {}
    for every in (0, 1):
        Trainer(make_run(tmp_path / str(every), text_corpus, *STEPS, "trainer.max_steps=3",
                         f"trainer.activation_checkpointing={every}")).fit()
        got[every] = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "flops_per_s", "elapsed_s")}
                      for r in read_metrics(tmp_path / str(every))]
    assert got[0] == got[1]


# ---------------------------------------------------------------- bad meshes fail before any process group

@pytest.mark.parametrize("env, overrides, match", [
    ({}, [], r"trainer=fsdp runs one process per rank under torchrun"),
    (TORCHRUN_ENV, ["trainer.replicate=3"], r"trainer.replicate=3 does not divide the world size 2"),
    (TORCHRUN_ENV, ["trainer.replicate=2", "model.moe.expert_parallel=2"],
     r"model.moe.expert_parallel=2 does not divide the shard dimension 1"),
    (TORCHRUN_ENV, ["model.moe.dispatcher=triton"],
     r"trainer=fsdp cannot run the triton dispatcher|model.moe.dispatcher=triton cannot run here"),
    (TORCHRUN_ENV, ["trainer.batch_size=3"], r"trainer.batch_size=3 is the global batch and must be divisible"),
])
def test_bad_fsdp_launch(env, overrides, match, tmp_path, text_corpus, monkeypatch):
    assert_refused(make_run(tmp_path, text_corpus, "trainer=fsdp", *overrides), env, match, tmp_path, monkeypatch)


def test_expert_parallel_not_dividing_the_experts_is_refused_at_composition(tmp_path, text_corpus):
    with pytest.raises(ValueError, match=r"model.moe.expert_parallel=2 does not divide model.moe.num_experts=3"):
        make_run(tmp_path, text_corpus, "trainer=fsdp", "model.moe.num_experts=3", "model.moe.router.top_k=1",
                 "model.moe.expert_parallel=2")


def test_missing_shard_is_named_and_passed_over(runs, tmp_path, text_corpus, capsys):
    """A checkpoint that lost one rank's shard file: named, set aside, the previous checkpoint resumed."""
    run_dir = tmp_path / "lost"
    shutil.copytree(runs["ep2x2"], run_dir)
    lost = run_dir / "checkpoints" / "step_3" / SHARDED_DIR / "__1_0.distcp"
    lost.unlink()
    with pytest.raises(FileNotFoundError, match=r"missing its shard files \['__1_0.distcp'\]"):
        read_full(lost.parent)
    Trainer(make_run(run_dir, text_corpus, *STEPS, "trainer.max_steps=3", "resume=auto")).fit()
    out = capsys.readouterr().out
    assert "checkpoint step_3 is damaged: __1_0.distcp" in out, out
    assert (run_dir / "checkpoints" / "step_3.damaged").is_dir()
    assert "resumed from" in out and "step_2" in out
