"""The processes of a run: how many, which one this is, and the few collectives the training loop itself needs
(barriers around rank 0's writes, broadcasting rank 0's choices, agreeing to stop, the logged values of the global
batch). Engines (experiments.engines) own the model's collectives; this file owns the loop's.

    OneProcess  trainer=single: every collective is the identity
    Torchrun    trainer=ddp|fsdp|deepspeed: one process per rank under torchrun (or the deepspeed launcher)

What makes N ranks train exactly like one process on the same global batch (moe.parallel has the arithmetic):
every rank draws the global batch with PreparedData.get_batch and keeps rows rank::N (`local_rows`), so batches do
not depend on the world size; logged losses are averaged over the ranks and routing counts summed
(`reduce_logged`); only rank 0 writes metrics and run.json.

Every collective here runs inside moe.parallel.named_collective: one that fails or outlives
trainer.collective_timeout_s raises MoECollectiveError naming this rank, the world size and the phase.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import warnings
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from moe import parallel
from moe.parallel import ParallelGroups

T = TypeVar("T")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
CHECKPOINT_BARRIER = "checkpoint barrier (rank 0 writes the checkpoint while the others wait)"
Stats = dict[int, dict[str, torch.Tensor]]  # sparse layer index -> routing statistics

TIMEOUT_KEY = "trainer.collective_timeout_s"  # the setting a timed-out collective's error tells the user to raise


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    """A device setting (`key`, named in the error): auto is cuda when available, else cpu; cuda without CUDA is
    refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}={name!r} but CUDA is not available; use {key}=cpu (or auto)")
    return device


