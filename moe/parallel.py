"""Data and expert parallelism: process groups, expert shards, gradient reduction, the global gradient norm, and
the full-size layout of checkpoints.

World = data-parallel x expert-parallel: W ranks, ep ranks per expert-parallel group, D = W / ep replicas of each
expert shard. Expert-parallel groups are blocks of consecutive ranks [k * ep, (k + 1) * ep), k = 0..D-1 (on GPUs
an all-to-all then stays inside a node when ep <= GPUs per node); rank g holds shard g % ep, experts
[(g % ep) * E / ep, (g % ep + 1) * E / ep) of every sparse layer; the replicas of shard s (its expert-data-parallel
group) are ranks {s, s + ep, s + 2 ep, ...}. Every rank holds every non-expert parameter.

Training with the global batch spread over the W ranks in equal shards, each rank minimising its shard's mean loss:
- a non-expert gradient is summed over the world and divided by W: the mean of the ranks' gradients, which is
  the gradient of the global batch's mean loss;
- an expert shard's gradient on a rank already sums the contributions of every rank of its expert-parallel group
  (the backward of the all-to-all brings them home); summed over the D replicas and divided by W it is the same
  global-batch gradient;
- the global gradient norm counts each gradient once: sqrt(sum of squares of the non-expert gradients + the sum
  over the expert-parallel group of the squares of its expert shards), and clipping scales every gradient by the
  coefficient torch.nn.utils.clip_grad_norm_ would compute in one process.
The Switch load-balancing loss is made global too (routing.Router.batch_group, set by `distribute`), so loss,
gradients and norm equal those of the single-process run on the global batch (dropless token choice; a capacity
or expert choice's competition is per rank's tokens, as in every expert-parallel system).

Parameters carry the tags DeepSpeed reads: experts `allreduce = False`, `group_name = f"ep_size_{ep}"`.
Checkpoints use the full-size layout (`full_state_dict`, `load_full_state_dict`), so they do not depend on ep.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, replace
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moe.experts import Experts
from routing.router import Router


def check_parallel(num_experts: int, expert_parallel: int, world_size: int) -> None:
    """The settings must fit before any process group is made: ep divides E and the world size."""
    if expert_parallel < 1:
        raise ValueError(f"model.moe.expert_parallel={expert_parallel} must be at least 1")
    if num_experts % expert_parallel:
        raise ValueError(
            f"model.moe.expert_parallel={expert_parallel} does not divide model.moe.num_experts={num_experts}: "
            f"every rank of an expert-parallel group holds the same number of experts"
        )
    if world_size % expert_parallel:
        raise ValueError(
            f"model.moe.expert_parallel={expert_parallel} does not divide the world size {world_size} "
            f"(torchrun --nproc_per_node x nodes): the world is data-parallel x expert-parallel"
        )


@dataclass
class ParallelGroups:
    world_size: int  # W
    rank: int  # this process in the world
    ep_size: int  # ranks per expert-parallel group
    ep_rank: int  # this rank's place in its expert-parallel group = the expert shard it holds
    ep_group: Any  # its expert-parallel group (all-to-all, norm of expert shards); None when ep_size == 1
    expert_dp_group: Any  # the replicas of its expert shard (expert gradients are summed over it)
    world_group: Any  # every rank (non-expert gradients, the load-balancing fractions)

    @property
    def dp_size(self) -> int:
        """D: replicas of each expert shard."""
        return self.world_size // self.ep_size


def make_groups(expert_parallel: int, num_experts: int, timeout: Optional[datetime.timedelta] = None) -> ParallelGroups:
    """Builds the expert-parallel and expert-data-parallel groups; every rank must call it, in the same order.

    timeout: of the new groups' collectives; give the one of init_process_group (new groups do not inherit it,
    they default to torch's 30 minutes)."""
    if not dist.is_initialized():
        raise RuntimeError("moe.parallel.make_groups needs torch.distributed.init_process_group first")
    W, rank, ep = dist.get_world_size(), dist.get_rank(), expert_parallel
    check_parallel(num_experts, ep, W)
    world = dist.group.WORLD
    ep_group, expert_dp = None, world
    if ep > 1:
        for k in range(W // ep):  # new_group is collective: every rank creates every group
            g = dist.new_group(list(range(k * ep, (k + 1) * ep)), timeout=timeout)
            if rank // ep == k:
                ep_group = g
        if ep == W:
            expert_dp = None  # one replica: nothing to sum
        else:
            for s in range(ep):
                g = dist.new_group(list(range(s, W, ep)), timeout=timeout)
                if rank % ep == s:
                    expert_dp = g
    return ParallelGroups(W, rank, ep, rank % ep, ep_group, expert_dp, world)


def same_model(a, b) -> bool:
    """Whether two ModelConfigs describe the same weights: expert_parallel is how a run spreads them, not what
    they are (checkpoints are full-size), so it is left out."""
    return a.replace(moe=replace(a.moe, expert_parallel=1)) == b.replace(moe=replace(b.moe, expert_parallel=1))


def expert_banks(model: nn.Module) -> list[tuple[str, Experts]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Experts)]


