"""Auxiliary router losses. Each returns an unscaled scalar; routers scale them by their coefficients.

Shape legend: T tokens, E experts, k choices per token.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class CollectiveError(RuntimeError):
    """A collective inside a router failed (a process-group timeout, a dead peer); carries this rank's counts."""

    def __init__(self, phase: str, counts: list, error: BaseException):
        super().__init__(f"{phase} failed (rows per expert on this rank {counts}): {type(error).__name__}: {error}")
        self.phase, self.counts, self.error = phase, counts, error


def load_balancing_loss(probs: Tensor, expert_idx: Tensor, num_experts: int, group=None) -> Tensor:
    """Switch Transformer's E * sum_i f_i * P_i over the choices given.

    probs [T, E] fp32 router probabilities; expert_idx [T, k] chosen experts (before capacity, as in Switch).
    f_i is the fraction of the T*k assignments sent to expert i, P_i the mean probability of expert i.
    Callers pick the convention by the columns they pass (balance_choices): all k choices (Switchyard's
    "all_choices"; transformers' load_balancing_loss_func is k times this value, since it divides the counts by T,
    not T*k) or the first column only (GShard's and DeepSpeed's top2gating "first_choice").
    Equals 1 under perfect balance. With one column (k = 1, or first choices) it is at most E, when one expert
    takes every token with certainty; with k > 1 distinct choices an expert receives at most T of the T*k
    assignments (f_i <= 1/k), so the all-choices loss is at most E/k.

    group: a data-parallel process group over which the global batch is spread in equal shards. f (counts, not
    differentiable) is then summed over the group with one all-reduce, so each rank returns E * sum_i f_i * P_i^rank
    and the mean over ranks, the loss data-parallel training minimises, is the global batch's loss exactly.
    """
    return num_experts * torch.sum(expert_fractions(expert_idx, num_experts, probs.dtype, group) * probs.mean(dim=0))


def expert_fractions(expert_idx: Tensor, num_experts: int, dtype: torch.dtype = torch.float32, group=None) -> Tensor:
    """f [E] of load_balancing_loss: the fraction of the assignments in expert_idx [T, k] sent to each expert,
    over the data-parallel `group` when one is given (one all-reduce of the counts and the total). No gradient."""
    flat = expert_idx.reshape(-1)
    # scatter_add rather than bincount: bincount sizes its output from the data, a host sync on CUDA
    counts = torch.zeros(num_experts, dtype=dtype, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=dtype))
    if group is not None:
        import torch.distributed as dist

        total = torch.cat([counts, counts.new_full((1,), expert_idx.numel())])
        try:
            dist.all_reduce(total, group=group)
        except RuntimeError as e:  # a timeout or a dead peer: MoELayer adds the layer and re-raises
            raise CollectiveError("all-reduce of the load-balancing loss's expert counts", counts.tolist(), e) from e
        return total[:-1] / total[-1]
    return counts / expert_idx.numel()


def balance_choices(expert_idx: Tensor, convention: str) -> Tensor:
    """expert_idx [T, k], best choice first -> the columns the load-balancing loss counts under `convention`
    (model.moe.router.balance_loss): all of them ("all_choices") or the first choice only ("first_choice")."""
    if convention == "first_choice":
        return expert_idx[:, :1]
    assert convention == "all_choices", convention  # RouterConfig refuses other values by name
    return expert_idx


def router_z_loss(logits: Tensor, lse: Optional[Tensor] = None, probs: Optional[Tensor] = None) -> Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2, keeping router logits small.

    lse [T] and probs [T, E] (both without gradient): the router's logsumexp and softmax of these logits where it
    has them already (routing.topk.TopKRouter), so the loss costs no pass over [T, E] forward and one backward
    (its gradient 2 * lse_t * p_t,i / T), instead of logsumexp's five and three."""
    if lse is None:
        return torch.logsumexp(logits, dim=-1).square().mean()
    return _ZLossFromLse.apply(logits, lse, probs)


class _ZLossFromLse(torch.autograd.Function):
    """mean(lse^2) with lse = logsumexp(logits) given; d/d logits = 2 * lse[:, None] * probs / T."""

    @staticmethod
    def forward(ctx, logits: Tensor, lse: Tensor, probs: Tensor) -> Tensor:
        ctx.save_for_backward(lse, probs)
        return lse.square().mean()

    @staticmethod
    def backward(ctx, grad: Tensor):
        lse, probs = ctx.saved_tensors
        scale = lse * (2.0 / max(lse.numel(), 1)) * grad  # [T]
        return probs * scale[:, None], None, None
