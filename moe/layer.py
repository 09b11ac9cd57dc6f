"""The sparse FFN slot: plan = router(x); y = dispatcher(x, plan, experts) (+ shared experts).

Shape legend: B batch, S sequence, T = B*S tokens, d model width.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from moe.config import ModelConfig
from moe.dispatch import alltoall_dispatch, dispatch_fn, resolve_dispatcher
from moe.dispatch.alltoall import collective_failure
from moe.experts import Experts
from moe.ffn import DenseFFN
from routing import RoutingPlan, build_router
from routing.losses import CollectiveError


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        moe = cfg.moe
        # layer: the block index of this layer in the model; hash routing seeds its table with it
        self.router = build_router(cfg.d_model, moe.num_experts, moe.router, vocab_size=cfg.vocab_size, layer=layer)
        self.experts = Experts(moe.num_experts, cfg.d_model, cfg.expert_hidden, cfg.activation, cfg.expert_glu, cfg.ffn_bias)
        self.dispatcher = moe.dispatcher  # as configured (auto, einsum, sorted, triton); resolved per device below
        self._resolved: Optional[tuple[str, torch.device, str, str]] = None  # (configured, device, resolved, why)
        # Shared experts see every token, so together they are one dense FFN of their summed width.
        self.shared = None
        self.shared_gate = None
        if moe.num_shared_experts:
            width = moe.shared_hidden or moe.num_shared_experts * cfg.expert_hidden
            self.shared = DenseFFN(cfg.d_model, width, cfg.activation, cfg.expert_glu, cfg.ffn_bias)
            if moe.shared_gate:
                self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False)

    def resolved_dispatcher(self, device: torch.device) -> tuple[str, str]:
        """(the dispatcher this layer runs on `device`, why); cached until the device or self.dispatcher changes.

        When it is `triton`, the router also takes the fused top-k gating and the device-side sort (its topk_impl
        and sort_impl hooks), so a dropless top-k layer runs without a host synchronisation."""
        if self._resolved is None or self._resolved[:2] != (self.dispatcher, device):
            name, why = resolve_dispatcher(self.dispatcher, device, expert_parallel=self.experts.ep_size > 1)
            self._resolved = (self.dispatcher, device, name, why)
            if name == "triton":
                from moe.kernels.gating import fused_topk_gating  # imports triton
                from moe.kernels.sort import sort_impl

                self.router.topk_impl, self.router.sort_impl = fused_topk_gating, sort_impl
            else:  # back to the class defaults: routing's own torch code
                self.router.__dict__.pop("topk_impl", None)
                self.router.__dict__.pop("sort_impl", None)
        return self._resolved[2], self._resolved[3]

    def forward(self, x: Tensor, token_ids: Optional[Tensor] = None) -> tuple[Tensor, RoutingPlan]:
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # [T, d]
        name, _ = self.resolved_dispatcher(h.device)  # before routing: it may install fused kernels in the router
        ids = token_ids.reshape(-1) if token_ids is not None else None
        try:
            plan = self.router(h, ids, seq_len=shape[-2] if len(shape) == 3 else None)
        except CollectiveError as e:  # data parallelism: the load-balancing all-reduce timed out or lost a peer
            raise collective_failure(self.experts, e.phase, e.counts, e.error) from e
        # Sharded experts (moe.parallel.shard_experts) run behind the all-to-all, `sorted` or `triton` locally.
        if self.experts.ep_size > 1:
            y = alltoall_dispatch(h, plan, self.experts, local_dispatcher=name)
        else:
            y = dispatch_fn(name)(h, plan, self.experts)
        if self.shared is not None:
            s = self.shared(h)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(h)) * s
            y = y + s
        return y.reshape(shape), plan
