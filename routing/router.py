"""What every router shares: an fp32 linear gate, Switch jitter, and the RoutingPlan it must return.

Shape legend: T tokens, d model width, E experts, S sequence length (T = B * S).
Subclasses implement `route(x, logits, token_ids, seq_len, kernels) -> RoutingPlan`; routers with state that changes
between optimizer steps (bias balancing) override `after_optimizer_step`. A forward may run twice for one batch
(activation checkpointing replays it in the backward): a side effect on state, such as counting tokens for that
update, is skipped while routing.recompute.recomputing() is true.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routing.config import RouterConfig
from routing.plan import RoutingPlan


@dataclass(frozen=True)
class RouterKernels:
    """Implementations a router may run instead of this package's torch code (routing imports only torch). The
    layer that owns the router chooses them once for its device (moe.layer.MoELayer: the fused Triton gating and
    device-side sort when its dispatcher resolves to `triton`) and passes them to every forward; a router that
    has no use for one ignores it. None: routing's own code."""

    # topk(logits [T, E], top_k, order, renormalize) -> (probs [T, E], weight [T, k], expert_idx [T, k]), the
    # contract of routing.topk.topk_gating
    topk: Optional[Callable] = None
    # sort(expert_idx [T, k], E) -> a tuple whose first four items are order [A], token_index [A], expert_index [A],
    # counts [E]: the dropless rows of routing.capacity.assign (choice-major, stable by expert)
    sort: Optional[Callable] = None


TORCH_KERNELS = RouterKernels()  # routing's own torch code everywhere


class Router(nn.Module):
    needs_gate = True  # False for routers that never look at the hidden state (hash routing)
    per_layer = False  # True for routers built with their block's index (`layer=`), hash routing's per-layer table

    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig, vocab_size: Optional[int] = None):
        super().__init__()
        cfg.check_experts(num_experts)
        self.cfg = cfg
        self.num_experts = num_experts
        # Kept in fp32 even when the model is cast to bf16: routing decisions are sensitive to rounding.
        self.gate = nn.Linear(d_model, num_experts, bias=False) if self.needs_gate else None
        # Data parallelism: the process group the global batch is spread over (set_batch_group). None: this
        # process's tokens only.
        self.batch_group = None

    def set_batch_group(self, group) -> None:
        """Makes the balancing statistics global: the load-balancing loss counts its expert fractions over `group`
        (and bias balancing sums its loads over it), so that the loss and its gradients equal those of one
        process holding the global batch. Called once, before training, by the layer that owns this router
        (moe.layer.MoELayer.distribute); None: back to this process's tokens."""
        self.batch_group = group

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not lower the router's precision: a cast to a lower float dtype is replaced by
        # the same move in fp32 from the original tensor (casting down and back up would round the weights).
        def keep_fp32(t):
            out = fn(t)
            if t.is_floating_point() and out.is_floating_point() and out.dtype != torch.float32:
                return t.to(device=out.device, dtype=torch.float32)
            return out

        return super()._apply(keep_fp32, recurse)

    def logits(self, x: Tensor) -> Tensor:
        """x [T, d] in any dtype -> router logits [T, E] in fp32, with jitter on the input in training."""
        h = x.float()
        if self.training and self.cfg.jitter > 0:
            h = h * torch.empty_like(h).uniform_(1.0 - self.cfg.jitter, 1.0 + self.cfg.jitter)
        return F.linear(h, self.gate.weight.float())

    def forward(self, x: Tensor, token_ids: Optional[Tensor] = None, seq_len: Optional[int] = None,
                kernels: RouterKernels = TORCH_KERNELS) -> RoutingPlan:
        """x [T, d]; token_ids [T] (hash routing needs them); seq_len S of the sequences x was flattened from;
        kernels: the implementations to run (RouterKernels)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = self.logits(x) if self.gate is not None else None
            return self.route(x, logits, token_ids, seq_len or x.shape[0], kernels)

    def route(self, x: Tensor, logits: Optional[Tensor], token_ids: Optional[Tensor], seq_len: int,
              kernels: RouterKernels = TORCH_KERNELS) -> RoutingPlan:
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Called by the trainer after each optimizer step; most routers have nothing to update."""
