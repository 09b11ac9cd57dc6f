"""trainer=ddp: torch's DistributedDataParallel for the non-expert weights, expert parallelism for the experts.

    torchrun --nproc_per_node=N -m experiments.train trainer=ddp model.moe.expert_parallel=EP hydra.run.dir=DIR

Every rank holds every non-expert parameter; DDP all-reduces their gradients in buckets while the backward still
runs (communication overlaps compute) and averages them over the world. Expert parameters are left out of DDP
(their replicas are the ranks holding the same expert shard, not the world): after the last micro-batch's backward
their gradients are summed over that expert-data-parallel group and divided by the world size (moe.parallel has
why this equals the single process's gradient), then the global norm counts each expert shard once.
Accumulation: every micro-batch but the last runs under DDP's no_sync, so gradients are reduced once per step.

The model is built and initialised at full size under the run's seed on every rank, then its experts are sharded
(moe.parallel.distribute): the same initialisation as one process. Checkpoints are full-size (rank 0 writes).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from experiments.engines import SavedState, checked_model_config
from experiments.engines.full_size import as_full, autocast, full_state, load_full, use_bf16
from experiments.engines.ranks import TIMEOUT_KEY, Torchrun, check_batch, init_process_group, launch_env
from experiments.optim import build_optimizer, clipped_update
from moe import parallel
from moe.compile import compile_blocks

HOW = "torchrun --nproc_per_node=N -m experiments.train trainer=ddp model.moe.expert_parallel=N ..."


class DDPEngine:
    skips_non_finite = True

    def __init__(self, ranks: Torchrun, bf16: bool, compile: bool = False):
        self.ranks, self.device = ranks, ranks.device
        self.compile = compile  # torch.compile every block (moe.compile) before DDP wraps the model
        self.autocast = autocast(self.device, bf16)
        self.model: nn.Module = None  # the Transformer (expert-sharded)
        self.ddp: DistributedDataParallel = None  # what forward calls

    @classmethod
    def launch(cls, cfg) -> "DDPEngine":
        """Checks the settings against torchrun's environment, then joins the process group."""
        world, rank, local_rank = launch_env("ddp", HOW)
        mcfg = checked_model_config(cfg)
        ep = cfg.model.moe.expert_parallel
        if mcfg.is_moe or ep > 1:
            parallel.check_parallel(mcfg.moe.num_experts, ep, world)
        check_batch(cfg.trainer.batch_size, world)
        device, timeout = init_process_group(cfg.trainer.device, local_rank, world, rank, cfg.trainer.collective_timeout_s)
        groups = parallel.make_groups(ep, mcfg.moe.num_experts, timeout=timeout, timeout_setting=TIMEOUT_KEY)
        return cls(Torchrun(groups, device), use_bf16(cfg.trainer.precision, device), cfg.trainer.compile)

    def wrap(self, model: nn.Module, optim) -> torch.optim.Optimizer:
        self.model = parallel.distribute(model.to(self.device), self.ranks.groups)
        if self.compile:  # the blocks, not the DDP wrapper: DDP's bucketed all-reduce stays outside the graphs
            line = compile_blocks(self.model)
            if self.ranks.is_main:
                print(line, flush=True)
        experts = [name for name, p in self.model.named_parameters() if parallel.is_expert(p)]
        # DDP's documented hook for parameters it must not reduce: the experts are reduced over their replicas only
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, experts)
        # broadcast_buffers off: every rank builds identical buffers and updates them from global statistics
        self.ddp = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                           else None, broadcast_buffers=False,
                                           process_group=self.ranks.groups.world_group)
        return build_optimizer(self.model, optim, engine="ddp")

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        with self.autocast():
            return self.ddp(x.to(self.device), y.to(self.device))

    def train_micro(self, x: torch.Tensor, y: torch.Tensor, scale: float, last: bool):
        with contextlib.nullcontext() if last else self.ddp.no_sync():
            out = self.forward(x, y)
            # the last micro-batch's backward all-reduces DDP's buckets: a rank that never joins is named here
            with (parallel.named_collective("gradient reduction", self.ranks.groups, self._buckets) if last
                  else contextlib.nullcontext()):
                (out.total_loss * scale).backward()
        return out

    def _buckets(self) -> str:
        W = self.ranks.world_size
        return f"DDP's gradient buckets of the non-expert parameters, all-reduced over all {W} ranks during the backward"

    def step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
        """Expert gradients summed over their replicas (DDP reduced the rest during the backward), the global norm
        over the shards, clipping, and the update unless the norm is not finite (the same on every rank)."""
        params = list(self.model.parameters())
        g = self.ranks.groups
        experts = [p for p in params if parallel.is_expert(p) and p.requires_grad]
        for p in experts:
            if p.grad is None:  # an expert no token reached on this rank: it still takes part in the reduction
                p.grad = torch.zeros_like(p)
        if experts:
            parallel.reduce_expert_gradients(experts, g, names=self.model.named_parameters)
        for p in params:  # a dense parameter no token reached (DDP leaves its gradient None on every rank alike)
            if p.requires_grad and p.grad is None and not parallel.is_expert(p):
                p.grad = torch.zeros_like(p)
        # the norm over the shards; clipping folded into the update (experiments.optim.clipped_update)
        return clipped_update(optimizer, parallel.global_grad_norm(params, g), max_norm)

    def state_to_save(self, optimizer: torch.optim.Optimizer, sharded: bool, step: int = 0) -> SavedState:
        return full_state(self.model, optimizer)  # gathers the expert shards: every rank calls it

    def load_state(self, optimizer: torch.optim.Optimizer, state) -> None:
        load_full(self.model, optimizer, as_full(state, self.model))

    def close(self) -> None:
        self.ranks.close()
