"""The training loop end to end at tiny sizes: metrics, FLOP and token accounting, accumulation, schedule,
checkpoints (atomic, pruned), exact resumption (after a checkpoint and after an interrupt), init_from and input
errors. The command line in subprocesses: test_train_cli.py; wandb: test_train_wandb.py."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf
from safetensors.torch import load_file

import moe.checkpoint
from experiments import trainer as trainer_mod
from experiments.config import run_config_from_dict
from experiments.data import PreparedData
from experiments.hydra_conf import CONFIG_MODULE, register_configs
from experiments.metrics import MetricsLogger, read_metrics
from experiments.optim import lr_at
from experiments.trainer import Trainer, checkpoint_dirs
from experiments.trainer_state import STATE_FILES, load_trainer_state
from moe.checkpoint import load_config, load_model
from moe.config import ModelConfig
from moe.flops import flops_per_token
from moe.model import Transformer

REPO_ROOT = Path(__file__).resolve().parents[2]
B, S = 4, 16  # batch and sequence of every run here
TINY = [
    "model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.d_ff=64", "model.max_seq_len=32",
    "model.moe.expert_hidden=32",
    f"trainer.batch_size={B}", f"trainer.seq_len={S}", "trainer.eval_batches=2", "trainer.progress=false",
    "trainer.device=cpu", "trainer.log_interval=1", "trainer.eval_interval=0", "trainer.eval_at_start=false",
]
# Randomness inside the step (dropout, router jitter), so exact resumption needs the RNG state restored.
NOISY = ["model.dropout=0.1", "model.moe.router.jitter=0.1", "optim.warmup_steps=2"]
CKPT_FILES = {"config.json", "model.safetensors", *STATE_FILES, "tokenizer.json", "manifest.json"}

register_configs()


def data_overrides(corpus: Path) -> list[str]:
    return ["data=text", f"data.path={corpus}", "data.tokenizer=byte"]


def make_run(run_dir: Path, corpus: Path, *overrides: str, model: str = "tiny_moe"):
    """A RunConfig composed by Hydra, as experiments.train builds it."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", *data_overrides(corpus), *TINY, *overrides])
    return run_config_from_dict(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True), str(run_dir))


def train(run_dir: Path, corpus: Path, *overrides: str, model: str = "tiny_moe") -> tuple[Trainer, dict]:
    t = Trainer(make_run(run_dir, corpus, *overrides, model=model))
    return t, t.fit()


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(run_dir)}


def steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir)]


def leftovers(run_dir: Path) -> list[str]:
    """Temporary or set-aside checkpoint directories (their names start with a dot)."""
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.is_dir() else []


def assert_complete(ckpt: Path) -> None:
    assert {p.name for p in ckpt.iterdir()} == CKPT_FILES
    model = load_model(ckpt)  # config and weights agree
    optimizer, state, rng = load_trainer_state(ckpt, torch.device("cpu"))
    assert state.step == int(ckpt.name.split("_")[1])
    assert optimizer["state"] and set(rng) >= {"torch", "python", "numpy"} and model is not None


def run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


# ------------------------------------------------------------------------------------------ one step


def test_fresh_run_records_the_initial_model_at_step_0(tmp_path, text_corpus):
    """trainer.eval_at_start (the default): the first record is the untrained model's validation loss, equal to
    evaluating it before any step; a resumed run does not add a second one."""
    t = Trainer(make_run(tmp_path, text_corpus, "trainer.max_steps=2", "trainer.eval_at_start=true",
                         "trainer.ckpt_interval=1", model="tiny_moe"))
    initial = t.evaluate()
    t.fit()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[0] == {"step": 0, "tokens": 0, "flops": 0.0, "elapsed_s": 0.0, "val_loss": initial}
    assert abs(initial - math.log(257)) < 0.5  # about uniform over the byte vocabulary at init
    Trainer(make_run(tmp_path, text_corpus, "trainer.max_steps=3", "trainer.eval_at_start=true", "resume=auto",
                     model="tiny_moe")).fit()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]