@torch.no_grad()
def shard_experts(model: nn.Module, groups: ParallelGroups) -> None:
    """Keeps only this rank's experts of every sparse layer (in place); their MoELayers switch to alltoall.

    The model is built and initialised at full size first (the same initialisation as one process under the same
    seed), then sliced: a model too large for one process would need a sharded initialisation instead."""
    ep = groups.ep_size
    for name, bank in expert_banks(model):
        if bank.ep_size != 1:
            raise ValueError(f"{name} is already sharded (expert_parallel={bank.ep_size})")
        E = bank.num_experts
        if E % ep:
            raise ValueError(f"model.moe.expert_parallel={ep} does not divide model.moe.num_experts={E}")
        n = E // ep
        lo = groups.ep_rank * n
        for pname, p in list(bank.named_parameters(recurse=False)):
            shard = nn.Parameter(p.detach()[lo:lo + n].clone(), requires_grad=p.requires_grad)
            setattr(bank, pname, shard)
        bank.num_experts, bank.num_global_experts, bank.first_expert = n, E, lo
        bank.ep_size, bank.ep_rank, bank.ep_group = ep, groups.ep_rank, groups.ep_group
        bank.layer_name = name.removesuffix(".experts")
        tag_experts(bank)


def tag_experts(bank: Experts) -> None:
    for p in bank.parameters():
        p.allreduce = False
        p.group_name = f"ep_size_{bank.ep_size}"


