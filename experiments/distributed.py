"""Launch glue for multi-process training (trainer=ddp): torchrun's environment, the process groups, and what a
rank does differently from the single process. The Trainer calls the same hooks whatever the engine; `Single`
makes each of them what one process does (trainer=deepspeed's are in experiments.deepspeed_engine).

    torchrun --nproc_per_node=N -m experiments.train trainer=ddp model.moe.expert_parallel=N [hydra.run.dir=DIR]

What makes N ranks train exactly like one process on the same global batch (moe.parallel has the arithmetic):
- every rank draws the global batch with PreparedData.get_batch and keeps rows rank::N, so batches do not depend
  on the world size (trainer.batch_size is the global batch and must be divisible by N);
- the model is built and initialised at full size under the run's seed on every rank, then its experts are
  sharded (moe.parallel.distribute): the same initialisation as one process;
- after the step's backward passes, gradients are reduced once (no overlap with the backward: simple and exact;
  accumulation needs no no_sync), the global norm is computed over the shards and clipping applied;
- logged losses and routing statistics are reduced over the ranks; only rank 0 writes metrics, run.json and
  checkpoints; checkpoints (weights and optimizer state) are in the full-size layout, so a run saved at one ep
  resumes or loads at any other.
Pass hydra.run.dir under torchrun: each rank composes its own config, and ranks started in different seconds
would otherwise each create a timestamped directory (rank 0's is used; the others stay empty).

Every collective of DataParallel runs inside moe.parallel.named_collective: one that fails or outlives
trainer.collective_timeout_s (a rank stopped, killed or out of step) raises MoECollectiveError naming this rank, the
world size, the phase (gradient reduction with its bucket's first and last parameters, gradient norm, metrics
reduction, checkpoint gather or barrier, stop agreement, ...) and the setting to raise.
"""
from __future__ import annotations

import datetime
import math
import os
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from moe import parallel
from moe.parallel import ParallelGroups

T = TypeVar("T")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
CHECKPOINT_BARRIER = "checkpoint barrier (rank 0 writes the checkpoint while the others wait)"


class Single:
    """One process: every hook is what the single-process trainer does."""

    world_size, rank, is_main, groups = 1, 0, True, None
    skips_non_finite = True  # step() leaves the weights alone when the gradient norm is not finite

    def local_device(self, device: torch.device) -> torch.device:
        return device

    def main_first(self, fn: Callable[[], T]) -> T:
        return fn()

    def distribute(self, model: nn.Module) -> nn.Module:
        return model

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Called once the weights and optimizer state are loaded; returns the optimizer whose param groups take the
        learning rate (trainer=deepspeed builds its engine here and returns its client optimizer)."""
        return optimizer

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        return model(x, y)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
        """After the step's backward passes: reduce and clip the gradients, update, clear; returns the global gradient
        norm before clipping. A non-finite norm (the same on every rank: it is the global one) skips the update, so
        NaN gradients never reach the weights or the optimizer's moments."""
        norm = self.clip_gradients(model, max_norm)
        if math.isfinite(norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def save_engine(self, run_dir, step: int) -> None:
        """Writes an engine's own checkpoint beside ours (trainer=deepspeed with deepspeed.engine_checkpoint)."""

    def local_rows(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def clip_gradients(self, model: nn.Module, max_norm: float) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))

    def mean(self, value: float) -> float:
        return value

    def reduce_step(self, lm_loss: float, aux: dict[str, float], stats: dict) -> tuple[float, dict, dict]:
        return lm_loss, aux, stats

    def model_state(self, model: nn.Module) -> Optional[dict[str, torch.Tensor]]:
        return None  # save_checkpoint takes the model's own state

    def optimizer_state(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, model: nn.Module, state: dict) -> None:
        optimizer.load_state_dict(state)

    def barrier(self, phase: str = CHECKPOINT_BARRIER) -> None:
        pass

    def broadcast(self, obj: Any, phase: str = "broadcast from rank 0") -> Any:
        return obj

    def agree(self, flag: bool) -> bool:
        """Whether any rank passed True (e.g. a preemption signal seen by one rank stops them all at the same step)."""
        return flag

    def close(self) -> None:
        pass


