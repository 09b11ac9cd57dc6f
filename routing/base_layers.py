"""BASE layers: a balanced linear assignment of tokens to experts in training, greedy top-1 at evaluation.

Shape legend: T tokens, d model width, E experts, k = 1 choice per token, C = ceil(T / E) slots per expert.

Lewis et al. 2021, "BASE Layers: Simplifying Training of Large, Sparse Models". In training every expert
receives the same number of tokens, and among all such assignments the router takes the one that maximises the
total token-expert affinity (the logits). Balance is a constraint, not a loss, so no load-balancing loss is
needed (with every expert at exactly T/E tokens the Switch loss would be the constant 1, with zero gradient):
`model.moe.router.aux_loss_coef` is ignored; the z-loss is added when `model.moe.router.z_loss_coef` > 0. At evaluation tokens
are routed greedily to their top-1 expert, since at inference a token cannot see the others of its batch.

The token's output is h + sigmoid(h . w_e) f_e(h) (the paper's Eq. 1); the residual is the block's, so the plan's
combine weight is sigmoid(logit of the assigned expert) (times `model.moe.router.scale`, 1 by default), which is also
how the gate learns: the assignment itself carries no gradient. (fairseq's BaseLayer mixes
alpha f_e(h) + (1 - alpha) h inside the layer; the paper's form fits the plan's y = sum weight * expert(x).)

Two solvers (`model.moe.router.base_solver`):
- "auction": Bertsekas' auction algorithm for the transportation problem with E experts of C_e identical slots,
  tokens bidding for experts, with epsilon scaling. It ends with every token's expert within eps of its best
  under the final expert prices, so its total affinity is within T * eps of the optimum (eps is 1e-4 of the
  logit spread by default). E is small, so the state is E prices and an [E, C] matrix of held bids: rounds
  where many tokens bid are a dozen tensor operations, and the short eviction chains at the end of a phase run
  as serial bids on per-expert heaps. No state is carried between calls (a warm start from the last call's prices
  would make routing depend on history and break bit-exact resumption), so a call is a pure function of its logits.
- "sinkhorn": the S-BASE approximation (Clark et al. 2022): Sinkhorn-normalise exp(logits) to the experts'
  slot counts for `model.moe.router.sinkhorn_iters` iterations, then a greedy balanced rounding that meets the slot
  counts exactly.

When E does not divide T, the experts' sizes are floor(T/E) or ceil(T/E) (they differ by at most one): the
first T mod E experts take one more token.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from routing.assignment import auction_assignment, balanced_capacity, sinkhorn_assignment
from routing.capacity import choice_plan
from routing.config import RouterConfig
from routing.losses import router_z_loss
from routing.plan import RoutingPlan
from routing.router import TORCH_KERNELS, Router, RouterKernels

class BaseRouter(Router):
    """Balanced assignment in training (every expert T/E tokens), greedy top-1 at evaluation."""

    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig, vocab_size: Optional[int] = None):
        if cfg.top_k != 1:
            raise ValueError(
                f"model.moe.router.top_k={cfg.top_k} but BASE layers send every token to exactly one expert; set model.moe.router.top_k=1"
            )
        super().__init__(d_model, num_experts, cfg, vocab_size)

    def route(self, x: Tensor, logits: Tensor, token_ids: Optional[Tensor], seq_len: int,
              kernels: RouterKernels = TORCH_KERNELS) -> RoutingPlan:
        cfg = self.cfg
        T, E = logits.shape
        capacity = None
        if self.training:
            slots = balanced_capacity(T, E, logits.device)
            if cfg.base_solver == "auction":
                expert, _ = auction_assignment(logits, slots)
            else:
                expert = sinkhorn_assignment(logits, slots, cfg.sinkhorn_iters)
            capacity = int(slots.max()) if T > 0 else 0  # a fixed layout: no expert ever exceeds ceil(T/E)
        else:
            expert = logits.detach().argmax(dim=-1)
        expert_idx = expert[:, None]  # [T, 1]
        weight = torch.sigmoid(logits.gather(1, expert_idx)) * cfg.scale  # [T, 1], differentiable
        # Nothing is dropped: the balanced assignment fits its slots by construction, and greedy eval is dropless.
        aux = {"router_z_loss": cfg.z_loss_coef * router_z_loss(logits)} if cfg.z_loss_coef > 0 else {}
        probs = torch.softmax(logits, dim=-1)  # a distribution over experts, for the statistics only
        return choice_plan(expert_idx, weight, probs, E, capacity, True, cfg.drop_policy, aux)
