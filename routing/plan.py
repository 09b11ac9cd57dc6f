"""The routing plan: the one interface between deciding (routers) and doing (dispatchers).

Shape legend: T tokens, E experts, k choices per token, N surviving (token, expert) assignments, C capacity.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


@dataclass
class RoutingPlan:
    token_index: Tensor  # [N] long, the token each assignment carries
    expert_index: Tensor  # [N] long, the expert that receives it; rows sorted by expert (stable)
    weight: Tensor  # [N] float32, combine weight; differentiable, the router learns through it
    counts: Tensor  # [E] long, assignments per expert after capacity
    num_tokens: int  # T
    # C of a fixed capacity (capacity_factor > 0): padded layouts use exactly C slots per expert. None when
    # dropless or capped (capacity_factor <= 0): padded layouts size their slots by the busiest expert.
    capacity: Optional[int] = None
    kept: Optional[Tensor] = None  # [T, k] bool, token-choice routers: which (token, choice) survived capacity
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # name -> scalar, already scaled by its coefficient
    stats: dict[str, Tensor] = field(default_factory=dict)  # detached routing statistics (routing.stats)

    @property
    def num_experts(self) -> int:
        return self.counts.numel()

    @property
    def offsets(self) -> Tensor:
        """[E+1] long, start of each expert's segment of rows."""
        return torch.cat([self.counts.new_zeros(1), self.counts.cumsum(0)])

    @property
    def position(self) -> Tensor:
        """[N] long, slot of each row within its expert's segment (the c of GShard's [T, E, C] tensors)."""
        rows = torch.arange(self.token_index.numel(), device=self.token_index.device)
        return rows - self.offsets[self.expert_index]
