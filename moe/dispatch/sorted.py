"""Sorted dispatch: gather rows in expert order, one grouped matmul, weighted scatter-add back.

Shape legend: T tokens, d model width, E experts, N plan rows (sorted by expert).
Memory O(N*d) and dropless unless the router enforces a capacity.
"""
from __future__ import annotations

from torch import Tensor

from routing.plan import RoutingPlan


def sorted_dispatch(x: Tensor, plan: RoutingPlan, experts) -> Tensor:
    """x [T, d] -> y [T, d]; same contract as einsum_dispatch."""
    rows = x.index_select(0, plan.token_index)  # [N, d] gathered in expert order (backward: one index_add)
    out = experts.forward_sorted(rows, plan.expert_index, plan.counts)  # [N, d]
    out = out * plan.weight.to(out.dtype)[:, None]
    return x.new_zeros(x.shape).index_add_(0, plan.token_index, out.to(x.dtype))
