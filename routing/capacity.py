"""Capacity and drop policy: turning k choices per token into the surviving rows of a plan.

Shape legend: T tokens, E experts, k choices per token, A = T*k assignments, N surviving rows, C capacity.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional

import torch
from torch import Tensor

from routing.counts import count_ids
from routing.plan import RoutingPlan
from routing.stats import routing_stats


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> Optional[int]:
    """Slots per expert, or None when dropless (capacity_factor == 0).

    Tutel's sign convention: cf > 0 fixes C = ceil(cf * T * k / E); cf < 0 drops only past the cap
    ceil(|cf| * T * k / E), so one hot expert cannot exhaust memory, while padded layouts (einsum) size their
    slots by the busiest expert instead of the cap (see RoutingPlan.capacity).

    The ceiling is taken in exact rational arithmetic on the capacity factor as written (its shortest decimal
    repr: 0.55 is 11/20), not on the double product: 0.55 * 100 is 55.00000000000001 in double precision, whose
    ceiling would give an expert one slot more than the formula (expert_capacity(100, 5, 1, 0.55) is 11, not 12).
    """
    if capacity_factor == 0:
        return None
    cf = Fraction(repr(abs(float(capacity_factor))))  # the decimal the user wrote, exactly
    capacity = math.ceil(cf * num_tokens * top_k / num_experts)  # Fraction's ceil is exact
    return max(capacity, min_capacity)


def assign(
    expert_idx: Tensor,  # [T, k] long, chosen experts, column j is every token's j-th choice
    weight: Tensor,  # [T, k] float, combine weights of the choices
    num_experts: int,
    capacity: Optional[int],
    drop_policy: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sorts assignments by expert and drops those past capacity.

    Returns token_index [N], expert_index [N], weight [N], counts [E], kept [T, k] bool.
    Within an expert, rows are ordered by priority: first choices before second choices (GShard, Tutel), then
    by token position ("position") or by descending weight ("probs"); capacity keeps the first C rows of each
    expert. So under "probs" a second choice never displaces a first choice, even one with a smaller weight.
    """
    T, k = expert_idx.shape
    A = T * k
    # Choice-major flattening: row a = j * T + t, so every token's first choice outranks any second choice (GShard).
    flat_expert = expert_idx.t().reshape(A)
    flat_weight = weight.t().reshape(A)
    if drop_policy == "probs" and capacity is not None:
        # Rank by weight inside each choice column: the choice index stays the major key.
        within = torch.argsort(weight.detach().t(), dim=1, descending=True, stable=True)  # [k, T]
        rank = torch.empty_like(within)
        rank.scatter_(1, within, torch.arange(T, device=within.device).expand(k, T))
        priority = (rank + torch.arange(k, device=rank.device)[:, None] * T).reshape(A)
        order = torch.argsort(flat_expert * A + priority)  # keys are unique, so the sort is stable by construction
        sorted_expert = flat_expert[order]
    else:
        # Priority is the flat position: a stable sort of the expert ids alone is that order (the unique key
        # expert * A + position before issues 16/21), without building the key, and gives the sorted ids with it.
        sorted_expert, order = torch.sort(flat_expert, stable=True)
    counts = count_ids(flat_expert, num_experts)
    if capacity is None:
        kept = torch.ones(T, k, dtype=torch.bool, device=expert_idx.device)
        # row a = j * T + t carries token a mod T (one op, where a gather needs arange(T).repeat(k) built first)
        return order.remainder(max(T, 1)), sorted_expert, flat_weight[order], counts, kept
    offsets = torch.cumsum(counts, 0) - counts
    position = torch.arange(A, device=order.device) - offsets[sorted_expert]
    keep_sorted = position < capacity
    kept_flat = torch.empty(A, dtype=torch.bool, device=order.device)
    kept_flat[order] = keep_sorted
    kept = kept_flat.reshape(k, T).t()
    order = order[keep_sorted]  # the only host synchronisation: N is data-dependent once tokens drop
    counts = counts.clamp(max=capacity)
    return order.remainder(max(T, 1)), flat_expert[order], flat_weight[order], counts, kept


def renormalize_kept(token_index: Tensor, row_weight: Tensor, weight: Tensor) -> Tensor:
    """model.moe.router.renormalize_after_drop (DeepSpeed's top2gating): the surviving rows' weights rescaled so
    that each token's kept weights sum to what its k choices summed to before capacity dropped some.

    token_index [N], row_weight [N] the plan's surviving rows; weight [T, k] every choice's weight before dropping.
    With weights that sum to 1 over the k (renormalize, or topk_softmax) a top-2 token that lost its second
    choice keeps weight 1 on the first, as DeepSpeed's gates1_s / (gates1_s + gates2_s) with gates2_s masked to 0.
    A token with no surviving row has nothing to rescale. Differentiable through both sums, as DeepSpeed's is.
    """
    total = weight.sum(dim=-1)  # [T]
    kept = torch.zeros_like(total).index_add(0, token_index, row_weight)  # [T]
    kept = torch.where(kept > 0, kept, torch.ones_like(kept))  # tokens with no row: never gathered below
    return row_weight * (total / kept)[token_index]


def choice_plan(
    expert_idx: Tensor,  # [T, k] chosen experts
    weight: Tensor,  # [T, k] combine weights
    probs: Tensor,  # [T, E] a distribution over experts per token, for the statistics
    num_experts: int,
    capacity: Optional[int],
    fixed: bool,
    drop_policy: str,
    aux_losses: dict[str, Tensor],
    renormalize_after_drop: bool = False,
    token_stats: Optional[tuple[Tensor, Tensor]] = None,
) -> RoutingPlan:
    """The plan of k choices per token: `assign` through capacity, plus the standard statistics.

    fixed: the capacity is a fixed layout (capacity_factor > 0, or BASE's balanced slots) that padded
    dispatchers should use as C; otherwise it only caps the counts.
    renormalize_after_drop: model.moe.router.renormalize_after_drop (renormalize_kept); nothing drops when dropless.
    token_stats: (entropy [T], top1_prob [T]) where the router has them (routing.stats.routing_stats).
    """
    rows = assign(expert_idx, weight, num_experts, capacity, drop_policy)
    return rows_plan(rows, weight, probs, capacity if fixed else None, aux_losses,
                     renormalize_after_drop and capacity is not None, token_stats)


def rows_plan(
    rows: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],  # assign's token_index, expert_index, weight, counts, kept
    weight: Tensor,  # [T, k] every choice's combine weight before dropping
    probs: Tensor,  # [T, E] a distribution over experts per token, for the statistics
    capacity: Optional[int],  # C of a fixed layout, else None
    aux_losses: dict[str, Tensor],
    renormalize: bool,  # rescale the surviving weights to their token's pre-drop sum (renormalize_kept)
    token_stats: Optional[tuple[Tensor, Tensor]] = None,  # (entropy [T], top1_prob [T]) if the router has them
) -> RoutingPlan:
    """The plan of surviving rows in `assign`'s layout (however they were sorted), with the standard statistics."""
    token_index, expert_index, row_weight, counts, kept = rows
    if renormalize:
        row_weight = renormalize_kept(token_index, row_weight, weight)
    return RoutingPlan(
        token_index=token_index,
        expert_index=expert_index,
        weight=row_weight,
        counts=counts,
        num_tokens=weight.shape[0],
        capacity=capacity,
        kept=kept,
        aux_losses=aux_losses,
        stats=routing_stats(probs.detach(), counts, kept, *(token_stats or ())),
    )
