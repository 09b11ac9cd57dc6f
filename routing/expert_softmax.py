"""The router's softmax over the expert axis, fast for few experts on CPU.

Shape legend: T tokens, E experts.

torch's CPU softmax vectorises along the softmax axis; a row shorter than one vector (E < 16 fp32 lanes with
AVX-512) falls to a scalar loop: at T = 2,048, E = 8 its forward costs 0.34 ms and its backward 0.12 ms, 5x and
3x the same arithmetic written as whole-tensor sweeps (max, subtract and exp, sum, divide; backward
p * (g - sum(p * g))), which is what `expert_softmax` runs there. From 16 experts on it is torch's softmax, bit for
bit. The sweeps round differently from torch's kernel (an ulp or so), so routers use this only where the
probabilities feed the balancing loss and the statistics, never for a combine weight that tests pin to
torch.softmax (routing.topk.topk_gating's softmax_topk order keeps torch.softmax).
"""
from __future__ import annotations

import torch
from torch import Tensor

TORCH_SOFTMAX_FROM = 16  # experts; below, torch's CPU softmax runs its scalar loop (one AVX-512 vector is 16 fp32)


def _sweeps(logits: Tensor) -> Tensor:
    """softmax over the last axis as whole-tensor sweeps (no autograd)."""
    probs = (logits - logits.amax(-1, keepdim=True)).exp_()
    return probs.div_(probs.sum(-1, keepdim=True))


class _SweepSoftmax(torch.autograd.Function):
    """softmax over the last axis as whole-tensor sweeps; backward p * (g - sum(p * g)) from the saved p."""

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:
        probs = _sweeps(logits)
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (probs,) = ctx.saved_tensors
        return probs * (grad - (probs * grad).sum(-1, keepdim=True))


def _torch_is_fast(logits: Tensor) -> bool:
    return logits.shape[-1] >= TORCH_SOFTMAX_FROM or logits.device.type != "cpu"


def expert_softmax(logits: Tensor) -> Tensor:
    """logits [T, E] fp32 -> probs [T, E], softmax over the experts (differentiable)."""
    return torch.softmax(logits, dim=-1) if _torch_is_fast(logits) else _SweepSoftmax.apply(logits)


def softmax_values(logits: Tensor) -> Tensor:
    """expert_softmax's values without a gradient: logits [T, E] -> probs [T, E] (routing.fused_gate)."""
    with torch.no_grad():
        return torch.softmax(logits, dim=-1) if _torch_is_fast(logits) else _sweeps(logits)
