"""Dispatchers move tokens to experts and back according to a RoutingPlan; all compute the same function."""
from moe.dispatch.alltoall import alltoall_dispatch
from moe.dispatch.einsum import einsum_dispatch
from moe.dispatch.sorted import sorted_dispatch

DISPATCHERS = {
    "einsum": einsum_dispatch,
    "sorted": sorted_dispatch,
}
# Not in DISPATCHERS (the choices of model.moe.dispatcher): MoELayer switches to alltoall_dispatch by itself when
# its experts are an expert-parallel shard (moe.parallel.shard_experts); it runs `sorted` on the local experts.

__all__ = ["DISPATCHERS", "alltoall_dispatch", "einsum_dispatch", "sorted_dispatch"]