@pytest.mark.parametrize("model", ["tiny_dense", "tiny_moe"])
def test_one_step(model, tmp_path, text_corpus):
    t = Trainer(make_run(tmp_path, text_corpus, "trainer.max_steps=1", model=model))
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    summary = t.fit()
    changed = [n for n, p in t.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == list(before), "every parameter moves in one AdamW step"

    (rec,) = read_metrics(tmp_path)
    tokens = B * S
    assert rec["step"] == 1 and rec["tokens"] == tokens
    assert rec["flops"] == tokens * flops_per_token(t.model_cfg, S).training
    assert math.isfinite(rec["train_loss"]) and math.isfinite(rec["val_loss"])
    assert abs(rec["train_loss"] - math.log(257)) < 0.5  # about uniform over the byte vocabulary at init
    assert rec["lr"] == lr_at(0, t.cfg.optim, 1) and rec["tokens_per_s"] > 0 and rec["grad_norm"] > 0
    assert summary["final_val_loss"] == rec["val_loss"] and summary["steps"] == 1 and summary["tokens"] == tokens

    moe_keys = sorted(k for k in rec if k.startswith("moe/"))
    if model == "tiny_dense":
        assert moe_keys == [] and "load_balancing_loss" not in rec
        assert t.model_cfg.sparse_layers == ()
    else:
        assert t.model_cfg.sparse_layers == (0, 1)
        k = t.model_cfg.moe.router.top_k
        for i in (0, 1):
            counts = rec[f"moe/layer{i}/tokens_per_expert"]
            assert len(counts) == 8 and sum(counts) == tokens * k  # dropless: every token reaches k experts
            assert rec[f"moe/layer{i}/dropped_fraction"] == 0.0
            assert f"moe/layer{i}/router_entropy" in rec
        assert rec["load_balancing_loss"] > 0 and rec["router_z_loss"] > 0
    assert t.model_cfg.vocab_size == 257  # sized to the byte tokenizer, not the preset

    info = run_json(tmp_path)
    assert info["status"] == "finished" and info["summary"]["steps"] == 1
    assert info["config"]["model"] == t.model_cfg.to_dict() and info["vocab_size"] == 257
    assert_complete(tmp_path / "checkpoints" / "step_1")
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------ run A: 6 steps
# One noisy MoE run that several tests compare against: checkpoints at steps 3 and 6, a record every step.


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, text_corpus) -> Path:
    run_dir = tmp_path_factory.mktemp("run_a")
    train(run_dir, text_corpus, *NOISY, "trainer.max_steps=6", "trainer.ckpt_interval=3")
    return run_dir


def a_overrides() -> list[str]:
    return [*NOISY, "trainer.max_steps=6", "trainer.ckpt_interval=3"]


def test_records_over_steps(run_a):
    records = read_metrics(run_a)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    info = run_json(run_a)
    cfg = ModelConfig.from_dict(info["config"]["model"])
    fpt = flops_per_token(cfg, S).training
    assert info["flops_per_token"] == fpt
    run = run_config_from_dict({k: v for k, v in info["config"].items() if k != "run_dir"}, str(run_a))
    for r in records:
        assert r["tokens"] == r["step"] * B * S * 1
        assert r["flops"] == r["step"] * B * S * fpt
        assert r["lr"] == lr_at(r["step"] - 1, run.optim, 6)
        assert math.isfinite(r["train_loss"]) and r["tokens_per_s"] > 0
        assert ("val_loss" in r) == (r["step"] == 6)  # eval_interval=0: only at the end
        assert sum(r["moe/layer0/tokens_per_expert"]) == B * S * 2
    assert [r["lr"] for r in records][:2] == [1.5e-3, 3e-3]  # warmup of 2 steps to optim.lr
    assert records[-1]["lr"] < records[2]["lr"]  # then cosine decay
    assert info["summary"]["final_val_loss"] == records[-1]["val_loss"]
    assert [s for s, _ in checkpoint_dirs(run_a)] == [3, 6]
    for _, path in checkpoint_dirs(run_a):
        assert_complete(path)
    assert leftovers(run_a) == []