class DataParallel(Single):
    """torchrun ranks: data parallel x expert parallel over one process group (moe.parallel)."""

    def __init__(self, groups: ParallelGroups, device: torch.device):
        self.groups, self.world_size, self.rank = groups, groups.world_size, groups.rank
        self.is_main = self.rank == 0
        self._device = device

    def local_device(self, device: torch.device) -> torch.device:
        return self._device

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

    def distribute(self, model: nn.Module) -> nn.Module:
        return parallel.distribute(model, self.groups)

    def local_rows(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[self.rank::self.world_size], y[self.rank::self.world_size]

    def clip_gradients(self, model: nn.Module, max_norm: float) -> float:
        params = list(model.parameters())
        parallel.reduce_gradients(params, self.groups, names=model.named_parameters)  # names: read on failure only
        return float(parallel.clip_grad_norm(params, max_norm if max_norm > 0 else float("inf"), self.groups))

    def _sum(self, t: torch.Tensor, phase: str = "metrics reduction", detail: parallel.Detail = None) -> torch.Tensor:
        t = t.to(self._device, torch.float64)
        with self._named(phase, detail):
            dist.all_reduce(t)
        return t.cpu()

    def mean(self, value: float) -> float:
        total = self._sum(torch.tensor([value]), detail="a mean over the ranks (the validation loss)")
        return float(total[0]) / self.world_size

    def agree(self, flag: bool) -> bool:
        """True on every rank if any rank passed True: one all-reduce (MAX) of a scalar, every rank every call."""
        t = torch.tensor([1.0 if flag else 0.0], device=self._device)
        with self._named("stop agreement", "whether any rank was asked to stop (e.g. preempted)"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def reduce_step(self, lm_loss: float, aux: dict[str, float], stats: dict) -> tuple[float, dict, dict]:
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

    def model_state(self, model: nn.Module) -> Optional[dict[str, torch.Tensor]]:
        from moe.checkpoint import model_state

        return model_state(model)  # full-size: gathers the expert shards (every rank calls it)

    def _shard_banks(self, model: nn.Module) -> dict[int, Any]:
        return {id(p): bank for _, bank in parallel.expert_banks(model) if bank.ep_size > 1 for p in bank.parameters()}

    def optimizer_state(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
        """The optimizer state in the full-size layout: per-expert state tensors gathered like the weights."""
        banks = self._shard_banks(model)
        sd = optimizer.state_dict()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        state = dict(sd["state"])
        for i, p in enumerate(params):
            bank = banks.get(id(p))
            if bank is None or i not in state:
                continue
            state[i] = {k: parallel.gather_shards(v, bank, what=f"optimizer state {k!r} of parameter {i}")
                        if torch.is_tensor(v) and v.shape == p.shape else v for k, v in state[i].items()}
        return {**sd, "state": state}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, model: nn.Module, state: dict) -> None:
        banks = self._shard_banks(model)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        local = dict(state["state"])
        for i, p in enumerate(params):
            bank = banks.get(id(p))
            if bank is None or i not in local:
                continue
            local[i] = {k: parallel.split_shard(v, bank) if torch.is_tensor(v) and v.dim() and
                        v.shape[0] == bank.num_global_experts and v.shape[1:] == p.shape[1:] else v
                        for k, v in local[i].items()}
        optimizer.load_state_dict({**state, "state": local})

    def barrier(self, phase: str = CHECKPOINT_BARRIER) -> None:
        """phase: what the ranks wait for, named if the barrier fails (the Trainer's: rank 0 writing a checkpoint)."""
        with self._named(phase):
            dist.barrier()

    def broadcast(self, obj: Any, phase: str = "broadcast from rank 0") -> Any:
        box = [obj]
        with self._named(phase, f"a {type(obj).__name__}"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def setup_parallel(cfg) -> Single:
    """The engine for cfg.trainer.kind (a RunConfig): Single, or DataParallel / DeepSpeedParallel after every check
    has passed."""
    tc = cfg.trainer
    if tc.kind == "single":
        return Single()
    if tc.kind == "deepspeed":
        from experiments.deepspeed_engine import setup_deepspeed

        return setup_deepspeed(cfg)
    if tc.kind != "ddp":
        raise ValueError(f"trainer.kind={tc.kind!r} must be single, ddp or deepspeed")
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise ValueError(
            f"trainer=ddp runs one process per rank under torchrun (missing {missing} in the environment): "
            f"torchrun --nproc_per_node=N -m experiments.train trainer=ddp model.moe.expert_parallel=N ..."
        )
    world, rank, local_rank = (int(os.environ[k]) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    mcfg = cfg.model
    if cfg.init_from:
        from moe.checkpoint import load_config

        mcfg = load_config(cfg.init_from)
    ep = cfg.model.moe.expert_parallel  # the composed setting, also with init_from (a runtime choice)
    if mcfg.is_moe or ep > 1:
        parallel.check_parallel(mcfg.moe.num_experts, ep, world)
    if tc.batch_size % world:
        raise ValueError(f"trainer.batch_size={tc.batch_size} is the global batch and must be divisible by the "
                         f"world size {world}: every rank takes batch_size / world of its rows")
    from experiments.trainer import resolve_device

    device = resolve_device(tc.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=tc.collective_timeout_s)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=timeout)
    groups = parallel.make_groups(ep, mcfg.moe.num_experts, timeout=timeout)
    return DataParallel(groups, device)


class NullLogger:
    """The metrics logger of ranks other than 0: records are written once, by rank 0."""

    def __init__(self, path):
        self.path = path

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass
