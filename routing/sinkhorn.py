"""Sinkhorn routing: choose experts by Sinkhorn-balanced scores in training, weight them by the plain gate.

Shape legend: T tokens, d model width, E experts, k choices per token, N surviving assignments, C capacity.

Sinkhorn balancing for routing comes from S-BASE (Clark et al. 2022, "Unified Scaling Laws for Routed Language
Models", the approximate BASE solver) and is Megatron-LM's `moe_router_load_balancing_type=sinkhorn`. This
follows Megatron-core's `TopKRouter.sinkhorn_load_balancing`:

- training: the logits are Sinkhorn-normalised without gradient (every expert receives the same total mass), the
  top-k of that balanced matrix picks the experts, and the combine weights are the *plain* activation of the
  logits at the chosen experts, so the gate learns through them;
- evaluation: the top-k of the plain activation (no balancing: at inference a token must not depend on the other
  tokens of its batch);
- the activation is sigmoid for k = 1 and a softmax over all E experts for k > 1 (Megatron's
  `_sinkhorn_activation`; earlier Megatron versions used sigmoid for every k).

Differences from Megatron, on purpose: the normalisation runs in the log domain (Megatron exponentiates raw
logits, which overflows for logits above ~88), for a fixed `model.moe.router.sinkhorn_iters` instead of until a tolerance
(a fixed cost and no host synchronisation per iteration), and the aux losses follow the shared coefficients
(Megatron asserts an aux-loss coefficient of 0 for Sinkhorn; conf/routing/sinkhorn.yaml sets it to 0).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from routing.capacity import choice_plan, expert_capacity
from routing.generation import routing_capacity_factor
from routing.plan import RoutingPlan
from routing.router import TORCH_KERNELS, Router, RouterKernels
from routing.topk import select_topk, standard_losses


@torch.no_grad()
def sinkhorn_log_duals(logits: Tensor, iters: int, col_mass: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Log-domain Sinkhorn-Knopp on K = exp(logits) [T, E] -> (alpha [T], beta [E]).

    P = exp(logits + alpha[:, None] + beta[None, :]) has rows summing to 1 (each token one unit of mass; exact,
    the row step runs last) and columns summing to approximately `col_mass` [E] (default: T / E each, uniform).
    Only beta changes the ranking of experts within a row: alpha is a per-token constant.
    """
    T, E = logits.shape
    # Work on [E, T]: both reductions then run along long contiguous rows or across E rows, several times
    # faster on CPU than reducing the short rows of [T, E].
    scores = logits.detach().float().t().contiguous()  # [E, T]
    if col_mass is None:
        log_col = torch.full((E,), math.log(T / E) if T > 0 else 0.0, device=logits.device)
    else:
        log_col = col_mass.float().log()  # an expert with zero mass gets beta = -inf: it receives nothing
    beta = torch.zeros(E, device=logits.device)
    alpha = torch.zeros(T, device=logits.device)
    for _ in range(iters):
        alpha = -torch.logsumexp(scores + beta[:, None], dim=0)  # rows (tokens) -> 1
        beta = log_col - torch.logsumexp(scores + alpha[None, :], dim=1)  # columns (experts) -> col_mass
    alpha = -torch.logsumexp(scores + beta[:, None], dim=0)  # last: rows exact, columns within tolerance
    return alpha, beta


@torch.no_grad()
def sinkhorn(logits: Tensor, iters: int, col_mass: Optional[Tensor] = None) -> Tensor:
    """The Sinkhorn-normalised score matrix P [T, E] (no gradient): rows sum to 1, columns to ~col_mass (T/E)."""
    alpha, beta = sinkhorn_log_duals(logits, iters, col_mass)
    return torch.exp(logits.detach().float() + alpha[:, None] + beta[None, :])


def sinkhorn_activation(logits: Tensor, top_k: int) -> Tensor:
    """Megatron's combine-weight activation [T, E]: sigmoid for k = 1, softmax over the E experts for k > 1."""
    return torch.sigmoid(logits) if top_k == 1 else torch.softmax(logits, dim=-1)


class SinkhornRouter(Router):
    """Top-k by Sinkhorn-balanced scores in training, top-k by the plain activation at evaluation."""

    def route(self, x: Tensor, logits: Tensor, token_ids: Optional[Tensor], seq_len: int,
              kernels: RouterKernels = TORCH_KERNELS) -> RoutingPlan:
        cfg = self.cfg
        T, E = logits.shape
        act = sinkhorn_activation(logits, cfg.top_k)  # [T, E], differentiable
        if self.training:
            # Selection only: row scaling (alpha) does not change a row's top-k, so the column duals suffice.
            _, beta = sinkhorn_log_duals(logits, cfg.sinkhorn_iters)
            expert_idx = select_topk(logits.detach() + beta, cfg.top_k)  # [T, k]
        else:
            # The activation (sigmoid or softmax) is monotonic in the logits: ranking the logits is its ranking,
            # without the ties of probabilities that underflow or sigmoids that saturate to 1.
            expert_idx = select_topk(logits, cfg.top_k)
        weight = act.gather(1, expert_idx) * cfg.scale  # [T, k], the gate learns through these
        cf = routing_capacity_factor(cfg, self.training)  # 0 while generating: each new token routes dropless
        capacity = expert_capacity(T, E, cfg.top_k, cf, cfg.min_capacity)
        probs = torch.softmax(logits, dim=-1)  # a distribution over experts, for the balance loss and the statistics
        aux = standard_losses(cfg, logits, probs, expert_idx, group=self.batch_group)
        return choice_plan(expert_idx, weight, probs, E, capacity, cf > 0, cfg.drop_policy, aux,
                           renormalize_after_drop=cfg.renormalize_after_drop)
