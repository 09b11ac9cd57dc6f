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
The Switch load-balancing loss is made global too (routing.Router.set_batch_group, from `distribute`), so loss,
gradients and norm equal those of the single-process run on the global batch (dropless token choice; a capacity
or expert choice's competition is per rank's tokens, as in every expert-parallel system).

Parameters carry the tags DeepSpeed reads: experts `allreduce = False`, `group_name = f"ep_size_{ep}"`.
Checkpoints use the full-size layout (`full_state_dict`, `load_full_state_dict`), so they do not depend on ep.

A collective that fails or times out (gloo, or NCCL with blocking waits) is re-raised as MoECollectiveError by
`named_collective`: this rank, the world size, the phase (gradient reduction, gradient norm, checkpoint gather, and
the training loop's own: experiments.engines.ranks), what it carried (the first and last parameters of a gradient bucket)
and the timeout to raise, instead of a bare "Timed out waiting ...ms for recv operation".
"""
from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moe.dispatch.alltoall import MoECollectiveError
from moe.expert_shard import ExpertShard, check_expert_parallel
from moe.experts import Experts
from moe.layer import MoELayer


def check_parallel(num_experts: int, expert_parallel: int, world_size: int) -> None:
    """The settings must fit before any process group is made: ep divides E and the world size."""
    check_expert_parallel(num_experts, expert_parallel)
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
    timeout_s: Optional[float] = None  # of the groups' collectives, named in errors
    # What the caller calls that timeout, for the errors: the library's own name by default; an application passes
    # the key its users set (the trainer: "trainer.collective_timeout_s").
    timeout_setting: str = "the process groups' timeout"

    @property
    def dp_size(self) -> int:
        """D: replicas of each expert shard."""
        return self.world_size // self.ep_size


def make_groups(expert_parallel: int, num_experts: int, timeout: Optional[datetime.timedelta] = None,
                timeout_setting: str = "the process groups' timeout") -> ParallelGroups:
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
    return ParallelGroups(W, rank, ep, rank % ep, ep_group, expert_dp, world,
                          timeout.total_seconds() if timeout is not None else None, timeout_setting)


# ---------------------------------------------------------------- naming failed collectives

Detail = Union[str, Callable[[], str], None]  # what a collective carried: a callable is called only on failure
Names = Optional[Callable[[], Iterable[tuple[str, Tensor]]]]  # e.g. model.named_parameters, read only on failure


def describe_collective(phase: str, groups: Optional[ParallelGroups] = None, detail: str = "") -> str:
    """The report of a failed collective outside an MoE layer: which rank of how many, which phase, what it held."""
    if groups is not None:
        rank, world, timeout, setting = groups.rank, groups.world_size, groups.timeout_s, groups.timeout_setting
    else:
        init = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if init else (0, 1)
        timeout, setting = None, "init_process_group(timeout=...)"
    setting += f", now {timeout:g} s" if timeout is not None else ""
    return (f"collective failed on rank {rank} (world size {world}) during the {phase}"
            + (f": {detail}" if detail else "")
            + ". A process-group timeout here usually means another rank never reached this collective (it was "
              "stopped, killed or failed, or ran a different number of steps or collectives); see the other ranks' "
              f"errors, or raise the timeout ({setting})")


@contextlib.contextmanager
def named_collective(phase: str, groups: Optional[ParallelGroups] = None, detail: Detail = None) -> Iterator[None]:
    """Wraps one collective: a failure (gloo and NCCL raise timeouts and dead peers as RuntimeError subclasses)
    becomes MoECollectiveError naming this rank, the world size, the phase and `detail` (a callable is called only on
    failure), caused by the original error. One already named (an MoE layer's) passes through unchanged."""
    try:
        yield
    except MoECollectiveError:
        raise
    except RuntimeError as e:
        text = detail() if callable(detail) else (detail or "")
        raise MoECollectiveError(f"{describe_collective(phase, groups, text)}\n"
                                 f"caused by {type(e).__name__}: {e}") from e


def same_model(a, b) -> bool:
    """Whether two ModelConfigs describe the same weights: expert_parallel is how a run spreads them, not what
    they are (checkpoints are full-size), so it is left out."""
    return a.replace(moe=replace(a.moe, expert_parallel=1)) == b.replace(moe=replace(b.moe, expert_parallel=1))


def expert_banks(model: nn.Module) -> list[tuple[str, Experts]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Experts)]


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def expert_shard(layer: MoELayer, groups: ParallelGroups, name: str = "") -> ExpertShard:
    """This rank's shard of `layer`'s experts under `groups` (the divisibility check runs here)."""
    return ExpertShard(layer.experts.num_global_experts, groups.ep_size, groups.ep_rank, groups.ep_group, name)


def shard_experts(model: nn.Module, groups: ParallelGroups) -> None:
    """Keeps only this rank's experts of every sparse layer (each MoELayer gets a new bank of its shard, and then
    runs the all-to-all). The model is built and initialised at full size first (the same initialisation as one
    process under the same seed), then sliced: a model too large for one process would need a sharded
    initialisation instead."""
    for name, layer in moe_layers(model):
        if layer.experts.ep_size != 1:
            raise ValueError(f"{name or 'the MoE layer'} is already sharded (expert_parallel={layer.experts.ep_size})")
        layer.distribute(name, layer.router.batch_group, expert_shard(layer, groups, name))


def distribute(model: nn.Module, groups: ParallelGroups) -> nn.Module:
    """Prepares a full-size model for data x expert parallelism: shards its experts (ep > 1) and makes every
    router's load-balancing loss global (W > 1), through each MoELayer's own `distribute`. Call it before
    building the optimizer."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and cfg.moe.expert_parallel != groups.ep_size:
        raise ValueError(f"the model was configured with model.moe.expert_parallel={cfg.moe.expert_parallel} "
                         f"but the process groups have expert-parallel size {groups.ep_size}")
    batch_group = groups.world_group if groups.world_size > 1 else None
    if groups.ep_size > 1:
        shard_experts(model, groups)
    for name, layer in moe_layers(model):
        layer.distribute(name, batch_group)
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


def _bucket_detail(params: list[Tensor], names: Names, over: str) -> str:
    """What a gradient bucket held, for its error: how many gradients, the first and last parameter names."""
    lookup = {id(p): n for n, p in names()} if names is not None else {}
    first, last = (lookup.get(id(p), f"a parameter of shape {tuple(p.shape)}") for p in (params[0], params[-1]))
    values = sum(p.numel() for p in params)
    g = params[0].grad
    return (f"a bucket of {len(params)} {str(g.dtype).removeprefix('torch.')} gradients on {g.device} ({values:,} "
            f"values) from {first} to {last}, summed over {over}")


def _all_reduce_flat(params: list[Tensor], group, scale: float, groups: Optional[ParallelGroups] = None,
                     names: Names = None, over: str = "") -> None:
    """Sums each same-dtype bucket of the params' grads over group in one collective (none when group is None), then
    scales. A failed collective names the bucket's first and last parameters (`names`: e.g. model.named_parameters,
    called only then)."""
    buckets: dict[tuple, list[Tensor]] = {}
    for p in params:
        buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for members in buckets.values():
        bucket = [p.grad for p in members]
        flat = _flatten_dense_tensors(bucket)
        if group is not None:
            with named_collective("gradient reduction", groups, lambda: _bucket_detail(members, names, over)):
                dist.all_reduce(flat, group=group)
        flat.mul_(scale)
        for g, v in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(v)


@torch.no_grad()
def reduce_gradients(params: Iterable[Tensor], groups: ParallelGroups, names: Names = None) -> None:
    """Turns every rank's gradients of its own batch shard into the global batch's gradients (module doc).

    Missing gradients (an expert that got no tokens anywhere) become zeros, so every rank reduces the same
    tensors in the same order. names (e.g. model.named_parameters): read only when a reduction fails, to name the
    parameters its bucket held."""
    params = _unique(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    W = groups.world_size
    _all_reduce_flat([p for p in params if not is_expert(p)], groups.world_group if W > 1 else None, 1.0 / W,
                     groups, names, f"all {W} ranks")
    reduce_expert_gradients([p for p in params if is_expert(p)], groups, names)


@torch.no_grad()
def reduce_expert_gradients(params: list[Tensor], groups: ParallelGroups, names: Names = None) -> None:
    """The expert half of reduce_gradients (trainer=ddp: DDP reduces the rest during the backward): each expert
    shard's gradient summed over its replicas and divided by the world size. Every gradient must exist."""
    W = groups.world_size
    _all_reduce_flat(params, groups.expert_dp_group if W > 1 else None, 1.0 / W,
                     groups, names, f"the {groups.dp_size} replicas of expert shard {groups.ep_rank} "
                                    "(its expert-data-parallel group)")


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
        with named_collective("gradient norm", groups, f"the sum of squares of the expert shards' gradients over "
                                                       f"the {groups.ep_size} ranks of the expert-parallel group"):
            dist.all_reduce(expert, group=groups.ep_group)  # disjoint shards: each expert counted once
    return (dense + expert).sqrt()


