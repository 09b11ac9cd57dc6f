"""Engines: how the model is spread over the ranks and how one optimizer step runs there. One narrow protocol,
one sibling class per trainer:

    trainer=single     engines.single.SingleEngine        one process
    trainer=ddp        engines.ddp.DDPEngine              torch DistributedDataParallel x expert parallelism
    trainer=fsdp       engines.fsdp.FSDPEngine            FSDP2 (fully_shard) on a DeviceMesh x expert parallelism
    trainer=deepspeed  engines.deepspeed.DeepSpeedEngine  DeepSpeed ZeRO 0-2 x expert parallelism

The Trainer (experiments.trainer) only steps, evaluates and logs; the checkpoint manager (experiments.checkpoints)
decides when and what to save and how to resume; an engine does what differs between trainers:

    wrap(model, optim)                  spread the full-size model over the ranks, build the optimizer -> optimizer
    forward(x, y)                       the forward pass under the engine's precision -> ModelOutput
    train_micro(x, y, scale, last)      forward + backward of scale * total loss (last: the step's last micro-batch,
                                        where gradient communication happens) -> ModelOutput
    step(optimizer, max_norm)           reduce, clip to the global norm, update, clear -> the norm before clipping
    state_to_save(optimizer, sharded, step)  weights and optimizer state of step N as they are written
    load_state(optimizer, state)        the inverse, from any layout (any world size or expert-parallel degree)
    close()                             leave the process group

plus `ranks` (experiments.engines.ranks: the loop's own collectives), `device` and `skips_non_finite` (whether step
leaves weights and moments alone when the norm is not finite). Every engine is built by `build_engine` after every
check of its settings has passed and before the model exists; none imports the Trainer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Union

import torch
from torch import Tensor, nn

from experiments.engines.ranks import OneProcess, Torchrun
from moe.config import ModelConfig

KINDS = ("single", "ddp", "fsdp", "deepspeed")


@dataclass
class FullState:
    """The plain layout (moe.checkpoint): full-size tensors, the same at any world size; rank 0 writes them."""
    weights: dict[str, Tensor]  # the model's state dict, experts at full size, a tied lm_head left out
    optimizer: dict[str, Any]  # torch's optimizer state_dict layout (state by parameter index), full-size moments


@dataclass
class ShardedState:
    """The sharded layout (moe.sharded_checkpoint): each rank's pieces of the global tensors; every rank writes."""
    tensors: dict[str, Tensor]  # "model/<name>" and "optimizer/<index>/<key>": DTensors of the full-size shapes
    param_groups: list[dict]  # the optimizer's hyper-parameters, written as JSON (trainer_state.json)


@dataclass
class ShardedSource:
    """A sharded checkpoint to load: the folder of its tensors and the optimizer's param groups."""
    folder: Path  # step_N/sharded (torch.distributed.checkpoint's files)
    param_groups: list[dict]


SavedState = Union[FullState, ShardedState]


class Engine(Protocol):
    ranks: Union[OneProcess, Torchrun]
    device: torch.device
    skips_non_finite: bool

    def wrap(self, model: nn.Module, optim) -> torch.optim.Optimizer: ...

    def forward(self, x: Tensor, y: Tensor): ...

    def train_micro(self, x: Tensor, y: Tensor, scale: float, last: bool): ...

    def step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> float: ...

    def state_to_save(self, optimizer: torch.optim.Optimizer, sharded: bool, step: int) -> SavedState: ...

    def load_state(self, optimizer: torch.optim.Optimizer, state: Union[FullState, ShardedSource]) -> None: ...

    def close(self) -> None: ...


def checked_model_config(cfg) -> ModelConfig:
    """The model the engine will spread, for its checks: init_from's config when set, with this run's
    expert-parallel degree (a runtime choice)."""
    if cfg.init_from:
        from moe.checkpoint import load_config

        return load_config(cfg.init_from)
    return cfg.model


def build_engine(cfg) -> Engine:
    """The engine of cfg.trainer.kind (a RunConfig), after all its checks; joins the process group last."""
    kind = cfg.trainer.kind
    if kind == "single":
        from experiments.engines.single import SingleEngine

        return SingleEngine(cfg)
    if kind == "ddp":
        from experiments.engines.ddp import DDPEngine

        return DDPEngine.launch(cfg)
    if kind == "fsdp":
        from experiments.engines.fsdp import FSDPEngine

        return FSDPEngine.launch(cfg)
    if kind == "deepspeed":
        from experiments.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine.launch(cfg)
    raise ValueError(f"trainer.kind={kind!r} must be one of {', '.join(KINDS)}")


def non_finite(state: SavedState) -> Optional[str]:
    """The first weight or optimizer tensor of this rank's part of `state` holding NaN or inf, else None."""
    if isinstance(state, FullState):
        items = [(f"weight {k}", t) for k, t in state.weights.items()]
        items += [(f"optimizer state {k} of parameter {i}", t)
                  for i, values in state.optimizer["state"].items() for k, t in values.items()]
    else:
        items = list(state.tensors.items())
    for name, t in items:
        if torch.is_tensor(t) and t.is_floating_point():
            local = t.to_local() if hasattr(t, "to_local") else t
            if not bool(torch.isfinite(local).all()):
                return f"{name} is not finite"
    return None
