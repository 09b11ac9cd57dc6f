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
from moe.expert_shard import ExpertShard
from moe.experts import Experts
from moe.ffn import DenseFFN
from routing import RoutingPlan, build_router
from routing.losses import CollectiveError
from routing.router import TORCH_KERNELS, RouterKernels


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        moe = cfg.moe
        # layer: the block index of this layer in the model; hash routing seeds its table with it
        self.router = build_router(cfg.d_model, moe.num_experts, moe.router, vocab_size=cfg.vocab_size, layer=layer)
        self.experts = Experts(moe.num_experts, cfg.d_model, cfg.expert_hidden, cfg.activation, cfg.expert_glu, cfg.ffn_bias)
        self.dispatcher = moe.dispatcher  # as configured (auto, einsum, sorted, triton); resolved per device below
        # (configured, device, expert-parallel) -> (resolved, why, the router's kernels), cached per device
        self._resolved: Optional[tuple[tuple[str, torch.device, bool], tuple[str, str, RouterKernels]]] = None
        self.name = ""  # the module path, named in collective errors (set by distribute)
        # Shared experts see every token, so together they are one dense FFN of their summed width.
        self.shared = None
        self.shared_gate = None
        if moe.num_shared_experts:
            width = moe.shared_hidden or moe.num_shared_experts * cfg.expert_hidden
            self.shared = DenseFFN(cfg.d_model, width, cfg.activation, cfg.expert_glu, cfg.ffn_bias)
            if moe.shared_gate:
                self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False)

    def resolved_dispatcher(self, device: torch.device) -> tuple[str, str]:
        """(the dispatcher this layer runs on `device`, why); chosen once per device (and again when
        self.dispatcher changes)."""
        return self._resolve(device)[:2]

    def router_kernels(self, device: torch.device) -> RouterKernels:
        """The implementations the router runs on `device`, chosen with the dispatcher: when it is `triton`, the
        fused top-k gating and the device-side sort, so a dropless top-k layer runs without a host
        synchronisation; routing's own torch code otherwise."""
        return self._resolve(device)[2]

    def _resolve(self, device: torch.device) -> tuple[str, str, RouterKernels]:
        key = (self.dispatcher, device, self.experts.ep_size > 1)
        if self._resolved is None or self._resolved[0] != key:
            name, why = resolve_dispatcher(self.dispatcher, device, expert_parallel=key[2])
            kernels = TORCH_KERNELS
            if name == "triton":
                from moe.kernels.gating import fused_topk_gating  # imports triton
                from moe.kernels.sort import sort_impl

                kernels = RouterKernels(topk=fused_topk_gating, sort=sort_impl)
            self._resolved = (key, (name, why, kernels))
        return self._resolved[1]

    def distribute(self, name: str, batch_group=None, shard: Optional[ExpertShard] = None) -> None:
        """Prepares this layer for data x expert parallelism (moe.parallel.distribute calls it once per layer,
        before the optimizer is built). name: its module path, named in collective errors; batch_group: the
        data-parallel group its router's balancing statistics are summed over (None: this process's tokens);
        shard: this rank's experts (None: keep the bank as it is). A sharded layer runs the all-to-all."""
        self.name = name
        self.router.set_batch_group(batch_group)
        if shard is not None:
            self.experts = self.experts.sharded(shard)

    def forward(self, x: Tensor, token_ids: Optional[Tensor] = None) -> tuple[Tensor, RoutingPlan]:
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # [T, d]
        name, _, kernels = self._resolve(h.device)
        ids = token_ids.reshape(-1) if token_ids is not None else None
        try:
            plan = self.router(h, ids, seq_len=shape[-2] if len(shape) == 3 else None, kernels=kernels)
        except CollectiveError as e:  # data parallelism: the load-balancing all-reduce timed out or lost a peer
            raise collective_failure(self.name, self.experts, e.phase, e.counts, e.error) from e
        # Sharded experts (distribute) run behind the all-to-all, `sorted` or `triton` locally.
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