def test_resume_from_copied_checkpoint_is_exact(run_a, tmp_path, text_corpus):
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(run_a / "checkpoints" / "step_3", tmp_path / "checkpoints" / "step_3")
    _, summary = train(tmp_path, text_corpus, *a_overrides(), "resume=auto")
    a, b = losses(run_a), losses(tmp_path)
    assert steps(tmp_path) == [4, 5, 6]
    assert [b[s] for s in (4, 5, 6)] == [a[s] for s in (4, 5, 6)]  # bitwise
    assert summary["final_val_loss"] == read_metrics(run_a)[-1]["val_loss"]
    assert summary["tokens"] == 6 * B * S
    wa = load_file(str(run_a / "checkpoints" / "step_6" / "model.safetensors"))
    wb = load_file(str(tmp_path / "checkpoints" / "step_6" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_without_rng_state_differs(run_a, tmp_path, text_corpus, monkeypatch):
    """Control for the test above: the noise in these runs does depend on the restored RNG state."""
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(run_a / "checkpoints" / "step_3", tmp_path / "checkpoints" / "step_3")
    monkeypatch.setattr(trainer_mod, "set_rng_state", lambda state: None)
    train(tmp_path, text_corpus, *a_overrides(), "resume=auto", "trainer.max_steps=4")
    assert losses(tmp_path)[4] != losses(run_a)[4]


def test_resume_in_place_truncates_metrics(run_a, tmp_path, text_corpus):
    run_dir = tmp_path / "run"
    shutil.copytree(run_a, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_6")  # as if the run had died after step 6's record
    train(run_dir, text_corpus, *a_overrides(), "resume=auto")
    assert steps(run_dir) == [1, 2, 3, 4, 5, 6]  # steps 4..6 rewritten, not duplicated
    assert losses(run_dir) == losses(run_a)


def test_resume_finished_run_does_nothing(run_a, tmp_path, text_corpus):
    run_dir = tmp_path / "run"
    shutil.copytree(run_a, run_dir)
    _, summary = train(run_dir, text_corpus, *a_overrides(), "resume=auto")
    assert steps(run_dir) == [1, 2, 3, 4, 5, 6] and losses(run_dir) == losses(run_a)
    assert summary["steps"] == 6
    assert summary["final_val_loss"] == read_metrics(run_a)[-1]["val_loss"]  # evaluated, not None


def test_interrupt_then_resume_is_exact(run_a, tmp_path, text_corpus, monkeypatch):
    real = PreparedData.get_batch
    calls = []

    def interrupted(self, split, *args, **kw):
        calls.append(split)
        if len(calls) == 5:  # inside step 5
            raise KeyboardInterrupt
        return real(self, split, *args, **kw)

    monkeypatch.setattr(PreparedData, "get_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, text_corpus, *a_overrides())
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [3, 4]
    assert_complete(tmp_path / "checkpoints" / "step_4")
    assert leftovers(tmp_path) == []
    assert run_json(tmp_path)["status"] == "interrupted"
    assert steps(tmp_path) == [1, 2, 3, 4]

    monkeypatch.setattr(PreparedData, "get_batch", real)
    _, summary = train(tmp_path, text_corpus, *a_overrides(), "resume=auto")
    assert steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    assert losses(tmp_path) == losses(run_a)  # all six, bitwise
    assert summary["final_val_loss"] == read_metrics(run_a)[-1]["val_loss"]
    assert run_json(tmp_path)["status"] == "finished"


def test_interrupt_after_the_update_resumes_exactly(run_a, tmp_path, text_corpus, monkeypatch):
    """Ctrl-C while step 5 is being logged (or evaluated): the weights already hold step 5, so the checkpoint
    is step_5, and it must carry the RNG state after step 5, not before it."""
    real = MetricsLogger.log

    def log(self, record):
        if record["step"] == 5:
            raise KeyboardInterrupt
        real(self, record)

    monkeypatch.setattr(MetricsLogger, "log", log)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, text_corpus, *a_overrides())
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [3, 5]
    assert_complete(tmp_path / "checkpoints" / "step_5")
    monkeypatch.setattr(MetricsLogger, "log", real)
    train(tmp_path, text_corpus, *a_overrides(), "resume=auto")
    # Step 5's record was never written, so its loss is carried into the next record's average.
    a = losses(run_a)
    assert steps(tmp_path) == [1, 2, 3, 4, 6]
    assert losses(tmp_path)[6] == (a[5] + a[6]) / 2
    wa = load_file(str(run_a / "checkpoints" / "step_6" / "model.safetensors"))
    wb = load_file(str(tmp_path / "checkpoints" / "step_6" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ------------------------------------------------------------------------------------------ accumulation


@pytest.mark.parametrize("model", ["tiny_dense", "tiny_moe"])
def test_grad_accum(model, tmp_path, text_corpus, monkeypatch):
    """accum=2 draws two micro-batches per step (indices 2s, 2s+1) and averages them: its first step equals
    one step on the two micro-batches stacked into a batch of 8."""
    real = PreparedData.get_batch
    drawn = []

    def recording(self, split, step, batch_size, seq_len, seed):
        drawn.append((split, step, batch_size))
        return real(self, split, step, batch_size, seq_len, seed)

    monkeypatch.setattr(PreparedData, "get_batch", recording)
    t, summary = train(tmp_path / "accum", text_corpus, "trainer.max_steps=2", "trainer.grad_accum=2", model=model)
    assert drawn == [("train", i, B) for i in range(4)]
    recs = read_metrics(tmp_path / "accum")
    assert [r["tokens"] for r in recs] == [B * S * 2, 2 * B * S * 2]
    assert recs[1]["flops"] == 2 * B * S * 2 * flops_per_token(t.model_cfg, S).training
    assert summary["tokens"] == 2 * B * S * 2
    if model == "tiny_moe":  # counts are summed over the micro-batches
        assert sum(recs[0]["moe/layer1/tokens_per_expert"]) == 2 * B * S * 2

    def stacked(self, split, step, batch_size, seq_len, seed):
        parts = [real(self, split, 2 * step + m, B, seq_len, seed) for m in (0, 1)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    monkeypatch.setattr(PreparedData, "get_batch", stacked)
    train(tmp_path / "big", text_corpus, "trainer.max_steps=1", f"trainer.batch_size={2 * B}", model=model)
    (big,) = read_metrics(tmp_path / "big")
    assert big["tokens"] == recs[0]["tokens"]
    assert big["train_loss"] == pytest.approx(recs[0]["train_loss"], rel=1e-6)
    if model == "tiny_dense":  # (the MoE balancing loss is not linear in the batch)
        assert big["grad_norm"] == pytest.approx(recs[0]["grad_norm"], rel=1e-4)


# ------------------------------------------------------------------------------------------ checkpoints


def test_keep_checkpoints(tmp_path, text_corpus):
    train(tmp_path, text_corpus, "trainer.max_steps=4", "trainer.ckpt_interval=1", "trainer.keep_checkpoints=2",
          model="tiny_dense")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_3", "step_4"]
    for _, path in checkpoint_dirs(tmp_path):
        assert_complete(path)


@pytest.mark.parametrize("where", ["weights", "trainer_state"])
def test_crash_inside_save_keeps_previous_checkpoint(where, tmp_path, text_corpus, monkeypatch):
    calls = []
    if where == "weights":
        real = moe.checkpoint.save_file
        target, name = moe.checkpoint, "save_file"
    else:
        import experiments.trainer_state

        real = experiments.trainer_state.save_file
        target, name = experiments.trainer_state, "save_file"

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kw)

    monkeypatch.setattr(target, name, failing)
    overrides = ["trainer.max_steps=4", "trainer.ckpt_interval=2"]
    with pytest.raises(OSError, match="disk full"):
        train(tmp_path, text_corpus, *overrides, model="tiny_dense")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2"]  # no half step_4
    assert_complete(tmp_path / "checkpoints" / "step_2")

    monkeypatch.setattr(target, name, real)
    train(tmp_path, text_corpus, *overrides, "resume=auto", model="tiny_dense")
    assert steps(tmp_path) == [1, 2, 3, 4]
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [2, 4] and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------ init_from


def test_init_from(tmp_path, text_corpus):
    src, _ = train(tmp_path / "src", text_corpus, "trainer.max_steps=8", "optim.warmup_steps=0")
    ckpt = tmp_path / "src" / "checkpoints" / "step_8"
    # The composed model (a dense preset here) is ignored in favour of the checkpoint's.
    run = make_run(tmp_path / "dst", text_corpus, "trainer.max_steps=1", f"init_from={ckpt}", "seed=7",
                   model="tiny_dense")
    t = Trainer(run)
    assert t.model_cfg == load_config(ckpt) == src.model_cfg
    reference = load_model(ckpt)
    ref_state = reference.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in t.model.state_dict().items())

    x, y = t.data.get_batch("train", 0, B, S, 7)
    expected = reference.train()(x, y).loss.item()  # dropout 0, no jitter: train mode is deterministic
    t.fit()
    (rec,) = read_metrics(tmp_path / "dst")
    assert rec["step"] == 1 and rec["tokens"] == B * S  # a new run: step, tokens and optimizer start afresh
    assert rec["train_loss"] == pytest.approx(expected, rel=1e-6)
    # It starts from trained weights: on the same batch, clearly better than a fresh initialisation.
    torch.manual_seed(7)
    fresh = Transformer(src.model_cfg).train()(x, y).loss.item()
    assert expected < fresh - 0.1


# ------------------------------------------------------------------------------------------ bad inputs


def _checkpoint_copy(run_a: Path, dst: Path, damage=None) -> Path:
    path = dst / "ckpt"
    shutil.copytree(run_a / "checkpoints" / "step_3", path)
    if damage == "config":
        (path / "config.json").write_text('{"model": {"n_layer": 2,')
    elif damage == "weights":
        (path / "model.safetensors").unlink()
    return path


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("router", ValueError, r"name='nope' is not a known router"),
        ("top_k", ValueError, r"top_k=9 is larger than moe.num_experts=8"),
        ("heads", ValueError, r"model.n_head=3 does not divide model.d_model=32"),
        ("seq_len", ValueError, r"trainer.seq_len=64 exceeds model.max_seq_len=32"),
        ("corpus", FileNotFoundError, r"data.path='/nonexistent/corpus.txt' does not exist"),
        ("init_missing", FileNotFoundError, r"checkpoint directory .*nowhere does not exist"),
        ("init_corrupt", ValueError, r"ckpt/config.json: 24 bytes, but manifest.json records"),
        ("init_no_weights", FileNotFoundError, r"model.safetensors is missing"),
        ("resume_model", ValueError, r"resume=auto: .*step_3 was trained with a different model config"),
        ("resume_data", ValueError, r"resume=auto: .*step_3 was trained on different data"),
    ],
)
def test_bad_inputs_raise_before_training(case, error, match, run_a, tmp_path, text_corpus):
    run_dir = tmp_path / "run"
    corpus = text_corpus
    overrides = {
        "router": lambda: ["model.moe.router.name=nope"],
        "top_k": lambda: ["model.moe.router.top_k=9"],
        "heads": lambda: ["model.n_head=3"],
        "seq_len": lambda: ["trainer.seq_len=64"],
        "corpus": lambda: [],
        "init_missing": lambda: [f"init_from={tmp_path / 'nowhere'}"],
        "init_corrupt": lambda: [f"init_from={_checkpoint_copy(run_a, tmp_path, 'config')}"],
        "init_no_weights": lambda: [f"init_from={_checkpoint_copy(run_a, tmp_path, 'weights')}"],
        "resume_model": lambda: [*a_overrides(), "resume=auto", "model.d_model=48"],
        "resume_data": lambda: [*a_overrides(), "resume=auto"],
    }[case]()
    if case == "corpus":
        corpus = Path("/nonexistent/corpus.txt")
    if case.startswith("resume"):
        (run_dir / "checkpoints").mkdir(parents=True)
        shutil.copytree(run_a / "checkpoints" / "step_3", run_dir / "checkpoints" / "step_3")
    if case == "resume_data":
        corpus = tmp_path / "other.txt"
        corpus.write_text(text_corpus.read_text().upper())
    with pytest.raises(error, match=match):
        Trainer(make_run(run_dir, corpus, *overrides))
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "run.json").exists()


def test_unknown_preset_names_the_group(tmp_path, text_corpus):
    with pytest.raises(MissingConfigException, match="model/nope"):
        make_run(tmp_path, text_corpus, model="nope")


def test_missing_data_path_is_refused(tmp_path):
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=["data=text"])
    with pytest.raises(Exception, match="data.path"):
        run_config_from_dict(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True), str(tmp_path))


