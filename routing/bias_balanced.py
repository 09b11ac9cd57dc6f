"""Auxiliary-loss-free load balancing: a per-expert bias steers selection, never the combine weights.

Shape legend: T tokens, d model width, E experts, k choices per token, N surviving assignments, C capacity.

DeepSeek-V3 (DeepSeek-AI, Liu et al. 2024, "DeepSeek-V3 Technical Report", Sec. 2.1.2; the method is Wang et al.
2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts"):

    s = sigmoid(logits)                      (model.moe.router.score_fn; "softmax" gives DeepSeek-V2's scores)
    chosen = top-k of (s + b)                b [E]: a bias that only decides who is chosen
    weight = s[chosen] / sum(s[chosen]) * scale

and after every optimizer step  b_e += u * sign(mean load - load_e)  (u = model.moe.router.bias_update_rate): overloaded
experts become less attractive, idle ones more, without a loss term that fights the language-model gradient.

- `bias` is a persistent fp32 buffer: it is saved in checkpoints and restored with them, it has no gradient, and
  the Router base class keeps it in fp32 when the model is cast to bf16 (a 1e-3 step vanishes in bf16).
- The load is the selection count before capacity (the demand the bias controls), summed over the training
  forwards since the last optimizer step (so over gradient-accumulation micro-batches) in a non-persistent buffer.
  Like Megatron-core, nothing is counted in eval mode or without autograd (evaluation, reentrant recomputation),
  nor in the replay of a non-reentrant activation checkpoint, which runs with autograd on (routing.recompute):
  a checkpointed layer would otherwise count its tokens twice.
  Under data parallelism (Router.set_batch_group, from moe.parallel.distribute) the counts are summed over the
  group before the update, so every replica moves its bias identically.
- k > 1: the weights are normalised over the k choices (DeepSeek-V3's norm_topk_prob). k = 1: the single score is
  used as is, since a normalised single weight is the constant 1 and would cut the gate off from the LM loss.
- No sequence-wise balance loss (DeepSeek-V3's complementary loss with a tiny alpha) and no group-limited routing.
  The Switch loss applies only when model.moe.router.aux_loss_coef > 0 (conf/routing/bias_balanced.yaml sets 0), on the
  scores normalised to a distribution over experts, as are the routing statistics.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from routing.capacity import choice_plan, expert_capacity
from routing.config import RouterConfig
from routing.counts import count_ids
from routing.generation import routing_capacity_factor
from routing.plan import RoutingPlan
from routing.recompute import recomputing
from routing.router import TORCH_KERNELS, Router, RouterKernels
from routing.topk import select_topk, standard_losses


class BiasBalancedRouter(Router):
    """Top-k of (scores + bias) for selection, unbiased normalised scores for the weights, bias updated per step."""

    bias: Tensor  # [E] fp32, persistent
    load: Tensor  # [E] fp32, non-persistent: selections counted since the last optimizer step

    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig, vocab_size: Optional[int] = None):
        super().__init__(d_model, num_experts, cfg, vocab_size)
        self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("load", torch.zeros(num_experts, dtype=torch.float32), persistent=False)

    def scores(self, logits: Tensor) -> Tensor:
        """[T, E] fp32 affinities in (0, 1): sigmoid per expert (DeepSeek-V3) or softmax over experts."""
        return torch.sigmoid(logits) if self.cfg.score_fn == "sigmoid" else torch.softmax(logits, dim=-1)

    def route(self, x: Tensor, logits: Tensor, token_ids: Optional[Tensor], seq_len: int,
              kernels: RouterKernels = TORCH_KERNELS) -> RoutingPlan:
        cfg = self.cfg
        T, E = logits.shape
        scores = self.scores(logits)  # [T, E], differentiable
        # The bias only ranks: selection is not differentiable anyway, and the weights below never see the bias.
        expert_idx = select_topk(scores.detach() + self.bias, cfg.top_k)  # [T, k]
        weight = scores.gather(1, expert_idx)  # [T, k], unbiased
        if cfg.top_k > 1:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        weight = weight * cfg.scale
        if self.training and torch.is_grad_enabled() and not recomputing():  # the replay saw these tokens already
            with torch.no_grad():
                self.load += count_ids(expert_idx, E).float()
        cf = routing_capacity_factor(cfg, self.training)  # 0 while generating: each new token routes dropless
        capacity = expert_capacity(T, E, cfg.top_k, cf, cfg.min_capacity)
        probs = scores / scores.sum(dim=-1, keepdim=True)  # a distribution over experts (softmax: unchanged)
        aux = standard_losses(cfg, logits, probs, expert_idx, group=self.batch_group)
        return choice_plan(expert_idx, weight, probs, E, capacity, cf > 0, cfg.drop_policy, aux,
                           renormalize_after_drop=cfg.renormalize_after_drop)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """b += u * sign(mean load - load) from the loads counted since the last step, then reset the count."""
        load = self.load.clone()
        if self.batch_group is not None:  # data parallel (moe.parallel.distribute): one bias for all replicas
            dist.all_reduce(load, group=self.batch_group)
        # Nothing counted (an eval-only stretch) leaves the bias alone by itself: sign(0 - 0) = 0. So no test is
        # needed here, and none reads the load on the host (a synchronisation per step on a GPU).
        self.bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.load.zero_()
