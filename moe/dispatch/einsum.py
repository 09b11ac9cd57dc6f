"""GShard-style dispatch: one-hot dispatch and combine tensors [T, E, C], the readable reference.

Shape legend: T tokens, d model width, E experts, C capacity (slots per expert), N plan rows.
Memory O(T*E*C): this is the baseline that DeepSpeed and fairseq use, and the oracle the others must match.
"""
from __future__ import annotations

import torch
from torch import Tensor

from routing.plan import RoutingPlan


def einsum_dispatch(x: Tensor, plan: RoutingPlan, experts) -> Tensor:
    """x [T, d] -> y [T, d] with y[t] = sum over rows r of token t: weight[r] * expert_{e_r}(x[t])."""
    T, E = x.shape[0], plan.num_experts
    # A fixed capacity gives fixed shapes; dropless sizes C by the busiest expert (a host sync).
    C = plan.capacity if plan.capacity is not None else int(plan.counts.max().item()) if plan.counts.numel() else 0
    C = max(C, 1)
    t, e, c = plan.token_index, plan.expert_index, plan.position
    dispatch = x.new_zeros(T, E, C).index_put((t, e, c), x.new_ones(t.shape))  # [T, E, C] one-hot
    combine = torch.zeros(T, E, C, dtype=plan.weight.dtype, device=x.device).index_put((t, e, c), plan.weight)
    x_e = torch.einsum("tec,td->ecd", dispatch, x)  # [E, C, d]
    y_e = experts.forward_padded(x_e)  # [E, C, d]
    return torch.einsum("tec,ecd->td", combine.to(y_e.dtype), y_e)
