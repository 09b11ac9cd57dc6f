"""Triton dispatch: the `sorted` contract with the gather fused into the first grouped GEMM and the weighted combine
fused into the second.

Shape legend: T tokens, d model width, f expert hidden width, E experts, N plan rows (sorted by expert).

    h [N, f] = act(x[token_index] @ w_gate[e] + b_gate) * (x[token_index] @ w_up[e] + b_up)   (GLU; else act(up))
    y [T, d] = sum over rows r of token t: weight[r] * (h[r] @ w_down[e_r] + b_down[e_r])

`sorted` materialises x[token_index] [N, d], the expert outputs [N, d] and their weighted copy before an
index_add_; here the rows are read straight from x inside the first kernel (moe.kernels.up_projection) and the
second kernel's epilogue scales and reduces them per token, deterministically; both run as one autograd function
(moe.kernels.expert_mlp). The segment offsets (plan.offsets) are a cumsum of plan.counts on the device, so the
dispatch itself never waits on the host, and neither does the token-major order of a dropless plan, derived
without a sort (`token_order`). Triton is imported only when this runs.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from routing.plan import RoutingPlan


def triton_dispatch(x: Tensor, plan: RoutingPlan, experts) -> Tensor:
    """x [T, d] -> y [T, d]; same contract as sorted_dispatch (moe.dispatch.sorted)."""
    from moe.kernels import triton_status

    ok, why = triton_status(x.device)
    if not ok:
        raise ValueError(f"model.moe.dispatcher=triton cannot run here: {why}; set model.moe.dispatcher=auto or sorted")
    from moe.kernels.expert_mlp import grouped_expert_mlp

    # Under autocast the activations arrive in bf16 while the master weights stay fp32 (as Experts.forward_sorted).
    w_up, w_gate, w_down = experts._weights(x.dtype)

    def bias(b: Optional[Tensor]) -> Optional[Tensor]:
        return None if b is None else b.to(x.dtype)  # forward_sorted adds biases in the activations' dtype

    # One autograd function for the layer's experts: the token-major order is built once for the combine and
    # grad x, and the activation backward runs inside the grad-h GEMM (moe.kernels.expert_mlp).
    y = grouped_expert_mlp(x, plan.token_index, plan.offsets, plan.weight.float(), w_up, w_gate, bias(experts.b_up),
                           bias(experts.b_gate), w_down, bias(experts.b_down), experts.activation,
                           token_order=token_order(plan))  # [T, d]
    return y if y.dtype == x.dtype else y.to(x.dtype)


def token_order(plan: RoutingPlan):
    """The plan's token-major order (moe.kernels.combine.TokenOrder): without a sort when the plan is dropless.

    Dropless is read from shapes alone (no host sync): a token-choice router's plan has kept [T, k] and one row per
    kept choice, so N == T*k means every token kept all k choices. Token-choice routers pick k distinct experts
    (top-k, BASE's auction), which is what TokenOrder.from_dropless needs. Anything else (rows dropped by capacity
    or random routing, expert choice's plans without kept) sorts (TokenOrder.build)."""
    from moe.kernels.combine import TokenOrder

    rows, kept = plan.token_index, plan.kept
    if kept is not None and kept.dim() == 2 and rows.numel() == kept.numel():
        return TokenOrder.from_dropless(rows, plan.expert_index, plan.num_tokens, kept.shape[1], plan.num_experts)
    return TokenOrder.build(rows, plan.num_tokens)
