"""Sorted dispatch: gather rows in expert order, one grouped matmul, weighted scatter-add back.

Shape legend: T tokens, d model width, E experts, f expert hidden width, N plan rows (sorted by expert).
Memory O(N*d) and dropless unless the router enforces a capacity.

The combine weight is handed to the experts (Experts.forward_sorted's row_scale), which apply it to the hidden
rows [N, f] when they are the narrower (fine-grained experts: f = 37 against d = 128 at E = 256) instead of to
the output rows [N, d]: one elementwise pass over fewer numbers, forward and backward (docs/benchmarks.md).
"""
from __future__ import annotations

from torch import Tensor

from routing.plan import RoutingPlan


def sorted_dispatch(x: Tensor, plan: RoutingPlan, experts) -> Tensor:
    """x [T, d] -> y [T, d]; same contract as einsum_dispatch."""
    rows = x.index_select(0, plan.token_index)  # [N, d] gathered in expert order (backward: one index_add)
    out = experts.forward_sorted(rows, plan.expert_index, plan.counts, row_scale=plan.weight)  # [N, d], weighted
    return x.new_zeros(x.shape).index_add_(0, plan.token_index, out.to(x.dtype))