@torch.no_grad()
def clip_grad_norm(params: Iterable[Tensor], max_norm: float, groups: Optional[ParallelGroups]) -> Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole distributed model: returns the global norm before clipping.
    The rescale is one torch._foreach_mul_ over the gradients (torch's own); an optimizer that can take the
    coefficient inside its update (experiments.optim.clipped_update: fused AdamW's grad_scale) needs only
    global_grad_norm and no pass that rewrites every gradient."""
    params = _unique(params)
    total = global_grad_norm(params, groups)
    if max_norm > 0 and max_norm != float("inf"):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # the same formula as torch's
        grads = [p.grad for p in params if p.grad is not None]
        for dtype in {g.dtype for g in grads}:  # a foreach list holds one dtype; the coefficient is cast to it
            torch._foreach_mul_([g for g in grads if g.dtype == dtype], coef.to(dtype))
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


def gather_shards(t: Tensor, bank: Experts, what: str = "", phase: str = "checkpoint gather") -> Tensor:
    """An expert shard [E_l, ...] -> the full tensor [E, ...] on every rank of the expert-parallel group.
    what: the tensor, named in the error of a failed gather (e.g. its state-dict key)."""
    parts = [torch.empty_like(t) for _ in range(bank.ep_size)]
    with named_collective(phase, detail=lambda: f"{what or 'an expert tensor'} of MoE layer {bank.layer_name or '?'}, "
                                                f"expert shard {bank.ep_rank} of {bank.ep_size} gathered over its "
                                                f"expert-parallel group"):
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
        state[k] = gather_shards(v.detach(), shards[k], what=k) if k in shards else v
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, Tensor], strict: bool = True):
    """Loads a full-size state dict (a checkpoint written at any ep) into a possibly sharded model."""
    shards = _shard_names(model)
    local = {k: split_shard(v, shards[k]) if k in shards else v for k, v in state.items()}
    return model.load_state_dict(local, strict=strict)
