"""Hangs name their place: every collective of the training loop (experiments.engines.ranks.Torchrun) and of the
gradient reduction (moe.parallel) that fails
or outlives trainer.collective_timeout_s raises MoECollectiveError naming this rank, the world size, the phase (for
the gradient reduction the first and last parameters of its bucket) and the setting to raise. Also `agree`, the
one-scalar vote the trainer takes for preemption. End to end: a rank stopped with SIGSTOP under torchrun."""
from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from experiments.engines.ranks import OneProcess, Torchrun
from moe import parallel
from moe.dispatch.alltoall import MoECollectiveError
from moe.model import Transformer
from moe.parallel import ParallelGroups, make_groups
from moe.presets import get_preset
from tests.distributed._spawn import REPO_ROOT, init_gloo, run_workers
from tests.experiments.test_train import TINY, data_overrides

pytestmark = pytest.mark.distributed

SETTING = "trainer.collective_timeout_s"
# the tiny sizes of the training tests, dense, never evaluating or saving before the end
RUN = ["model=tiny_dense", *TINY, "trainer.ckpt_interval=0", "trainer.threads=1", "trainer.max_steps=1000000"]


# ---------------------------------------------------------------- every phase, in one process (collectives fail)

def _timed_out(*args, **kwargs):
    raise RuntimeError("Timed out waiting 5000ms for recv operation to complete")


@pytest.fixture
def broken(monkeypatch):
    """The ranks of a torchrun launch as rank 1 of 4 whose every collective times out."""
    for name in ("all_reduce", "barrier", "broadcast_object_list", "all_gather"):
        monkeypatch.setattr(dist, name, _timed_out)
    groups = ParallelGroups(world_size=4, rank=1, ep_size=1, ep_rank=0, ep_group=None, expert_dp_group=object(),
                            world_group=object(), timeout_s=5.0, timeout_setting=SETTING)
    return Torchrun(groups, torch.device("cpu"))


def _message(call) -> str:
    with pytest.raises(MoECollectiveError) as e:
        call()
    message = str(e.value)
    assert "on rank 1 (world size 4)" in message, message
    assert f"({SETTING}, now 5 s)" in message and "caused by RuntimeError: Timed out waiting 5000ms" in message
    assert isinstance(e.value.__cause__, RuntimeError)
    return message


def test_gradient_reduction_names_the_bucket(broken):
    model = Transformer(get_preset("tiny_dense").replace(n_layer=2, d_model=32, n_head=2, d_ff=64, vocab_size=64))
    model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long)).loss.backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    message = _message(lambda: parallel.reduce_gradients(list(model.parameters()), broken.groups,
                                                         names=model.named_parameters))
    assert f"during the gradient reduction: a bucket of {len(names)} float32 gradients" in message, message
    assert f"from {names[0]} to {names[-1]}, summed over all 4 ranks" in message, message


@pytest.mark.parametrize("phase, call, passing", [
    ("metrics reduction: the training loss and the aux losses ['z']",
     lambda par: par.reduce_logged(1.0, {"z": 0.5}, {}), 0),
    ("metrics reduction: the routing statistics ['tokens_per_expert'] of layer 3",
     lambda par: par.reduce_logged(1.0, {}, {3: {"tokens_per_expert": torch.ones(4)}}), 1),
    ("metrics reduction: a mean over the ranks (the validation loss)", lambda par: par.mean(2.0), 0),
    ("stop agreement: whether any rank was asked to stop", lambda par: par.agree(True), 0),
    ("checkpoint barrier (rank 0 writes the checkpoint while the others wait)", lambda par: par.barrier(), 0),
    ("broadcast from rank 0: a str", lambda par: par.broadcast("dir"), 0),
    ("barrier before this rank's turn of main_first", lambda par: par.main_first(lambda: 1), 0),
])
def test_every_collective_names_its_phase(broken, monkeypatch, phase, call, passing):
    """passing: all-reduces that succeed first (the losses' one, before the routing statistics')."""
    calls = []

    def all_reduce(*args, **kwargs):
        calls.append(1)
        if len(calls) > passing:
            _timed_out()

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    assert f"during the {phase}" in _message(lambda: call(broken))


def test_gradient_norm_and_checkpoint_gather_name_theirs(monkeypatch):
    monkeypatch.setattr(dist, "all_reduce", _timed_out)
    monkeypatch.setattr(dist, "all_gather", _timed_out)
    groups = ParallelGroups(world_size=4, rank=1, ep_size=2, ep_rank=1, ep_group=object(), expert_dp_group=object(),
                            world_group=object(), timeout_s=5.0, timeout_setting=SETTING)
    p = torch.nn.Parameter(torch.ones(3))
    p.allreduce, p.grad = False, torch.ones(3)
    with pytest.raises(MoECollectiveError, match=r"rank 1 \(world size 4\) during the gradient norm: .* over the 2 "
                                                 r"ranks of the expert-parallel group"):
        parallel.clip_grad_norm([p], 1.0, groups)

    class Bank:
        ep_size, ep_rank, ep_group, layer_name = 2, 1, object(), "blocks.1.ffn"

    # Called without the app's groups, the library names its own setting (issue 19), not the trainer's key.
    with pytest.raises(MoECollectiveError, match=r"during the checkpoint gather: blocks.1.ffn.experts.w_up of MoE "
                                                 r"layer blocks.1.ffn, expert shard 1 of 2 .*init_process_group\(timeout"):
        parallel.gather_shards(torch.ones(2, 3), Bank(), what="blocks.1.ffn.experts.w_up")


