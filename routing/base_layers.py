"""BASE layers: a balanced linear assignment of tokens to experts in training, greedy top-k at evaluation.

Shape legend: T tokens, d model width, E experts, k choices per token, C = ceil(T * k / E) slots per expert.

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

With top_k = k > 1 (issue 21) every token goes to k distinct experts and every expert takes T*k/E of the
choices: the b-matching of routing/balanced_topk.py, which maximises the summed logits of the chosen pairs.
Each chosen expert gates with sigmoid(its logit) as above (`model.moe.router.score_fn=sigmoid`, the default), or
with the softmax over the k chosen logits (`score_fn=softmax`, Mixtral's topk_softmax; refused for k = 1, where
that weight is the constant 1 and the router would never learn). At evaluation: the greedy top-k.

Two solvers (`model.moe.router.base_solver`):
- "auction": Bertsekas' auction algorithm for the transportation problem with E experts of C_e identical slots,
  tokens bidding for experts, with epsilon scaling. It ends with every token's expert within eps of its best
  under the final expert prices, so its total affinity is within T * eps of the optimum (eps is 1e-4 of the
  logit spread by default). E is small, so the state is E prices and an [E, C] matrix of held bids: rounds
  where many tokens bid are a dozen tensor operations, and the short eviction chains at the end of a phase run
  as serial bids on per-expert heaps. No state is carried between calls (a warm start from the last call's prices
  would make routing depend on history and break bit-exact resumption), so a call is a pure function of its logits.
  For k > 1 (and for k = 1 at E > AUCTION_TOPK_FROM_E, where it is faster) the auction is
  routing.balanced_topk's: the same bidding with k slots per token, started from prices found by a few
  Jacobi steps on the dual (measured in docs/routing_defaults.md).
- "sinkhorn" (k = 1 only): the S-BASE approximation (Clark et al. 2022): Sinkhorn-normalise exp(logits) to the experts'
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
from routing.balanced_topk import balanced_topk_assignment, topk_capacity
from routing.capacity import choice_plan
from routing.config import RouterConfig
from routing.losses import router_z_loss
from routing.plan import RoutingPlan
from routing.router import TORCH_KERNELS, Router, RouterKernels
from routing.topk import select_topk

AUCTION_TOPK_FROM_E = 32  # top-1 above this many experts uses balanced_topk's warm-started auction (faster there)


def check_base_config(cfg: RouterConfig, num_experts: Optional[int] = None) -> None:
    """The BASE-specific settings a config dataclass cannot check alone (it may be edited after validation)."""
    if cfg.top_k != 1 and cfg.base_solver != "auction":
        raise ValueError(f"model.moe.router.base_solver={cfg.base_solver!r} sends every token to one expert, but "
                         f"top_k={cfg.top_k}; use base_solver=auction for top_k > 1 or set top_k=1")
    if cfg.top_k == 1 and cfg.score_fn == "softmax":
        raise ValueError("model.moe.router.score_fn=softmax with top_k=1 gates every token with the constant 1 (a "
                         "softmax over one logit), so the router would never learn; use score_fn=sigmoid")
    if num_experts is not None and cfg.top_k > num_experts:
        raise ValueError(f"model.moe.router.top_k={cfg.top_k} exceeds the {num_experts} experts: each token goes to "
                         f"k distinct experts")


class BaseRouter(Router):
    """Balanced assignment in training (every expert T*k/E choices), greedy top-k at evaluation."""

    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig, vocab_size: Optional[int] = None):
        check_base_config(cfg, num_experts)
        super().__init__(d_model, num_experts, cfg, vocab_size)

    def route(self, x: Tensor, logits: Tensor, token_ids: Optional[Tensor], seq_len: int,
              kernels: RouterKernels = TORCH_KERNELS) -> RoutingPlan:
        cfg = self.cfg
        check_base_config(cfg, self.num_experts)  # the cfg may have been edited since construction
        T, E = logits.shape
        k = cfg.top_k
        capacity = None
        if self.training:
            if cfg.base_solver == "sinkhorn":
                slots = balanced_capacity(T, E, logits.device)
                expert_idx = sinkhorn_assignment(logits, slots, cfg.sinkhorn_iters)[:, None]
            elif k == 1 and E <= AUCTION_TOPK_FROM_E:
                slots = balanced_capacity(T, E, logits.device)
                expert_idx = auction_assignment(logits, slots)[0][:, None]
            else:
                slots = topk_capacity(T, E, k, logits.device)
                expert_idx, _ = balanced_topk_assignment(logits, k, slots)
            capacity = int(slots.max()) if T > 0 else 0  # a fixed layout: no expert ever exceeds ceil(T*k/E)
        else:
            expert_idx = select_topk(logits, k)  # [T, k] greedy, best first
        chosen = logits.gather(1, expert_idx)  # [T, k], differentiable
        weight = (torch.softmax(chosen, dim=-1) if cfg.score_fn == "softmax" else torch.sigmoid(chosen)) * cfg.scale
        # Nothing is dropped: the balanced assignment fits its slots by construction, and greedy eval is dropless.
        aux = {"router_z_loss": cfg.z_loss_coef * router_z_loss(logits)} if cfg.z_loss_coef > 0 else {}
        probs = torch.softmax(logits, dim=-1)  # a distribution over experts, for the statistics only
        return choice_plan(expert_idx, weight, probs, E, capacity, True, cfg.drop_policy, aux)
