"""trainer=single: one process, the reference every other engine is tested against."""
from __future__ import annotations

import torch
from torch import nn

from experiments.engines import SavedState
from experiments.engines.full_size import as_full, autocast, full_state, load_full, use_bf16
from experiments.engines.ranks import OneProcess, resolve_device
from experiments.optim import build_optimizer, clipped_update
from moe.compile import compile_blocks


class SingleEngine:
    skips_non_finite = True

    def __init__(self, cfg):
        self.device = resolve_device(cfg.trainer.device)
        self.ranks = OneProcess(self.device)
        self.autocast = autocast(self.device, use_bf16(cfg.trainer.precision, self.device))
        self.model: nn.Module = None
        self.compile = cfg.trainer.compile  # torch.compile every block (moe.compile) when wrapping

    def wrap(self, model: nn.Module, optim) -> torch.optim.Optimizer:
        self.model = model.to(self.device)
        if self.compile:
            print(compile_blocks(self.model), flush=True)
        return build_optimizer(self.model, optim)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        with self.autocast():
            return self.model(x.to(self.device), y.to(self.device))

    def train_micro(self, x: torch.Tensor, y: torch.Tensor, scale: float, last: bool):
        out = self.forward(x, y)
        (out.total_loss * scale).backward()
        return out

    def step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
        """Clip, update, clear; a non-finite norm skips the update, so NaN gradients never reach the weights or the
        optimizer's moments."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        # torch.nn.utils.clip_grad_norm_'s norm; its rescale is folded into the update (experiments.optim)
        return clipped_update(optimizer, torch.nn.utils.get_total_norm(grads), max_norm)

    def state_to_save(self, optimizer: torch.optim.Optimizer, sharded: bool, step: int = 0) -> SavedState:
        return full_state(self.model, optimizer)

    def load_state(self, optimizer: torch.optim.Optimizer, state) -> None:
        load_full(self.model, optimizer, as_full(state, self.model))

    def close(self) -> None:
        pass
