"""Launching the `distributed` tests: spawned gloo workers (a free port, a deadline, one thread), training runs
under torchrun or the deepspeed launcher, and launches that must be refused before any process group exists."""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int, timeout_s: float = 60.0) -> None:
    """Joins the gloo group of a spawned worker (one intra-op thread: the CI machine has 2 cores)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def run_workers(fn, world: int, *args, timeout_s: float = 120.0) -> None:
    """Runs fn(rank, world, port, *args) in `world` spawned processes; a worker's exception fails the test with
    its traceback, and a run past timeout_s is killed instead of hanging the suite."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{world} workers of {fn.__name__} did not finish in {timeout_s:.0f} s")


REPO_ROOT = Path(__file__).resolve().parents[2]


def launch_train(nproc: int, args: list[str], launcher: str = "torchrun", timeout_s: float = 240.0) -> None:
    """`python -m experiments.train ARGS` on nproc processes under torchrun or DeepSpeed's launcher (with
    --no_local_rank: it would otherwise append --local_rank, which Hydra refuses); a failure shows both outputs."""
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "experiments.train", *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}", "--no_local_rank",
               f"--master_port={free_port()}", "--module", "experiments.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"{launcher} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


# What torchrun sets for rank 0 of 2 (the port is never used: the launches below must fail before connecting).
TORCHRUN_ENV = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


def assert_refused(run, env: dict, match: str, run_dir: Path, monkeypatch) -> None:
    """Building a Trainer for `run` under the launcher environment `env` raises ValueError(match) before any
    process group or checkpoint exists."""
    from experiments.trainer import Trainer

    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        Trainer(run)
    assert not dist.is_initialized()
    assert not (Path(run_dir) / "checkpoints").exists()
