"""The full-size layout of weights and optimizer state for engines that keep whole non-expert tensors on every rank
(single, ddp, deepspeed): expert shards gathered to [E, ...] for saving, and split back for loading, so a checkpoint
written at one expert-parallel degree loads at any other (moe.parallel has the weights' half of this)."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from experiments.engines import FullState, ShardedSource
from moe import parallel
from moe.checkpoint import model_state


def autocast(device: torch.device, bf16: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """The forward's precision: bf16 autocast (fp32 master weights) or plain fp32."""
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext


def use_bf16(precision: str, device: torch.device) -> bool:
    """trainer.precision as every engine resolves it: auto is bf16 on CUDA, fp32 elsewhere."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _shard_banks(model: nn.Module) -> dict[int, parallel.Experts]:
    return {id(p): bank for _, bank in parallel.expert_banks(model) if bank.ep_size > 1 for p in bank.parameters()}


def _expert_rows(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict, change) -> dict:
    """state (an optimizer state_dict's "state") with change(tensor, bank, name) applied to each per-expert tensor
    of an expert-sharded parameter: one whose first dimension is its bank's experts (moments, not `step`)."""
    banks = _shard_banks(model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = dict(state)
    for i, p in enumerate(params):
        bank = banks.get(id(p))
        if bank is not None and i in out:
            out[i] = {k: change(v, bank, f"optimizer state {k!r} of parameter {i}")
                      if torch.is_tensor(v) and v.dim() and v.shape[1:] == p.shape[1:] else v
                      for k, v in out[i].items()}
    return out


def full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """optimizer.state_dict() with per-expert state tensors gathered like the weights (a collective under expert
    parallelism: every rank calls it)."""
    sd = optimizer.state_dict()
    gather = lambda v, bank, what: parallel.gather_shards(v, bank, what=what)  # noqa: E731
    return {**sd, "state": _expert_rows(optimizer, model, sd["state"], gather)}


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict) -> None:
    """The inverse of full_optimizer_state: each rank keeps its experts' rows of the full-size moments."""
    split = lambda v, bank, what: parallel.split_shard(v, bank)  # noqa: E731
    optimizer.load_state_dict({**state, "state": _expert_rows(optimizer, model, state["state"], split)})


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> FullState:
    return FullState(model_state(model), full_optimizer_state(optimizer, model))


def as_full(state, model: nn.Module) -> FullState:
    """A FullState, reading a sharded checkpoint whole on this rank when given one (moe.sharded_checkpoint)."""
    if isinstance(state, ShardedSource):
        from moe.sharded_checkpoint import read_full

        weights, moments = read_full(state.folder, parallel.full_shapes(model))
        return FullState(weights, {"state": moments, "param_groups": state.param_groups})
    return state


def load_full(model: nn.Module, optimizer: torch.optim.Optimizer, state: FullState) -> None:
    """Full-size weights and optimizer state into a (possibly expert-sharded) model and its optimizer."""
    with torch.no_grad():
        parallel.load_full_state_dict(model, state.weights, strict=False)  # a tied lm_head is embed.weight
    load_full_optimizer_state(optimizer, model, state.optimizer)
