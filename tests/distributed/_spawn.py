"""Spawning gloo worker processes for the `distributed` tests: a free port, a deadline, tiny shapes, one thread."""
from __future__ import annotations

import datetime
import os
import socket
import time

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