def test_fresh_run_refuses_a_directory_with_checkpoints(tmp_path, text_corpus):
    train(tmp_path / "run", text_corpus, "trainer.max_steps=1")
    with pytest.raises(ValueError, match="already holds checkpoints.*resume=auto"):
        Trainer(make_run(tmp_path / "run", text_corpus, "trainer.max_steps=2"))


def test_a_crash_marks_the_run_failed(tmp_path, text_corpus, monkeypatch):
    t = Trainer(make_run(tmp_path / "run", text_corpus, "trainer.max_steps=3"))
    monkeypatch.setattr(t, "device_step", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        t.fit()
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "failed" and "boom" in info["summary"]["error"]


def test_collapse_warning_fires_in_training(tmp_path, text_corpus, monkeypatch):
    # Force a collapse: every router's gate sends all tokens to expert 0 and training cannot move it (lr ~ 0).
    t = Trainer(make_run(tmp_path / "run", text_corpus, "trainer.max_steps=3", "optim.lr=1e-12", "optim.min_lr=0"))
    t.collapse.patience = 2
    with torch.no_grad():
        for block in t.model.blocks:
            if hasattr(block.ffn, "router"):
                block.ffn.router.gate.weight.zero_()
                block.ffn.router.gate.weight[0] = 1e3  # expert 0's logit dominates for any positive-sum input
                block.ffn.router.gate.weight[1] = -1e3
    with pytest.warns(UserWarning, match="has collapsed: expert"):
        t.fit()
