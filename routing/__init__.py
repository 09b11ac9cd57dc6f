"""Routers decide which expert receives which token; they return a RoutingPlan (routing.plan).

The names below load on first use (PEP 562), so that `import routing.config` does not import torch.
"""
import importlib

_WHERE = {"RouterConfig": "routing.config", "RoutingPlan": "routing.plan", "ROUTERS": "routing.registry",
          "build_router": "routing.registry"}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'routing' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
