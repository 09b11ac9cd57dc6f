"""Router registry: `model.moe.router.name` -> router class. Every router returns a RoutingPlan (routing.plan).

Entries are import paths, resolved on first use, so the registry can name every family without importing
them all (and without an import cycle with routing.config, which checks names against it).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Optional

from routing.config import RouterConfig

if TYPE_CHECKING:  # the routers (and torch) load only when one is built: composing a config needs just the names
    from routing.router import Router

ROUTERS: dict[str, str] = {
    "topk": "routing.topk:TopKRouter",  # token choice: Switch (k=1), GShard/GLaM/Mixtral (k=2), DeepSeek
    "expert_choice": "routing.expert_choice:ExpertChoiceRouter",  # Zhou et al. 2022
    "hash": "routing.hash:HashRouter",  # Roller et al. 2021
    "base": "routing.base_layers:BaseRouter",  # BASE layers, Lewis et al. 2021
    "balanced_topk": "routing.balanced_router:BalancedTopKRouter",  # BASE top-k, evaluated with its learnt prices
    "sinkhorn": "routing.sinkhorn:SinkhornRouter",  # Megatron-LM's Sinkhorn top-k
    "bias_balanced": "routing.bias_balanced:BiasBalancedRouter",  # DeepSeek-V3 aux-loss-free balancing
}


def router_class(name: str) -> type[Router]:
    if name not in ROUTERS:
        raise ValueError(f"model.moe.router.name={name!r} is not a known router; choose one of {sorted(ROUTERS)}")
    module, cls = ROUTERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_router(d_model: int, num_experts: int, cfg: RouterConfig, vocab_size: Optional[int] = None,
                 layer: int = 0) -> Router:
    """layer: the model block the router serves; passed only to routers whose state depends on it (Router.per_layer)."""
    cls = router_class(cfg.name)
    extra = {"layer": layer} if cls.per_layer else {}
    return cls(d_model, num_experts, cfg, vocab_size=vocab_size, **extra)
