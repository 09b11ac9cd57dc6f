"""Token-choice top-k routing: each token picks its k best experts (Switch k=1, GShard/Mixtral k=2).

Shape legend: T tokens, d model width, E experts, k choices per token, N surviving assignments.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routing.capacity import assign, expert_capacity
from routing.config import RouterConfig
from routing.losses import load_balancing_loss, router_z_loss
from routing.plan import RoutingPlan
from routing.stats import routing_stats


def topk_gating(logits: Tensor, top_k: int, order: str, renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """logits [T, E] fp32 -> (probs [T, E], weight [T, k], expert_idx [T, k])."""
    probs = torch.softmax(logits, dim=-1)
    if order == "topk_softmax":
        top_logits, expert_idx = logits.topk(top_k, dim=-1)
        weight = torch.softmax(top_logits, dim=-1)
    else:
        weight, expert_idx = probs.topk(top_k, dim=-1)
        if renormalize:
            weight = weight / weight.sum(dim=-1, keepdim=True)
    return probs, weight, expert_idx


class TopKRouter(nn.Module):
    """A linear gate in fp32 followed by top-k selection, capacity and the Switch and z losses."""

    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig):
        super().__init__()
        cfg.check_experts(num_experts)
        self.cfg = cfg
        self.num_experts = num_experts
        # Kept in fp32 even when the model is cast to bf16: routing decisions are sensitive to rounding.
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not lower the router's precision: a cast to a lower float dtype is replaced by
        # the same move in fp32 from the original tensor (casting down and back up would round the weights).
        def keep_fp32(t):
            out = fn(t)
            if t.is_floating_point() and out.is_floating_point() and out.dtype != torch.float32:
                return t.to(device=out.device, dtype=torch.float32)
            return out

        return super()._apply(keep_fp32, recurse)

    def forward(self, x: Tensor, token_ids: Optional[Tensor] = None) -> RoutingPlan:
        cfg = self.cfg
        T = x.shape[0]
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = x.float()  # [T, d]
            if self.training and cfg.jitter > 0:
                h = h * torch.empty_like(h).uniform_(1.0 - cfg.jitter, 1.0 + cfg.jitter)
            logits = F.linear(h, self.gate.weight.float())  # [T, E]
            probs, weight, expert_idx = topk_gating(logits, cfg.top_k, cfg.order, cfg.renormalize)
            weight = weight * cfg.scale
            cf = cfg.capacity_factor
            if not self.training and cfg.eval_capacity_factor is not None:
                cf = cfg.eval_capacity_factor
            capacity = expert_capacity(T, self.num_experts, cfg.top_k, cf, cfg.min_capacity)
            token_index, expert_index, row_weight, counts, kept = assign(
                expert_idx, weight, self.num_experts, capacity, cfg.drop_policy
            )
            aux = {}
            if cfg.aux_loss_coef > 0:
                aux["load_balancing_loss"] = cfg.aux_loss_coef * load_balancing_loss(probs, expert_idx, self.num_experts)
            if cfg.z_loss_coef > 0:
                aux["router_z_loss"] = cfg.z_loss_coef * router_z_loss(logits)
        return RoutingPlan(
            token_index=token_index,
            expert_index=expert_index,
            weight=row_weight,
            counts=counts,
            num_tokens=T,
            capacity=capacity if cf > 0 else None,
            aux_losses=aux,
            stats=routing_stats(probs.detach(), counts, kept),
        )
