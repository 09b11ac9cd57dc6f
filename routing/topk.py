"""Token-choice top-k routing: each token picks its k best experts (Switch k=1, GShard/Mixtral k=2).

Shape legend: T tokens, d model width, E experts, k choices per token, N surviving assignments.

GShard's random routing (Lepikhin et al. 2021, "GShard: Scaling Giant Models with Conditional Computation and
Automatic Sharding", its top-2 gating), `model.moe.router.random_second` with k = 2: in training the second expert is kept only
with probability min(1, 2 * g2), g2 = w2 / (w1 + w2) its share of the two gates, so a second choice that would
barely contribute usually saves its expert's slot. The draw uses torch's global RNG (seeded, and saved in
trainer checkpoints); a dropped second choice is removed before capacity and marked not kept. Evaluation keeps both.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from routing.capacity import assign, choice_plan, expert_capacity, rows_plan
from routing.config import RouterConfig
from routing.expert_softmax import expert_softmax
from routing.generation import generating, routing_capacity_factor
from routing.fused_gate import fused_gate
from routing.losses import balance_choices, expert_fractions, load_balancing_loss, router_z_loss
from routing.plan import RoutingPlan
from routing.router import TORCH_KERNELS, Router, RouterKernels
from routing.selection import select_topk

__all__ = ["TopKRouter", "gshard_keep_second", "select_topk", "standard_losses", "topk_gating"]


def topk_gating(logits: Tensor, top_k: int, order: str, renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """logits [T, E] fp32 -> (probs [T, E], weight [T, k], expert_idx [T, k]).

    Both orders select on the logits: softmax is monotonic, so that is the top-k of the probs, except where
    probs underflow to equal values (logits [1e4, 0, -1e4, 5e3]: probs [1, 0, 0, 0], and a top-2 of them took
    expert 2, weight 0 but a capacity slot and a place in the balancing loss). The weights are gathered from
    the same tensors as before, so they are bit-identical wherever the selection is unchanged.
    Under topk_softmax the probs only feed the balancing loss and the statistics: routing.expert_softmax's
    (torch's from 16 experts on, an ulp from it below); softmax_topk gathers its weights from torch.softmax."""
    probs = expert_softmax(logits) if order == "topk_softmax" else torch.softmax(logits, dim=-1)
    expert_idx = select_topk(logits, top_k)
    if order == "topk_softmax":
        weight = torch.softmax(logits.gather(1, expert_idx), dim=-1)
    else:
        weight = probs.gather(1, expert_idx)
        if renormalize:
            weight = weight / weight.sum(dim=-1, keepdim=True)
    return probs, weight, expert_idx


def gshard_keep_second(weight: Tensor) -> Tensor:
    """weight [T, 2] top-2 gates -> [T] bool: keep the second choice with probability min(1, 2 * g2) (GShard)."""
    w = weight.detach()
    g2 = w[:, 1] / w.sum(dim=-1)  # normalised over the two, whatever model.moe.router.order/renormalize gave
    return torch.rand_like(g2) < 2.0 * g2  # g2 <= 1/2, so 2 * g2 <= 1 is already min(1, 2 * g2)


class TopKRouter(Router):
    """Top-k selection, capacity, and the Switch load-balancing and ST-MoE z losses."""

    def route(self, x: Tensor, logits: Tensor, token_ids: Optional[Tensor], seq_len: int,
              kernels: RouterKernels = TORCH_KERNELS) -> RoutingPlan:
        cfg = self.cfg
        E = self.num_experts
        if kernels.topk is None and cfg.order == "topk_softmax" and not generating():
            # the weights, both losses and the token statistics in one autograd node (routing.fused_gate)
            expert_idx = select_topk(logits, cfg.top_k)
            fractions = None
            if cfg.aux_loss_coef > 0:
                fractions = expert_fractions(balance_choices(expert_idx, cfg.balance_loss), E, group=self.batch_group)
            gate = fused_gate(logits, expert_idx, fractions, cfg.aux_loss_coef, cfg.z_loss_coef)
            aux = {name: loss for name, loss in (("load_balancing_loss", gate.load_balancing_loss),
                                                 ("router_z_loss", gate.router_z_loss)) if loss is not None}
            return self._plan(expert_idx, gate.weight, gate.probs, aux, (gate.entropy, gate.top1_prob), kernels)
        probs, weight, expert_idx = (kernels.topk or topk_gating)(logits, cfg.top_k, cfg.order, cfg.renormalize)
        # nothing reads the losses and statistics while generating (standard_losses, routing_stats)
        lse, token_stats = (None, None) if generating() else first_choice_lse(logits, probs, expert_idx)
        aux = standard_losses(cfg, logits, probs, expert_idx, group=self.batch_group, lse=lse)
        return self._plan(expert_idx, weight, probs, aux, token_stats, kernels)

    def _plan(self, expert_idx: Tensor, weight: Tensor, probs: Tensor, aux: dict[str, Tensor],
              token_stats: Optional[tuple[Tensor, Tensor]], kernels: RouterKernels) -> RoutingPlan:
        """The plan of the chosen experts: random second choices, capacity, the sort by expert."""
        cfg = self.cfg
        T = expert_idx.shape[0]
        E = self.num_experts
        keep_second = gshard_keep_second(weight) if cfg.random_second and self.training else None
        if cfg.scale != 1.0:  # x * 1.0 is x: no op and no backward node for the plain router
            weight = weight * cfg.scale
        cf = routing_capacity_factor(cfg, self.training)  # 0 while generating: each new token routes dropless
        capacity = expert_capacity(T, E, cfg.top_k, cf, cfg.min_capacity)
        if keep_second is None and (capacity is not None or kernels.sort is None):
            return choice_plan(expert_idx, weight, probs, E, capacity, cf > 0, cfg.drop_policy, aux,
                               renormalize_after_drop=cfg.renormalize_after_drop, token_stats=token_stats)
        if keep_second is None:
            # Dropless: the device sort gives assign's rows without its host synchronisation.
            order, token_index, expert_index, counts = kernels.sort(expert_idx, E)[:4]
            rows = (token_index, expert_index, weight.t().reshape(-1)[order], counts,
                    torch.ones_like(expert_idx, dtype=torch.bool))
        else:
            # A dropped second choice is parked on a virtual expert E: it takes no slot of a real expert, and its
            # rows sort last, so cutting them off leaves a plan over the E real experts.
            parked = torch.cat([expert_idx[:, :1], torch.where(keep_second, expert_idx[:, 1], E)[:, None]], dim=1)
            token_index, expert_index, row_weight, counts, kept = assign(
                parked, weight, E + 1, capacity, cfg.drop_policy
            )
            counts = counts[:E]
            n = int(counts.sum())  # a host sync, as capacity already needs one
            kept[:, 1] &= keep_second
            rows = (token_index[:n], expert_index[:n], row_weight[:n], counts, kept)
        # DeepSpeed's top2gating: a choice lost to capacity or to random routing leaves its weight to the rest
        renormalize = cfg.renormalize_after_drop and (capacity is not None or keep_second is not None)
        return rows_plan(rows, weight, probs, capacity if cf > 0 else None, aux, renormalize, token_stats)


@torch.no_grad()
def first_choice_lse(logits: Tensor, probs: Tensor, expert_idx: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """logits, probs [T, E] and expert_idx [T, k] of a greedy top-k (first column: each row's largest logit) ->
    (lse [T], (entropy [T], top1_prob [T])), without a pass of logsumexp or log over [T, E].

    p_top = exp(l_top - lse), so lse = l_top - log(p_top); p_top >= 1/E keeps the log well conditioned (the value
    is logsumexp's within a few ulps). The entropy -sum p log p = lse - sum p * l for finite logits (the gate's)."""
    top = expert_idx[:, :1]
    p_top = probs.gather(1, top)  # [T, 1]: the largest probability, as probs.amax(-1)
    lse = (logits.gather(1, top) - p_top.log()).squeeze(1)
    entropy = lse - (probs * logits).sum(-1)
    return lse, (entropy, p_top.squeeze(1))


def standard_losses(cfg: RouterConfig, logits: Tensor, probs: Tensor, expert_idx: Tensor,
                    group=None, lse: Optional[Tensor] = None) -> dict[str, Tensor]:
    """The load-balancing loss on the convention of cfg.balance_loss (routing.losses.balance_choices: all k
    choices, or GShard's first choices) and the ST-MoE z-loss, scaled; a zero coefficient leaves a loss out.
    expert_idx [T, k] has each token's best choice first (the first column is the first choice).
    group: the data-parallel group of Router.batch_group (see load_balancing_loss).
    lse [T]: logsumexp of the logits where the router has it (first_choice_lse), so the z-loss reuses probs.
    None while generating (routing.generation): nothing trains on them, and the balancing loss's all-reduce over
    the data-parallel group would leave a rank that generates alone waiting for the others."""
    if generating():
        return {}
    aux = {}
    if cfg.aux_loss_coef > 0:
        counted = balance_choices(expert_idx, cfg.balance_loss)
        aux["load_balancing_loss"] = cfg.aux_loss_coef * load_balancing_loss(probs, counted, probs.shape[-1], group)
    if cfg.z_loss_coef > 0:
        aux["router_z_loss"] = cfg.z_loss_coef * (
            router_z_loss(logits) if lse is None else router_z_loss(logits, lse, probs.detach()))
    return aux
