"""The sparse FFN slot: plan = router(x); y = dispatcher(x, plan, experts) (+ shared experts).

Shape legend: B batch, S sequence, T = B*S tokens, d model width.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from moe.config import ModelConfig
from moe.dispatch import DISPATCHERS, alltoall_dispatch
from moe.dispatch.alltoall import collective_failure
from moe.experts import Experts
from moe.ffn import DenseFFN
from routing import RoutingPlan, build_router
from routing.losses import CollectiveError


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = cfg.moe
        self.router = build_router(cfg.d_model, moe.num_experts, moe.router, vocab_size=cfg.vocab_size)
        self.experts = Experts(moe.num_experts, cfg.d_model, cfg.expert_hidden, cfg.activation, cfg.expert_glu, cfg.ffn_bias)
        self.dispatcher = moe.dispatcher
        # Shared experts see every token, so together they are one dense FFN of their summed width.
        self.shared = None
        self.shared_gate = None
        if moe.num_shared_experts:
            width = moe.shared_hidden or moe.num_shared_experts * cfg.expert_hidden
            self.shared = DenseFFN(cfg.d_model, width, cfg.activation, cfg.expert_glu, cfg.ffn_bias)
            if moe.shared_gate:
                self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False)

    def forward(self, x: Tensor, token_ids: Optional[Tensor] = None) -> tuple[Tensor, RoutingPlan]:
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # [T, d]
        ids = token_ids.reshape(-1) if token_ids is not None else None
        try:
            plan = self.router(h, ids, seq_len=shape[-2] if len(shape) == 3 else None)
        except CollectiveError as e:  # data parallelism: the load-balancing all-reduce timed out or lost a peer
            raise collective_failure(self.experts, e.phase, e.counts, e.error) from e
        # Sharded experts (moe.parallel.shard_experts) run behind the all-to-all, which uses `sorted` locally.
        if self.experts.ep_size > 1:
            y = alltoall_dispatch(h, plan, self.experts)
        else:
            y = DISPATCHERS[self.dispatcher](h, plan, self.experts)
        if self.shared is not None:
            s = self.shared(h)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(h)) * s
            y = y + s
        return y.reshape(shape), plan
