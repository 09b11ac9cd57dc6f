"""The command-line applications in subprocesses, as a user runs them: train (its log lines on a pipe, train.log,
run.json, the checkpoint), generate from its checkpoint, resuming a finished run, a bad override."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.generate import generate_text
from experiments.metrics import read_metrics
from tests.experiments.test_train import B, REPO_ROOT, S, TINY, assert_complete, data_overrides, run_json, steps


def _cli(args: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _cli_overrides(corpus: Path) -> list[str]:
    return ["model=tiny_moe", *data_overrides(corpus), *[o for o in TINY if "log_interval" not in o]]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, text_corpus) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    proc = _cli(["-m", "experiments.train", *_cli_overrides(text_corpus), "trainer.max_steps=3",
                 f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    return run_dir, proc


def test_cli_train(cli_run):
    run_dir, proc = cli_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final validation loss" in proc.stdout
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [3]  # log_interval 1 was left out: only the final record
    assert records[0]["tokens"] == 3 * B * S and "val_loss" in records[0]
    info = run_json(run_dir)
    assert info["status"] == "finished" and info["summary"]["steps"] == 3
    assert info["summary"]["final_val_loss"] == records[0]["val_loss"]
    assert f"{records[0]['val_loss']:.4f}" in proc.stdout
    assert_complete(run_dir / "checkpoints" / "step_3")
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    # Output to a pipe, as under Slurm: plain lines, one per record; Hydra's train.log holds each line once
    # (Hydra's own handler on the same file writes none of them a second time) and the final result.
    assert "\r" not in proc.stdout + proc.stderr
    step_lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(step_lines) == 1 and step_lines[0].startswith("step 3/3 | loss ") and "val loss" in step_lines[0]
    log = (run_dir / "train.log").read_text().splitlines()
    assert log.count(step_lines[0]) == 1 and sum("final validation loss" in line for line in log) == 1
    described = [line for line in proc.stdout.splitlines() if line.startswith(("data ", "model: ", "dispatcher: "))]
    assert len(described) == 3 and all(log.count(line) == 1 for line in described)


def test_cli_generate(cli_run, tmp_path):
    run_dir, proc = cli_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "step_3"
    out = _cli(["-m", "experiments.generate", f"checkpoint={ckpt}", "max_new_tokens=5", "temperature=0",
                "device=cpu"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    sample = out.stdout.split("--- sample 0 ---\n", 1)[1].rstrip("\n")
    assert sample.startswith("ROMEO:")
    assert sample == generate_text(ckpt, "ROMEO:", max_new_tokens=5, temperature=0, device="cpu")[0]


def test_cli_resume_finished_run(cli_run, text_corpus):
    run_dir, proc = cli_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = _cli(["-m", "experiments.train", *_cli_overrides(text_corpus), "trainer.max_steps=3", "resume=auto",
                  f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "final validation loss" in again.stdout
    assert steps(run_dir) == [3]


@pytest.mark.parametrize(
    "override, expected",
    [("model.n_head=3", "model.n_head=3 does not divide"), ("model.moe.foo=1", "model.moe.foo")],
)
def test_cli_bad_override(override, expected, tmp_path, text_corpus):
    proc = _cli(["-m", "experiments.train", *_cli_overrides(text_corpus), override, "trainer.max_steps=1",
                 f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
