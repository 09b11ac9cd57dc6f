"""Preemption under torchrun: a signal that reaches one rank stops every rank after the same step, that step is
saved, and resuming reproduces the uninterrupted 2-process run bit for bit."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.preemption import PREEMPTED_EXIT
from experiments.trainer import checkpoint_dirs
from tests.distributed._spawn import REPO_ROOT, launch_train
from tests.experiments.test_train import data_overrides, losses, run_json, steps
from tests.experiments.test_trustworthy_runs import PREEMPT_RUN, wait_for_records

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

DDP = [*PREEMPT_RUN, "trainer=ddp", "trainer.collective_timeout_s=60"]


def _rank_pid(torchrun_pid: int, rank: int, timeout_s: float = 60.0) -> int:
    """The worker process of `rank` among torchrun's children (found by the RANK torchrun put in its environment)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
        for pid in map(int, children):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return pid
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} under torchrun {torchrun_pid}")


def test_sigusr1_on_one_rank_stops_both_after_the_same_step_and_resumes_exactly(tmp_path, text_corpus):
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    args = [*DDP, *data_overrides(text_corpus)]
    launch_train(2, [*args, f"hydra.run.dir={reference}"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "experiments.train", *args, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for_records(run_dir, proc, 20)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGUSR1)  # rank 1 only: rank 0 learns of it from the agreement
    out, _ = proc.communicate(timeout=180)
    assert f"exitcode  : {PREEMPTED_EXIT}" in out, out[-4000:]
    info = run_json(run_dir)  # written by rank 0, which saw no signal itself
    assert info["status"] == "preempted" and info["summary"]["signal"] is None, info  # rank 0 was not signalled
    stopped = info["summary"]["step"]
    assert 20 <= stopped < 150 and steps(run_dir)[-1] == stopped and checkpoint_dirs(run_dir)[-1][0] == stopped
    launch_train(2, [*args, f"hydra.run.dir={run_dir}", "resume=auto"])
    assert losses(run_dir) == losses(reference)
