"""Balanced top-k routing with a balanced evaluation: BASE layers' training assignment, and at evaluation the
greedy top-k of the logits minus the experts' prices learnt in training.

Shape legend: T tokens, d model width, E experts, k choices per token.

`model.moe.router.name=balanced_topk`. In training exactly BASE layers with k slots per token
(routing/base_layers.py, routing/balanced_topk.py): every expert takes T*k/E of the choices, the assignment
maximises the summed logits, each chosen expert gates with sigmoid(its logit) (`score_fn=softmax`: the softmax over
the k chosen logits). The assignment is invariant to adding a constant to one expert's logits, so nothing stops
the router from drifting such offsets apart while it trains, and BASE's greedy evaluation then routes very
differently from training: the demo's moe_e64_k1 and moe_e64_k2 with BASE evaluated 0.06-0.3 nats above their
training loss where every other router evaluates below it (docs/routing_defaults.md).

The solver's dual prices p [E] are exactly those offsets: under them every token's assigned experts are (within
eps) its greedy top-k of logits - p. So this router keeps `bias`, a running estimate of -p (centred), updated after each optimizer
step from the prices of the batches since the last one (bias += EVAL_BIAS_RATE * (batch estimate - bias)), and
evaluates with the greedy top-k of logits + bias, gating with the unbiased logits (DeepSeek-V3's way of using
its balancing bias). Training routing never reads the bias, so a resumed run trains bit-exactly; the bias is a
persistent buffer, saved with the model, so a loaded checkpoint evaluates as the run did.

Capacity slack (`model.moe.router.capacity_factor=c`, c >= 1; 0, the default, is exact balance): in training
each expert takes AT MOST ceil(c * T*k/E) of the choices instead of exactly T*k/E, so a token keeps its
preferred expert while that expert is up to c times as popular as the mean (routing.balanced_topk's dummy rows).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from routing.balanced_topk import balanced_topk_assignment, slack_capacity
from routing.base_layers import BaseRouter
from routing.capacity import choice_plan
from routing.config import RouterConfig
from routing.losses import router_z_loss
from routing.plan import RoutingPlan
from routing.recompute import recomputing
from routing.router import TORCH_KERNELS, RouterKernels
from routing.topk import select_topk

EVAL_BIAS_RATE = 0.1  # step of the evaluation bias towards the latest prices (about the last 10 steps' average)


def check_slack(cfg: RouterConfig) -> None:
    """capacity_factor is this router's slack: 0 (exact balance) or c >= 1 (each expert at most ceil(c*T*k/E))."""
    c = cfg.capacity_factor
    if c != 0.0 and c < 1.0:
        raise ValueError(f"model.moe.router.capacity_factor={c} is the balanced_topk router's capacity slack: each "
                         f"expert takes at most ceil(c * T * top_k / E) choices, so c must be 0 (exactly T * top_k / E "
                         f"each) or at least 1 (e.g. 1.25)")


class BalancedTopKRouter(BaseRouter):
    """BASE's balanced top-k in training; greedy top-k of logits + bias (the learnt prices) at evaluation."""

    bias: Tensor  # [E] fp32, persistent: minus the experts' running prices, centred
    price_sum: Tensor  # [E] fp32, non-persistent: the centred prices of the batches since the last optimizer step
    price_batches: Tensor  # [] fp32, non-persistent: how many batches price_sum holds

    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig, vocab_size: Optional[int] = None):
        check_slack(cfg)
        super().__init__(d_model, num_experts, cfg, vocab_size)
        self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("price_sum", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        self.register_buffer("price_batches", torch.zeros((), dtype=torch.float32), persistent=False)

    def route(self, x: Tensor, logits: Tensor, token_ids: Optional[Tensor], seq_len: int,
              kernels: RouterKernels = TORCH_KERNELS) -> RoutingPlan:
        cfg = self.cfg
        T, E = logits.shape
        k = cfg.top_k
        capacity = None
        if self.training:
            check_slack(cfg)  # the cfg may have been edited since construction
            slots = slack_capacity(T, E, k, cfg.capacity_factor, logits.device)
            expert_idx, prices = balanced_topk_assignment(logits, k, slots)
            capacity = int(slots.max()) if T > 0 else 0  # a fixed layout: no expert exceeds ceil(c*T*k/E)
            finite = torch.isfinite(prices)  # experts without a slot (T*k < E) have no price
            if T > 0 and bool(finite.all()) and torch.is_grad_enabled() and not recomputing():
                with torch.no_grad():  # the replay of a checkpointed forward saw these tokens already
                    self.price_sum += prices - prices.mean()
                    self.price_batches += 1
        else:
            expert_idx = select_topk(logits.detach() + self.bias, k)  # [T, k] greedy, balanced
        chosen = logits.gather(1, expert_idx)  # [T, k], differentiable
        weight = (torch.softmax(chosen, dim=-1) if cfg.score_fn == "softmax" else torch.sigmoid(chosen)) * cfg.scale
        aux = {"router_z_loss": cfg.z_loss_coef * router_z_loss(logits)} if cfg.z_loss_coef > 0 else {}
        probs = torch.softmax(logits, dim=-1)  # a distribution over experts, for the statistics only
        return choice_plan(expert_idx, weight, probs, E, capacity, True, cfg.drop_policy, aux)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """bias += EVAL_BIAS_RATE * (-(mean price since the last step) - bias), then reset the sums."""
        total = torch.cat([self.price_sum, self.price_batches[None]])
        if self.batch_group is not None:  # data parallel (moe.parallel.distribute): one bias for all replicas
            dist.all_reduce(total, group=self.batch_group)
        if float(total[-1]) > 0:  # nothing solved (an eval-only stretch): leave the bias alone
            self.bias += EVAL_BIAS_RATE * (-total[:-1] / total[-1] - self.bias)
        self.price_sum.zero_()
        self.price_batches.zero_()