def distribute(model: nn.Module, groups: ParallelGroups) -> nn.Module:
    """Prepares a full-size model for data x expert parallelism: shards its experts (ep > 1) and makes every
    router's load-balancing loss global (W > 1). Call it before building the optimizer."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and cfg.moe.expert_parallel != groups.ep_size:
        raise ValueError(f"the model was configured with model.moe.expert_parallel={cfg.moe.expert_parallel} "
                         f"but the process groups have expert-parallel size {groups.ep_size}")
    for name, bank in expert_banks(model):
        bank.layer_name = name.removesuffix(".experts")  # named in collective errors
    if groups.ep_size > 1:
        shard_experts(model, groups)
    if groups.world_size > 1:
        for m in model.modules():
            if isinstance(m, Router):
                m.batch_group = groups.world_group
    return model


def is_expert(p: Tensor) -> bool:
    return getattr(p, "allreduce", True) is False


def _unique(params: Iterable[Tensor]) -> list[Tensor]:
    out, seen = [], set()
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _all_reduce_flat(grads: list[Tensor], group, scale: float) -> None:
    """Sums each same-dtype bucket of grads over group in one collective (none when group is None), then scales."""
    buckets: dict[tuple, list[Tensor]] = {}
    for g in grads:
        buckets.setdefault((g.dtype, g.device), []).append(g)
    for bucket in buckets.values():
        flat = _flatten_dense_tensors(bucket)
        if group is not None:
            dist.all_reduce(flat, group=group)
        flat.mul_(scale)
        for g, v in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(v)


@torch.no_grad()
def reduce_gradients(params: Iterable[Tensor], groups: ParallelGroups) -> None:
    """Turns every rank's gradients of its own batch shard into the global batch's gradients (module doc).

    Missing gradients (an expert that got no tokens anywhere) become zeros, so every rank reduces the same
    tensors in the same order."""
    params = _unique(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    W = groups.world_size
    _all_reduce_flat([p.grad for p in params if not is_expert(p)], groups.world_group if W > 1 else None, 1.0 / W)
    _all_reduce_flat([p.grad for p in params if is_expert(p)], groups.expert_dp_group if W > 1 else None, 1.0 / W)


@torch.no_grad()
def global_grad_norm(params: Iterable[Tensor], groups: Optional[ParallelGroups]) -> Tensor:
    """The 2-norm of all gradients of the (unsharded) model, from reduced gradients; a collective when ep > 1."""
    params = [p for p in _unique(params) if p.grad is not None]
    dev = params[0].grad.device if params else torch.device("cpu")
    dense = torch.zeros((), dtype=torch.float32, device=dev)
    expert = torch.zeros((), dtype=torch.float32, device=dev)
    for p in params:
        sq = p.grad.detach().float().square().sum()
        if is_expert(p):
            expert += sq
        else:
            dense += sq
    if groups is not None and groups.ep_size > 1:
        dist.all_reduce(expert, group=groups.ep_group)  # disjoint shards: each expert counted once
    return (dense + expert).sqrt()


@torch.no_grad()
def clip_grad_norm(params: Iterable[Tensor], max_norm: float, groups: Optional[ParallelGroups]) -> Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole distributed model: returns the global norm before clipping."""
    params = _unique(params)
    total = global_grad_norm(params, groups)
    if max_norm > 0 and max_norm != float("inf"):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # the same formula as torch's
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
    return total


# ---------------------------------------------------------------- the full-size layout (checkpoints)

def _shard_names(model: nn.Module) -> dict[str, Experts]:
    """state-dict key -> its bank, for the expert parameters of sharded banks."""
    out = {}
    for name, bank in expert_banks(model):
        if bank.ep_size > 1:
            for pname, _ in bank.named_parameters(recurse=False):
                out[f"{name}.{pname}" if name else pname] = bank
    return out


def gather_shards(t: Tensor, bank: Experts) -> Tensor:
    """An expert shard [E_l, ...] -> the full tensor [E, ...] on every rank of the expert-parallel group."""
    parts = [torch.empty_like(t) for _ in range(bank.ep_size)]
    dist.all_gather(parts, t.contiguous(), group=bank.ep_group)
    return torch.cat(parts)


def split_shard(full: Tensor, bank: Experts) -> Tensor:
    """The full tensor [E, ...] -> this rank's shard [E_l, ...]."""
    if full.shape[0] != bank.num_global_experts:
        raise ValueError(f"{bank.layer_name}: a full-size expert tensor has {bank.num_global_experts} experts, "
                         f"got shape {tuple(full.shape)}")
    return full[bank.first_expert:bank.first_expert + bank.num_experts].clone()


def full_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """The shape of every tensor model_state would save, without gathering (tied lm_head left out as there)."""
    shards = _shard_names(model)
    shapes = {}
    for k, v in model.state_dict().items():
        shapes[k] = torch.Size((shards[k].num_global_experts, *v.shape[1:])) if k in shards else v.shape
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """model.state_dict() with every expert shard gathered to its full size (a collective over each ep group:
    every rank calls it). Equals the state dict of the same model unsharded."""
    shards = _shard_names(model)
    state = {}
    for k, v in model.state_dict().items():
        state[k] = gather_shards(v.detach(), shards[k]) if k in shards else v
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, Tensor], strict: bool = True):
    """Loads a full-size state dict (a checkpoint written at any ep) into a possibly sharded model."""
    shards = _shard_names(model)
    local = {k: split_shard(v, shards[k]) if k in shards else v for k, v in state.items()}
    return model.load_state_dict(local, strict=strict)
