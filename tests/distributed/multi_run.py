"""Several training runs in one torchrun launch: `python -m torch.distributed.run --standalone --nproc_per_node=N
-m tests.distributed.multi_run SPEC.json`, where SPEC.json is {"runs": [{"dir": RUN_DIR, "overrides": [...]},
...]} (launch_runs below writes it and launches it).

Why: a launch costs seconds of process start-up (torchrun's agent and every worker import torch, Hydra and the
project) and milliseconds of training for the tiny runs of the distributed tests, so one launch that trains the
runs of a module one after the other replaces several. Every worker composes each run's config as
experiments.train does (the same Hydra config, the same overrides), trains it with the same Trainer and leaves the
process group (engine.close), then joins the next run's fresh group.

Each run gets a rendezvous port of its own (rank 0 finds a free one just before the run and hosts that run's
store; the others read the port from torchrun's agent store): the agent store keeps the keys of a destroyed group,
and a second default group of the same name would read its peers' stale addresses.

The app's own command line under torchrun and DeepSpeed's launcher stays covered by the tests that launch
experiments.train (test_ddp, test_deepspeed, test_preemption, test_hangs). DeepSpeed runs cannot share a launch:
experiments.engines.deepspeed.expert_groups creates DeepSpeed's expert groups once per process, so a second run
would get the groups of the first run's destroyed world."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from experiments.config import run_config_from_dict
from experiments.hydra_conf import register_configs
from tests.distributed._spawn import REPO_ROOT, free_port


def run_port(agent, index: int) -> int:
    """The rendezvous port of run `index`: rank 0 finds a free one and posts it in torchrun's agent store."""
    key = f"multi_run/{index}/port"
    if os.environ["RANK"] == "0":
        agent.set(key, str(free_port()))
    return int(agent.get(key))


def train_one(run_dir: str, overrides: list[str], port: int) -> None:
    """Composes and trains one run in this worker, on a process group of its own at `port`."""
    from experiments.trainer import Trainer

    os.environ["MASTER_PORT"] = str(port)
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"  # rank 0 hosts this run's store at `port`
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    run = run_config_from_dict(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True), run_dir)
    trainer = Trainer(run)
    try:
        trainer.fit()
    finally:
        trainer.engine.close()


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    register_configs()
    # torchrun's own store (the workers are its clients), for the ports only
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=120))
    for i, r in enumerate(spec["runs"]):
        print(f"multi_run: run {i + 1} of {len(spec['runs'])}: {r['dir']}", flush=True)
        train_one(r["dir"], r["overrides"], run_port(agent, i))


def launch_runs(nproc: int, runs: list[tuple[Path, list[str]]], spec_dir: Path, timeout_s: float = 300.0) -> None:
    """Trains runs [(run_dir, overrides)] one after the other in one torchrun launch of nproc workers."""
    spec = spec_dir / f"multi_run_{len(list(spec_dir.glob('multi_run_*.json')))}.json"
    spec.write_text(json.dumps({"runs": [{"dir": str(d), "overrides": list(o)} for d, o in runs]}, indent=1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tests.distributed.multi_run", str(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m tests.distributed.multi_run SPEC.json")
    main(sys.argv[1])
