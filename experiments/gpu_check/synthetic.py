"""Synthetic work for the check's kernel steps: a routing plan with empty experts and one heavy expert, and one
forward + backward of an expert bank through a dispatcher with every gradient collected.

Shape legend: T tokens, d model width, f expert hidden width, E experts, k rows per token, N = T*k plan rows.

The plan is built row by row rather than by a router, so that its skew is exact: expert 0 holds `heavy_share`
of the N rows, the experts in `empty` hold none, the others share the rest at random. Each token has exactly k
rows; where k * heavy_share > 1 (k=8 at 30%) a token meets the heavy expert more than once. The dispatchers'
contract is per row (y[t] = sum over rows r of t of weight[r] * expert_{e_r}(x[t])), so such rows are legal, and
they are what a long, skewed segment looks like to the kernels; a top-k router would cap one expert at 1/k.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from moe.experts import Experts
from routing.plan import RoutingPlan


def skewed_plan(T: int, E: int, k: int, empty: Sequence[int], heavy_share: float, seed: int,
                device: torch.device) -> RoutingPlan:
    """Rows sorted by expert (token order within an expert), expert 0 with round(heavy_share * T * k) rows."""
    if 0 in empty or len(set(empty)) != len(empty) or not all(0 < e < E for e in empty):
        raise ValueError(f"empty experts {list(empty)} must be distinct, in 1..{E - 1} (expert 0 is the heavy one)")
    g = torch.Generator().manual_seed(seed)
    N = T * k
    n_heavy = round(heavy_share * N)
    others = torch.tensor([e for e in range(1, E) if e not in set(empty)])
    pick = torch.multinomial(torch.ones(len(others)), N - n_heavy, replacement=True, generator=g)
    experts = torch.cat([torch.zeros(n_heavy, dtype=torch.long), others[pick]])  # [N] before sorting
    tokens = torch.arange(T).repeat_interleave(k)[torch.randperm(N, generator=g)]  # each token exactly k rows
    order = torch.argsort(experts * T + tokens, stable=True)  # by expert, then by token
    counts = torch.bincount(experts, minlength=E)
    weight = torch.rand(N, generator=g)
    return RoutingPlan(token_index=tokens[order].to(device), expert_index=experts[order].to(device),
                       weight=weight.to(device), counts=counts.to(device), num_tokens=T)


def expert_bank(E: int, d: int, f: int, dtype: torch.dtype, device: torch.device, seed: int,
                glu: bool = True, bias: bool = True) -> Experts:
    """SwiGLU experts (with biases by default, so the bias paths run too), weights of unit-scale outputs."""
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: billions of fp32 numbers take the CPU seconds
        bank = Experts(E, d, f, "silu", glu, bias)
    with torch.no_grad():
        for name, p in bank.named_parameters():
            fan_in = p.shape[1] if p.dim() == 3 else 1
            p.normal_(0.0, 1.0 / fan_in ** 0.5 if name.startswith("w_") else 0.1)
    return bank.to(dtype)


def as_dtype(bank: Experts, dtype: torch.dtype) -> Experts:
    """A copy of the bank in another dtype (the fp32 reference holds the bf16 bank's values exactly)."""
    with torch.device(bank.w_up.device):
        twin = Experts(bank.num_experts, bank.w_up.shape[1], bank.w_up.shape[2], bank.activation,
                       bank.w_gate is not None, bank.b_up is not None)
    twin.load_state_dict({n: p.detach().to(dtype) for n, p in bank.state_dict().items()})
    return twin


def forward_backward(dispatch: Callable, x: Tensor, plan: RoutingPlan, bank: Experts, gy: Tensor) -> dict[str, Tensor]:
    """y = dispatch(x, plan, bank); y.backward(gy) -> {"y", "grad_x", "grad_weight", "grad_<param>"...}."""
    for p in bank.parameters():
        p.grad = None
    xg = x.detach().clone().requires_grad_(True)
    w = plan.weight.detach().clone().requires_grad_(True)
    run = RoutingPlan(token_index=plan.token_index, expert_index=plan.expert_index, weight=w, counts=plan.counts,
                      num_tokens=plan.num_tokens)
    y = dispatch(xg, run, bank)
    y.backward(gy.to(y.dtype))
    out = {"y": y.detach(), "grad_x": xg.grad, "grad_weight": w.grad}
    out.update({f"grad_{n}": p.grad for n, p in bank.named_parameters()})
    return out
