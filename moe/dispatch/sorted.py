"""Sorted dispatch: gather rows in expert order, one grouped matmul, weighted scatter-add back.

Shape legend: T tokens, d model width, E experts, f expert hidden width, N plan rows (sorted by expert), K the most
rows any one token has. Memory O(N*d) and dropless unless the router enforces a capacity.

Two ways to move the rows, the same function (tests/moe/test_dispatch.py):
- CPU: `index_select` there and `index_add_` back. The combine weight is handed to the experts
  (Experts.forward_sorted's row_scale), which apply it to the hidden rows [N, f] when they are the narrower
  (fine-grained experts: f = 37 against d = 128 at E = 256) instead of to the output rows [N, d]. index_add_ adds a
  token's rows in row order on CPU, and measured 0.55-0.75x the time of the token-major sums below (E = 8..256,
  docs/benchmarks.md "The experts' path on CPU").
- deterministic (the default on CUDA): moe.dispatch.token_rows' gather and combine, which add each token's rows in
  a fixed order in fp32 with no atomic op, forward and backward; on CUDA index_add_ (and index_select's backward)
  accumulate with atomics, so for k >= 3 the last bits of a sum change from run to run. The combine weight is
  applied in the combine, in fp32, as the expert-parallel dispatcher does.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from moe.dispatch.token_rows import TokenSlots, combine_rows, gather_rows, token_slots
from routing.plan import RoutingPlan


def sorted_dispatch(x: Tensor, plan: RoutingPlan, experts, deterministic: Optional[bool] = None) -> Tensor:
    """x [T, d] -> y [T, d]; same contract as einsum_dispatch. deterministic: None picks it on CUDA only."""
    if deterministic is None:
        deterministic = x.is_cuda
    if deterministic:
        return _token_major(x, plan, experts)
    rows = x.index_select(0, plan.token_index)  # [N, d] gathered in expert order (backward: one index_add)
    out = experts.forward_sorted(rows, plan.expert_index, plan.counts, row_scale=plan.weight)  # [N, d], weighted
    return x.new_zeros(x.shape).index_add_(0, plan.token_index, out.to(x.dtype))


def _token_major(x: Tensor, plan: RoutingPlan, experts) -> Tensor:
    """The atomic-free form: rows gathered, and their results summed per token, in the fixed slot order."""
    if plan.kept is not None:  # token choice: a token has at most k rows (kept [T, k]), so K = k needs no host read
        tokens = TokenSlots.build(plan.token_index, x.shape[0]).set_max_rows(plan.kept.shape[1])
    else:  # other routers (expert choice: up to E rows per token): one host read of K
        tokens = token_slots(plan.token_index, x.shape[0])
    rows = gather_rows(x, tokens)  # [N, d]; backward: the per-token sum in slot order
    out = experts.forward_sorted(rows, plan.expert_index, plan.counts)  # [N, d]
    return combine_rows(out.to(x.dtype), plan.weight, tokens)  # [T, d]; weight and k-sum in fp32
