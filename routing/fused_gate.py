"""The greedy top-k router's gate in one autograd node: combine weights, balancing loss and z-loss from the
logits, with one backward pass over [T, E].

Shape legend: T tokens, E experts, k choices per token.

Composed of torch ops, the gate's backward makes about ten passes over [T, E]: the gather of the chosen logits and
of the top probability each scatter into a fresh zero [T, E], the balancing loss's mean broadcasts its gradient to
[T, E] before the softmax backward reads it with the probabilities, the z-loss's logsumexp recomputes its
exponentials, and three [T, E] gradients are summed. All of it is

    d/d logits = p * (c + (z_t - p_t . c)) + scatter(chosen columns, w * (g_w - w . g_w))

with c [E] = g_lb * coef * E * f / T (the balancing loss: f the expert fractions, P = mean_t p), z_t [T] =
g_z * coef * 2 * lse_t / T (the z-loss, d lse / d logits = p) and w [T, k] the combine weights (softmax over the
chosen logits, model.moe.router.order=topk_softmax): a matrix-vector product, one broadcast add, one multiply and
a scatter of k columns. The forward values are those of routing.topk's composed path (the weights bit for bit;
the losses from the same probabilities in the same order); the gradient is its formula, equal to autograd's to
fp32 rounding (tests/routing/test_fused_gate.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from routing.expert_softmax import softmax_values


@dataclass
class GateOutputs:
    weight: Tensor  # [T, k] combine weights of the chosen experts, differentiable
    probs: Tensor  # [T, E] router probabilities, no gradient (statistics)
    load_balancing_loss: Optional[Tensor]  # scalar, scaled by its coefficient; None when the coefficient is 0
    router_z_loss: Optional[Tensor]  # scalar, scaled; None when the coefficient is 0
    entropy: Tensor  # [T] router entropy of each token, no gradient (statistics)
    top1_prob: Tensor  # [T] each token's largest probability, no gradient (statistics)


def fused_gate(logits: Tensor, expert_idx: Tensor, fractions: Optional[Tensor], lb_coef: float,
               z_coef: float) -> GateOutputs:
    """logits [T, E] fp32 (differentiable); expert_idx [T, k] the greedy top-k of the logits, best first;
    fractions [E] the balancing loss's f (routing.losses.expert_fractions; None when lb_coef is 0)."""
    weight, lb, z, probs, lse, p_top = _FusedGate.apply(logits, expert_idx, fractions, lb_coef, z_coef)
    with torch.no_grad():
        entropy = lse - (probs * logits.detach()).sum(-1)  # -sum p log p = lse - sum p * logit (finite logits)
    return GateOutputs(weight, probs, lb if lb_coef > 0 else None, z if z_coef > 0 else None, entropy, p_top)


class _FusedGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, expert_idx: Tensor, fractions: Optional[Tensor], lb_coef: float,
                z_coef: float):
        T, E = logits.shape
        probs = softmax_values(logits)  # [T, E]
        chosen = logits.gather(1, expert_idx)  # [T, k], best first
        weight = torch.softmax(chosen, dim=-1)  # as topk_gating's topk_softmax, bit for bit
        p_top = probs.gather(1, expert_idx[:, :1]).squeeze(1)  # [T]: the largest probability (>= 1/E)
        lse = chosen[:, 0] - p_top.log()  # logsumexp: p_top = exp(l_top - lse)
        # a switched-off loss is a zero that the caller drops (one output tensor each: autograd wants them distinct)
        lb = lb_coef * (E * torch.sum(fractions * probs.mean(dim=0))) if lb_coef > 0 else logits.new_zeros(())
        z = z_coef * lse.square().mean() if z_coef > 0 else logits.new_zeros(())
        ctx.save_for_backward(probs, weight, expert_idx, fractions if lb_coef > 0 else None, lse)
        ctx.coefs = (lb_coef, z_coef)
        ctx.mark_non_differentiable(probs, lse, p_top)
        return weight, lb, z, probs, lse, p_top

    @staticmethod
    def backward(ctx, g_weight, g_lb, g_z, *_):
        probs, weight, expert_idx, fractions, lse = ctx.saved_tensors
        lb_coef, z_coef = ctx.coefs
        T, E = probs.shape
        per_token = probs.new_zeros(T)  # z_t - p_t . c
        c = None
        if lb_coef > 0 and g_lb is not None:
            c = fractions * (g_lb * (lb_coef * E / max(T, 1)))  # [E]
            per_token -= probs @ c
        if z_coef > 0 and g_z is not None:
            per_token += lse * (g_z * (2.0 * z_coef / max(T, 1)))
        # [T, E]: one fresh tensor, written once and scaled in place
        grad = per_token[:, None] + c if c is not None else per_token[:, None].expand(T, E).clone()
        grad.mul_(probs)
        if g_weight is not None:
            g_chosen = weight * (g_weight - (weight * g_weight).sum(-1, keepdim=True))  # softmax backward, [T, k]
            grad.scatter_add_(1, expert_idx, g_chosen)
        return grad, None, None, None, None