class OneProcess:
    """trainer=single: one process, so every collective is the identity."""

    world_size, rank, is_main, groups = 1, 0, True, None

    def __init__(self, device: torch.device):
        self.device = device

    def main_first(self, fn: Callable[[], T]) -> T:
        return fn()

    def local_rows(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def barrier(self, phase: str = CHECKPOINT_BARRIER) -> None:
        pass

    def broadcast(self, obj: Any, phase: str = "broadcast from rank 0") -> Any:
        return obj

    def agree(self, flag: bool) -> bool:
        return flag

    def mean(self, value: float) -> float:
        return value

    def reduce_logged(self, lm_loss: float, aux: dict[str, float], stats: Stats) -> tuple[float, dict, Stats]:
        return lm_loss, aux, stats

    def close(self) -> None:
        pass


class Torchrun:
    """One rank of a torchrun launch: data parallel x expert parallel over `groups` (moe.parallel)."""

    def __init__(self, groups: ParallelGroups, device: torch.device):
        self.groups, self.world_size, self.rank = groups, groups.world_size, groups.rank
        self.is_main = self.rank == 0
        self.device = device

    def _named(self, phase: str, detail: parallel.Detail = None):
        """The context of one collective: its failure names this rank, the world size and the phase."""
        return parallel.named_collective(phase, self.groups, detail)

    def main_first(self, fn: Callable[[], T]) -> T:
        """Rank 0 runs fn first (e.g. tokenizing the corpus into the shared cache), then the others."""
        detail = "rank 0 runs it first (e.g. preparing the data into the shared cache) while the others wait"
        if self.is_main:
            out = fn()
            with self._named("barrier after rank 0's turn of main_first", detail):
                dist.barrier()
            return out
        with self._named("barrier before this rank's turn of main_first", detail):
            dist.barrier()
        return fn()

    def local_rows(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[self.rank::self.world_size], y[self.rank::self.world_size]

    def barrier(self, phase: str = CHECKPOINT_BARRIER) -> None:
        """phase: what the ranks wait for, named if the barrier fails (the Trainer's: rank 0 writing a checkpoint)."""
        with self._named(phase):
            dist.barrier()

    def broadcast(self, obj: Any, phase: str = "broadcast from rank 0") -> Any:
        box = [obj]
        with self._named(phase, f"a {type(obj).__name__}"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, flag: bool) -> bool:
        """True on every rank if any rank passed True: one all-reduce (MAX) of a scalar, every rank every call."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        with self._named("stop agreement", "whether any rank was asked to stop (e.g. preempted)"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _sum(self, t: torch.Tensor, detail: parallel.Detail = None) -> torch.Tensor:
        t = t.to(self.device, torch.float64)
        with self._named("metrics reduction", detail):
            dist.all_reduce(t)
        return t.cpu()

    def mean(self, value: float) -> float:
        total = self._sum(torch.tensor([value]), detail="a mean over the ranks (the validation loss)")
        return float(total[0]) / self.world_size

    def reduce_logged(self, lm_loss: float, aux: dict[str, float], stats: Stats) -> tuple[float, dict, Stats]:
        """Losses averaged over ranks (equal shards: the global batch's); routing counts summed, the other
        statistics averaged, and max_load / dead_experts recomputed from the summed counts."""
        names = sorted(aux)
        values = self._sum(torch.tensor([lm_loss] + [aux[n] for n in names]),
                           detail=lambda: f"the training loss and the aux losses {names}") / self.world_size
        out_stats = {}
        for layer in sorted(stats):
            s = stats[layer]
            keys = sorted(s)
            flat = torch.cat([s[k].detach().reshape(-1).double().cpu() for k in keys])
            flat = self._sum(flat, detail=lambda: f"the routing statistics {keys} of layer {layer}")
            reduced, i = {}, 0
            for k in keys:
                n = s[k].numel()
                v = flat[i:i + n].reshape(s[k].shape).to(s[k].dtype)
                reduced[k] = v if k == "tokens_per_expert" else v / self.world_size
                i += n
            counts = reduced.get("tokens_per_expert")
            if counts is not None:
                total = counts.sum().clamp(min=1.0)
                if "max_load" in reduced:
                    reduced["max_load"] = counts.max() * counts.numel() / total
                if "dead_experts" in reduced:
                    reduced["dead_experts"] = (counts == 0).sum().to(reduced["dead_experts"].dtype)
            out_stats[layer] = reduced
        return float(values[0]), dict(zip(names, values[1:].tolist())), out_stats

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class _AtLeast(logging.Filter):
    """Passes records at `level` or above: a logger's own filter, which survives the library resetting the logger's
    level when it is imported (DeepSpeed's logger factory does)."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


# The loggers of dependencies that speak on every rank, and the lowest level each keeps on rank 0; other ranks keep
# errors only. DeepSpeed logs its configuration at INFO, and its op builders' compatibility probes log each gcc call
# through distutils' compiler classes (logger "compilers.C.base" or "distutils") at INFO, which Hydra's root
# handlers would print on every rank: WARNING keeps the real warnings.
DEPENDENCY_LOGGERS = {"DeepSpeed": logging.WARNING, "torch.distributed": logging.WARNING,
                      "torch.nn.parallel": logging.WARNING, "compilers": logging.WARNING, "distutils": logging.WARNING}


def quiet_dependencies(rank: Optional[int] = None) -> None:
    """Quiets the dependencies' chatter of a rank: on rank 0 their loggers keep WARNING and above (real
    warnings stay); on every other rank Python warnings are ignored and the loggers keep errors only, so one
    message is printed once, not once per rank. rank: None reads the launcher's RANK (0 when there is none), so
    this can run before the process group exists and before DeepSpeed is imported. Idempotent."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0") or 0)
    if rank != 0:
        warnings.simplefilter("ignore")  # this process's filters: rank 0 shows the same warnings once
    for name, level in DEPENDENCY_LOGGERS.items():
        keep = level if rank == 0 else logging.ERROR
        logger = logging.getLogger(name)
        logger.setLevel(keep)  # their children (torch.distributed.*, compilers.C.base) inherit the level
        for old in [f for f in logger.filters if isinstance(f, _AtLeast)]:
            logger.removeFilter(old)
        logger.addFilter(_AtLeast(keep))  # stays when the library resets the level (DeepSpeed's own logger)


@contextlib.contextmanager
def rank_0_prints(rank: Optional[int] = None):
    """Inside the block, Python-level prints of ranks other than 0 go nowhere: DeepSpeed prints "... op built
    successfully" on every rank while the engine joins its group (a print, which no logging filter reaches).
    Errors still raise and stderr is untouched. rank: None reads the launcher's RANK."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0") or 0)
    if rank == 0:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def launch_env(kind: str, how: str, launchers: str = "torchrun") -> tuple[int, int, int]:
    """(world, rank, local_rank) from the launcher's environment, or a ValueError saying how to launch
    trainer=kind. how: the launch command(s) to show; launchers: the launchers that set the environment."""
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise ValueError(f"trainer={kind} runs one process per rank under {launchers} (missing {missing} in the "
                         f"environment): {how}")
    world, rank, local_rank = (int(os.environ[k]) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    return world, rank, local_rank


def check_batch(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise ValueError(f"trainer.batch_size={batch_size} is the global batch and must be divisible by the world "
                         f"size {world}: every rank takes batch_size / world of its rows")


def init_process_group(device_name: str, local_rank: int, world: int, rank: int,
                       timeout_s: float) -> tuple[torch.device, datetime.timedelta]:
    """Joins the world's process group (NCCL on CUDA, gloo on CPU); returns this rank's device and the timeout
    to give the groups made after it (new groups do not inherit it)."""
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world, timeout=timeout)
    return device, timeout
