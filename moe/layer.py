"""The sparse FFN slot: plan = router(x); y = dispatcher(x, plan, experts).

Shape legend: B batch, S sequence, T = B*S tokens, d model width.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from moe.config import ModelConfig
from moe.dispatch import DISPATCHERS
from moe.experts import Experts
from routing import RoutingPlan, build_router


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = cfg.moe
        self.router = build_router(cfg.d_model, moe.num_experts, moe.router)
        self.experts = Experts(moe.num_experts, cfg.d_model, cfg.expert_hidden, cfg.activation, cfg.expert_glu, cfg.ffn_bias)
        self.dispatcher = moe.dispatcher

    def forward(self, x: Tensor, token_ids: Optional[Tensor] = None) -> tuple[Tensor, RoutingPlan]:
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # [T, d]
        ids = token_ids.reshape(-1) if token_ids is not None else None
        plan = self.router(h, ids)
        y = DISPATCHERS[self.dispatcher](h, plan, self.experts)
        return y.reshape(shape), plan
