"""Router registry: `routing.name` -> router class. Every router returns a RoutingPlan."""
from __future__ import annotations

from torch import nn

from routing.topk import TopKRouter

ROUTERS: dict[str, type[nn.Module]] = {
    "topk": TopKRouter,
}


def build_router(d_model: int, num_experts: int, cfg) -> nn.Module:
    return ROUTERS[cfg.name](d_model, num_experts, cfg)
