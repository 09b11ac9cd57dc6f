"""What a run promises about its checkpoints: no pickle is ever read, NaNs are neither applied nor saved, damaged
files are found and passed over, preemption saves the step it was on, and crash leftovers do not accumulate."""
from __future__ import annotations

import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moe.checkpoint
from experiments.metrics import METRICS_FILE, read_metrics
from experiments.preemption import PREEMPTED_EXIT
from experiments.trainer import Trainer, checkpoint_dirs
from experiments.trainer_state import JSON_FILE, LEGACY_FILE, TENSORS_FILE, load_trainer_state
from moe.manifest import MANIFEST_FILE
from moe.model import Transformer
from tests.experiments.test_train import REPO_ROOT, TINY, data_overrides, losses, make_run, run_json, steps, train

CKPT = ["trainer.ckpt_interval=2", "trainer.keep_checkpoints=3"]


class _Payload:
    """Unpickling this writes a marker file: the stand-in for code a hostile checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def run4(tmp_path_factory, text_corpus) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("run4")
    train(run_dir, text_corpus, "trainer.max_steps=4", *CKPT)
    return run_dir


def _copy_run(run4: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(run4 / "checkpoints", dst / "checkpoints")
    shutil.copy(run4 / METRICS_FILE, dst / METRICS_FILE)
    return dst


# ------------------------------------------------------------------------------------------ no pickle


def test_pickled_trainer_state_is_refused_and_never_run(run4, tmp_path, text_corpus):
    """A checkpoint whose state file is a pickle (the old format, or a hostile one) is refused by name on
    resume=auto, and the payload never runs."""
    run_dir = _copy_run(run4, tmp_path / "run")
    ckpt = run_dir / "checkpoints" / "step_4"
    for name in (TENSORS_FILE, JSON_FILE, MANIFEST_FILE):
        (ckpt / name).unlink()
    marker = tmp_path / "payload-ran"
    (ckpt / LEGACY_FILE).write_bytes(pickle.dumps({"optimizer": _Payload(marker)}))
    with pytest.warns(UserWarning, match="no manifest.json"):
        with pytest.raises(ValueError, match=r"trainer_state.pt is a pickle .* refused"):
            train(run_dir, text_corpus, "trainer.max_steps=6", *CKPT, "resume=auto")
    assert not marker.exists()


def test_checkpoint_files_are_safetensors_and_json(run4):
    ckpt = run4 / "checkpoints" / "step_4"
    assert not (ckpt / LEGACY_FILE).exists()
    json.loads((ckpt / JSON_FILE).read_text())  # plain JSON
    assert "rng/torch" in load_file(str(ckpt / TENSORS_FILE))
    optimizer, state, _ = load_trainer_state(ckpt, torch.device("cpu"))
    assert state.step == 4 and all(float(s["step"]) == 4.0 for s in optimizer["state"].values())


def test_every_file_of_a_checkpoint_has_the_same_permissions(run4):
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (run4 / "checkpoints" / "step_4").iterdir()}
    assert len(set(modes.values())) == 1, modes
    assert stat.S_IMODE((run4 / "checkpoints" / "step_4").stat().st_mode) & 0o055 == 0o055  # readable by others


# ------------------------------------------------------------------------------------------ non-finite steps


def test_a_diverging_run_keeps_only_finite_checkpoints_and_resumes_with_a_sane_lr(tmp_path, text_corpus):
    run = ["trainer.max_steps=10", "trainer.ckpt_interval=1", "trainer.keep_checkpoints=3",
           "trainer.max_skipped_steps=2", "optim.warmup_steps=0", "optim.min_lr=0"]
    with pytest.warns(UserWarning, match="gradient norm is not finite"):
        with pytest.raises(FloatingPointError, match=r"3 steps in a row .* last good checkpoint is .*step_1"):
            train(tmp_path, text_corpus, *run, "optim.lr=1e3")
    records = read_metrics(tmp_path)
    assert [r["skipped_steps"] for r in records][-3:] == [1, 2, 3]
    assert run_json(tmp_path)["status"] == "failed"
    # step_2's weights gave NaN gradients on three batches: set aside, never resumed
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1", "step_2.diverged"]
    for step, path in checkpoint_dirs(tmp_path):
        assert all(torch.isfinite(t).all() for t in load_file(str(path / "model.safetensors")).values())
        optimizer, _, _ = load_trainer_state(path, torch.device("cpu"))
        assert all(torch.isfinite(t).all() for s in optimizer["state"].values() for t in s.values())
    summary = Trainer(make_run(tmp_path, text_corpus, *run, "optim.lr=1e-3", "resume=auto")).fit()
    assert summary["steps"] == 10 and summary["skipped_steps"] == 0
    assert all(r["train_loss"] is not None for r in read_metrics(tmp_path))


def test_a_nan_step_is_skipped_without_touching_weights_or_moments(tmp_path, text_corpus, monkeypatch):
    """One batch with a NaN loss (step 3): no update, no moment change, counted; the run goes on."""
    real = Transformer.forward
    calls = {"n": 0}

    def forward(self, x, y=None):
        out = real(self, x, y)
        if self.training and y is not None:
            calls["n"] += 1
            if calls["n"] == 3:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", forward)
    run = ["trainer.ckpt_interval=1", "trainer.keep_checkpoints=5"]
    with pytest.warns(UserWarning, match="step 3: the gradient norm is not finite"):
        train(tmp_path, text_corpus, "trainer.max_steps=3", *run, model="tiny_dense")
    ck = tmp_path / "checkpoints"
    w2, w3 = load_file(str(ck / "step_2" / "model.safetensors")), load_file(str(ck / "step_3" / "model.safetensors"))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    o2, o3 = (load_trainer_state(ck / f"step_{s}", torch.device("cpu"))[0]["state"] for s in (2, 3))
    assert all(torch.equal(o2[i][k], o3[i][k]) for i in o2 for k in o2[i])
    train(tmp_path, text_corpus, "trainer.max_steps=5", *run, "resume=auto", model="tiny_dense")
    w5 = load_file(str(ck / "step_5" / "model.safetensors"))
    assert any(not torch.equal(w3[k], w5[k]) for k in w3)  # training goes on after the skip
    records = {r["step"]: r for r in read_metrics(tmp_path)}
    assert records[3]["train_loss"] is None and records[3]["skipped_steps"] == 1 and records[5]["skipped_steps"] == 1
    assert all(records[s]["train_loss"] is not None for s in (1, 2, 4, 5))


def test_a_non_finite_weight_is_never_saved(tmp_path, text_corpus, monkeypatch):
    trainer = Trainer(make_run(tmp_path, text_corpus, "trainer.max_steps=2", model="tiny_dense"))
    with torch.no_grad():
        trainer.model.embed.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"not saving .*step_0: weight embed.weight is not finite"):
        trainer.save()
    assert checkpoint_dirs(tmp_path) == []


# ------------------------------------------------------------------------------------------ verification


def test_flipped_bytes_in_the_newest_checkpoint_fall_back_to_the_previous_one(run4, tmp_path, text_corpus, capsys):
    reference = tmp_path / "reference"
    train(reference, text_corpus, "trainer.max_steps=6", *CKPT)
    run_dir = _copy_run(run4, tmp_path / "run")
    weights = run_dir / "checkpoints" / "step_4" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = os.urandom(64)  # same size: only the hash can tell
    weights.write_bytes(bytes(data))
    train(run_dir, text_corpus, "trainer.max_steps=6", *CKPT, "resume=auto")
    out = capsys.readouterr().out
    assert "checkpoint step_4 is damaged: model.safetensors" in out and "continuing from step_2" in out
    assert (run_dir / "checkpoints" / "step_4.damaged").is_dir()
    assert steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert losses(run_dir) == losses(reference)  # continued exactly from step 2


def test_a_damaged_state_file_names_itself(run4, tmp_path, text_corpus):
    run_dir = _copy_run(run4, tmp_path / "run")
    for step in (2, 4):
        (run_dir / "checkpoints" / f"step_{step}" / JSON_FILE).write_text("{}")
    with pytest.raises(ValueError, match=r"every checkpoint .* is damaged .*trainer_state.json: 2 bytes"):
        train(run_dir, text_corpus, "trainer.max_steps=6", *CKPT, "resume=auto")


def test_init_from_and_generate_verify_the_weights(run4, tmp_path, text_corpus):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(run4 / "checkpoints" / "step_4", ckpt)
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors: its SHA-256 differs"):
        train(tmp_path / "run", text_corpus, "trainer.max_steps=1", f"init_from={ckpt}")
    with pytest.raises(ValueError, match=r"model.safetensors: its SHA-256 differs"):
        moe.checkpoint.load_model(ckpt)


# ------------------------------------------------------------------------------------------ leftovers and records


def test_leftovers_of_crashed_writes_are_removed_at_start(run4, tmp_path, text_corpus):
    run_dir = _copy_run(run4, tmp_path / "run")
    root = run_dir / "checkpoints"
    for name in (".step_6.tmp-abc123", ".step_2.old-99", ".step_1.trash-7"):
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(b"x" * 100)
    train(run_dir, text_corpus, "trainer.max_steps=6", *CKPT, "resume=auto")
    assert sorted(p.name for p in root.iterdir()) == ["step_2", "step_4", "step_6"]


def test_a_metrics_line_cut_mid_record_is_dropped_on_resume(run4, tmp_path, text_corpus):
    run_dir = _copy_run(run4, tmp_path / "run")
    with (run_dir / METRICS_FILE).open("a") as f:
        f.write('{"step": 5, "tokens": 3')  # a kill or a full disk during the write
    with pytest.warns(UserWarning, match="dropped its last line"):
        train(run_dir, text_corpus, "trainer.max_steps=6", *CKPT, "resume=auto")
    assert steps(run_dir) == [1, 2, 3, 4, 5, 6]


def test_disk_full_during_a_save_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, text_corpus,
                                                                                   monkeypatch):
    real, calls = moe.checkpoint.save_file, []

    def full(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kw)

    monkeypatch.setattr(moe.checkpoint, "save_file", full)
    with pytest.raises(OSError, match=r"could not write checkpoint .*step_4 .*No space left.* previous checkpoint "
                                      r".*step_2 is intact"):
        train(tmp_path, text_corpus, "trainer.max_steps=4", *CKPT)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2"]


# ------------------------------------------------------------------------------------------ preemption


PREEMPT_RUN = [  # a model large enough that a step takes a few milliseconds: the signal lands mid-run
    "model=tiny_moe", *TINY, "model.d_model=64", "model.d_ff=128", "model.n_layer=3", "trainer.max_steps=150",
    "trainer.ckpt_interval=50", "trainer.threads=1", "optim.warmup_steps=5",
]


def _cli(run_dir: Path, corpus: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.train", *PREEMPT_RUN, *data_overrides(corpus),
            f"hydra.run.dir={run_dir}", *extra]


def wait_for_records(run_dir: Path, proc: subprocess.Popen, n: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        path = run_dir / METRICS_FILE
        if path.is_file() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run wrote fewer than {n} records (exit code {proc.poll()})")


@pytest.mark.slow
def test_a_preemption_signal_saves_the_step_and_the_run_continues_exactly(tmp_path, text_corpus):
    """SIGTERM (SIGUSR1 in the torchrun test) mid-run: the step it was on is saved, run.json says preempted, the
    exit status is PREEMPTED_EXIT, and resume=auto reproduces the uninterrupted run bit for bit."""
    signum = signal.SIGTERM
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    subprocess.run(_cli(reference, text_corpus), cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    proc = subprocess.Popen(_cli(run_dir, text_corpus), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for_records(run_dir, proc, 20)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, out[-3000:]
    info = run_json(run_dir)
    assert info["status"] == "preempted" and info["summary"]["signal"] == signal.Signals(signum).name
    stopped = info["summary"]["step"]
    assert 20 <= stopped < 150 and steps(run_dir)[-1] == stopped
    assert checkpoint_dirs(run_dir)[-1][0] == stopped  # the checkpoint of the step it was on
    subprocess.run(_cli(run_dir, text_corpus, "resume=auto"), cwd=REPO_ROOT, env=env, check=True,
                   capture_output=True)
    assert losses(run_dir) == losses(reference)
    assert run_json(run_dir)["status"] == "finished"


def test_a_handler_installed_before_ours_gets_the_signal_after_the_save(monkeypatch):
    """submitit's requeue handler (on SIGUSR2) must still run, but only once the checkpoint is written."""
    from experiments.preemption import Preempted, PreemptionFlag, exit_preempted

    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        with PreemptionFlag() as flag:
            signal.raise_signal(signal.SIGUSR2)
            assert flag.received == signal.SIGUSR2 and seen == []  # ours only sets the flag
        with pytest.raises(SystemExit) as exit_info:
            exit_preempted(Preempted(signal.SIGUSR2, 7, "ckpt"))
        assert seen == [signal.SIGUSR2] and exit_info.value.code == PREEMPTED_EXIT
    finally:
        signal.signal(signal.SIGUSR2, previous)
