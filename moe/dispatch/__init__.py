"""Dispatchers move tokens to experts and back according to a RoutingPlan; all compute the same function."""
from moe.dispatch.einsum import einsum_dispatch
from moe.dispatch.sorted import sorted_dispatch

DISPATCHERS = {
    "einsum": einsum_dispatch,
    "sorted": sorted_dispatch,
}

__all__ = ["DISPATCHERS", "einsum_dispatch", "sorted_dispatch"]