def test_single_agrees_with_itself():
    one = OneProcess(torch.device("cpu"))
    assert one.agree(True) is True and one.agree(False) is False


# ---------------------------------------------------------------- real gloo: the vote, and a peer that never comes

def _agree_worker(rank: int, world: int, port: int, out_path: str) -> None:
    init_gloo(rank, world, port)
    par = Torchrun(make_groups(1, 1), torch.device("cpu"))
    votes = [par.agree(rank == 1), par.agree(False), par.agree(rank == 0)]
    Path(f"{out_path}.{rank}").write_text(json.dumps(votes))
    dist.destroy_process_group()


def test_agree_is_true_on_every_rank_if_any_rank_says_so(tmp_path):
    out = tmp_path / "votes"
    run_workers(_agree_worker, 2, str(out), timeout_s=60)
    for rank in range(2):
        assert json.loads(Path(f"{out}.{rank}").read_text()) == [True, False, True], rank


def _absent_peer_worker(rank: int, world: int, port: int, out_path: str) -> None:
    init_gloo(rank, world, port, timeout_s=2.0)
    groups = make_groups(1, 1, timeout=datetime.timedelta(seconds=2), timeout_setting=SETTING)
    model = Transformer(get_preset("tiny_dense").replace(n_layer=2, d_model=32, n_head=2, d_ff=64, vocab_size=64))
    done = Path(out_path)
    if rank == 0:
        model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long)).loss.backward()
        try:
            parallel.reduce_gradients(list(model.parameters()), groups, names=model.named_parameters)
            message = "no error"
        except MoECollectiveError as e:
            message = str(e)
        done.write_text(message)
    else:  # never reaches the gradient reduction: alive until rank 0 has reported, so rank 0 sees a timeout
        deadline = time.monotonic() + 30
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    os._exit(0)  # the group is broken on purpose: tearing it down can abort in gloo's destructors


def test_absent_peer_in_gradient_reduction_names_rank_and_bucket(tmp_path):
    path = tmp_path / "absent.txt"
    run_workers(_absent_peer_worker, 2, str(path), timeout_s=60)
    message = path.read_text()
    assert "collective failed on rank 0 (world size 2) during the gradient reduction: a bucket of" in message, message
    assert "from embed" in message and f"({SETTING}, now 2 s)" in message and "Timed out" in message, message


# ---------------------------------------------------------------- end to end: SIGSTOP a rank under torchrun

def _workers(parent: int) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes (its children, each in its own session)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = int(entry.name)
    return out


def _wait(what: str, until, timeout_s: float, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = until()
        if got:
            return got
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"waiting for {what}: torchrun rc={proc.poll()}\n{log.read_text()[-6000:]}")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def _kill(pid: int) -> None:
    for sig in (signal.SIGKILL, signal.SIGCONT):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_stopped_rank_is_named_by_the_survivor(tmp_path, text_corpus):
    """Rank 1 stopped mid-run (SIGSTOP): rank 0 fails after trainer.collective_timeout_s naming itself, the world size
    and the phase it waited in, on stderr and in run.json."""
    timeout_s = 6
    run_dir, log = tmp_path / "run", tmp_path / "torchrun.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "experiments.train", *RUN, *data_overrides(text_corpus), "trainer=ddp",
           f"trainer.collective_timeout_s={timeout_s}", f"hydra.run.dir={run_dir}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out,
                                stderr=subprocess.STDOUT)
    workers: dict[int, int] = {}
    try:
        workers = _wait("both ranks", lambda: _workers(proc.pid) if len(_workers(proc.pid)) == 2 else None, 40,
                        proc, log)
        metrics = run_dir / "metrics.jsonl"
        _wait("the first metrics record", lambda: metrics.exists() and metrics.read_text().strip(), 40, proc, log)
        os.kill(workers[1], signal.SIGSTOP)
        stopped = time.monotonic()
        # rank 0 fails after the timeout (it may first finish the step it was in) and exits by itself; torchrun
        # would then wait for the stopped rank to honour its SIGTERM: it is killed once rank 0 is gone.
        _wait("rank 0's error", lambda: "MoECollectiveError" in log.read_text(), 4 * timeout_s + 20, proc, log)
        waited = time.monotonic() - stopped
        _wait("rank 0's exit", lambda: not _alive(workers[0]), 30, proc, log)
        _kill(workers[1])
        proc.wait(timeout=60)
    finally:  # nothing left running, whatever failed: the workers (own sessions) first, then torchrun
        for pid in {**workers, **_workers(proc.pid)}.values():
            _kill(pid)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert proc.returncode != 0, text[-3000:]
    assert timeout_s - 1 <= waited, f"failed after {waited:.1f} s, before the {timeout_s} s timeout:\n{text[-4000:]}"
    line = next(x for x in text.splitlines() if "MoECollectiveError: collective failed on rank" in x)
    print(f"after {waited:.1f} s: {line}")
    assert "on rank 0 (world size 2) during the " in line, line
    phase = line.split(" during the ", 1)[1]
    assert phase.startswith(("gradient reduction: DDP's gradient buckets", "gradient reduction: a bucket of",
                             "metrics reduction", "stop agreement")), line
    assert f"({SETTING}, now {timeout_s} s)" in line, line
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "failed" and "during the " + phase.split(":")[0] in run["summary"]["error"], run["summary"]
