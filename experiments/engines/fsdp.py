"""trainer=fsdp: FSDP2 (torch.distributed.fsdp.fully_shard) on a DeviceMesh, with expert parallelism.

    torchrun --nproc_per_node=N -m experiments.train trainer=fsdp [model.moe.expert_parallel=EP]
        [trainer.replicate=R] hydra.run.dir=DIR

The mesh (torchtitan's layout). W = R x S ranks: R replicas (HSDP; 1: plain FSDP) of S-way sharding; the expert-
parallel degree EP is borrowed from the shard dimension, which splits into S / EP x EP:

    mesh dims   ("replicate", "edp_shard", "ep") of sizes (R, S / EP, EP); rank = r * S + m * EP + e
    non-expert  fully_shard over ("replicate", "shard" = edp_shard x ep): every rank holds 1/S of each tensor
    experts     sharded over "ep" (moe.parallel: rank e of its block holds experts [e E/EP, (e+1) E/EP)), and that
                shard fully_shard-ed over ("replicate", "edp_shard"), the ranks holding the same experts

so expert-parallel blocks are consecutive ranks, as moe.parallel.make_groups makes them: the all-to-all dispatcher
runs unchanged. `fully_shard` wraps each bank of experts (inner, with its own mesh), each block, then the root; the
banks' forward methods (forward_sorted, forward_padded) are registered with FSDP so their weights are gathered
when the dispatcher calls them. The triton dispatcher reads expert weights outside those methods and is refused.

Gradients. FSDP averages a non-expert gradient over the W ranks: the global batch's gradient. An expert shard's
gradient already sums its expert-parallel block's tokens (the all-to-all's backward); FSDP's reduction over the
W / EP replicas averages (divides by W / EP); step() divides by EP more, so that it is the sum over the replicas
divided by W, the arithmetic of moe.parallel (FSDP's own divide factor needs PREMUL_SUM, which gloo lacks).
The global norm: every rank's sum of squares of its gradient shards, summed over the world and divided by R (each
shard is held by R replicas). Mixed precision on CUDA: bf16 parameters for compute, fp32 gradient reduction and
fp32 master weights (trainer.precision=auto or bf16); fp32 on CPU.

Checkpoints are sharded by default (moe.sharded_checkpoint): the weights and optimizer moments as DTensors of their
full-size shapes (expert tensors [E, ...] over ("replicate", "ep", "edp_shard")), each rank writing its pieces, so
a checkpoint written at one world size and EP loads at any other, and under trainer=single or ddp.
trainer.checkpoint_format=full gathers them into the plain single-file layout instead.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from experiments.engines import FullState, SavedState, ShardedSource, ShardedState, checked_model_config
from experiments.engines.ranks import TIMEOUT_KEY, Torchrun, check_batch, init_process_group, launch_env, resolve_device
from experiments.engines.full_size import autocast, use_bf16
from experiments.optim import build_optimizer, clipped_update
from moe import parallel
from moe.dispatch import resolve_dispatcher
from moe.compile import compile_blocks
from moe.experts import Experts
from moe.parallel import ParallelGroups
from moe.sharded_checkpoint import MOMENT, flat, read_into, tensor_shapes

HOW = ("torchrun --nproc_per_node=N -m experiments.train trainer=fsdp [model.moe.expert_parallel=EP] "
       "[trainer.replicate=R] ...")
EXPERT_METHODS = ("forward_sorted", "forward_padded")  # what the dispatchers call on a bank of experts


def check_mesh(world: int, replicate: int, ep: int, num_experts: int, is_moe: bool) -> int:
    """The mesh must factor the world: R divides W, EP divides S = W / R and E. Returns S."""
    if replicate < 1 or world % replicate:
        raise ValueError(f"trainer.replicate={replicate} does not divide the world size {world}: the mesh is "
                         f"replicate x shard = world (e.g. trainer.replicate=1 for plain FSDP)")
    shard = world // replicate
    if ep < 1 or shard % ep:
        raise ValueError(f"model.moe.expert_parallel={ep} does not divide the shard dimension {shard} "
                         f"(world {world} / trainer.replicate={replicate}): expert-parallel blocks are carved out "
                         f"of the ranks of one shard group")
    if is_moe or ep > 1:
        parallel.check_parallel(num_experts, ep, world)
    return shard


class FSDPEngine:
    skips_non_finite = True

    def __init__(self, ranks: Torchrun, mesh: DeviceMesh, bf16: bool, compile: bool = False):
        self.ranks, self.device, self.bf16 = ranks, ranks.device, bf16
        self.compile = compile  # torch.compile every block (moe.compile) before fully_shard wraps it
        self.autocast = autocast(self.device, bf16)
        R = mesh["replicate"].size()
        self.replicas = R
        # non-expert parameters: HSDP over (replicate, shard), or FSDP over the whole world
        self.dense_mesh = mesh["replicate", "shard"] if R > 1 else mesh["shard"]
        self.expert_mesh = mesh["replicate", "edp_shard"] if R > 1 else mesh["edp_shard"]
        # expert tensors in checkpoints: [E, ...] sharded over ep first, then over the FSDP shards of each block
        order = mesh.mesh.permute(0, 2, 1)  # (replicate, ep, edp_shard)
        self.expert_checkpoint_mesh = DeviceMesh(mesh.device_type, order,
                                                 mesh_dim_names=("replicate", "ep", "edp_shard"))
        self.model: nn.Module = None

    @classmethod
    def launch(cls, cfg) -> "FSDPEngine":
        """Checks the mesh, the experts and the dispatcher against torchrun's environment, then joins the process
        group and builds the mesh."""
        world, rank, local_rank = launch_env("fsdp", HOW)
        mcfg = checked_model_config(cfg)
        ep, R = cfg.model.moe.expert_parallel, cfg.trainer.replicate
        shard = check_mesh(world, R, ep, mcfg.moe.num_experts, mcfg.is_moe)
        check_batch(cfg.trainer.batch_size, world)
        if mcfg.is_moe:
            device = resolve_device(cfg.trainer.device)
            name, why = resolve_dispatcher(mcfg.moe.dispatcher, device, expert_parallel=ep > 1)
            if name == "triton":
                raise ValueError(f"trainer=fsdp cannot run the triton dispatcher ({why}): its kernels read the "
                                 f"expert weights outside the methods FSDP gathers them for; set "
                                 f"model.moe.dispatcher=sorted")
        device, timeout = init_process_group(cfg.trainer.device, local_rank, world, rank, cfg.trainer.collective_timeout_s)
        mesh = init_device_mesh(device.type, (R, shard // ep, ep), mesh_dim_names=("replicate", "edp_shard", "ep"))
        mesh["edp_shard", "ep"]._flatten("shard")
        experts_dp = mesh["replicate", "edp_shard"]._flatten("expert_replicas") if R > 1 else mesh["edp_shard"]
        groups = ParallelGroups(
            world_size=world, rank=rank, ep_size=ep, ep_rank=mesh["ep"].get_local_rank(),
            ep_group=mesh["ep"].get_group() if ep > 1 else None,
            expert_dp_group=experts_dp.get_group() if ep < world else None,
            world_group=dist.group.WORLD, timeout_s=timeout.total_seconds(), timeout_setting=TIMEOUT_KEY)
        return cls(Torchrun(groups, device), mesh, use_bf16(cfg.trainer.precision, device), cfg.trainer.compile)

    # ---------------------------------------------------------------- the model

    def wrap(self, model: nn.Module, optim) -> torch.optim.Optimizer:
        """Shards the experts over ep, then fully_shard: each bank of experts, each block, the root."""
        model = parallel.distribute(model.to(self.device), self.ranks.groups)
        if self.compile:  # before fully_shard (torchtitan's order): FSDP's hooks stay outside the compiled graphs
            line = compile_blocks(model)
            if self.ranks.is_main:
                print(line, flush=True)
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16
              else MixedPrecisionPolicy())
        for block in model.blocks:
            for bank in block.modules():
                if isinstance(bank, Experts):
                    fully_shard(bank, mesh=self.expert_mesh, mp_policy=mp)
                    for method in EXPERT_METHODS:
                        register_fsdp_forward_method(bank, method)
            fully_shard(block, mesh=self.dense_mesh, mp_policy=mp)
        fully_shard(model, mesh=self.dense_mesh, mp_policy=mp)
        self.model = model
        # The sharded parameters (the optimizer's) by state-dict key, taken now: between a forward and its backward
        # the module attributes are FSDP's unsharded copies. A tied lm_head is listed once, as embed.weight.
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        tied = model.cfg.tie_embeddings
        self._state = {k: params.get(k, buffers.get(k)) for k in model.state_dict()
                       if not (tied and k == "lm_head.weight")}
        # id(expert parameter) -> E of its bank: the full-size first dimension in checkpoints
        self._experts_of = {id(p): bank.num_global_experts for _, bank in parallel.expert_banks(model)
                            for p in bank.parameters()}
        return build_optimizer(model, optim, engine="fsdp")

    def forward(self, x: Tensor, y: Tensor):
        # bf16: FSDP gathers bf16 weights; autocast keeps the model's fp32 pieces (norms, rotary tables) from
        # meeting them uncast, as under the other engines
        with self.autocast():
            return self.model(x.to(self.device), y.to(self.device))

    def train_micro(self, x: Tensor, y: Tensor, scale: float, last: bool):
        self.model.set_requires_gradient_sync(last)  # accumulate unreduced until the step's last micro-batch
        out = self.forward(x, y)
        (out.total_loss * scale).backward()
        return out

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
        grads = [p.grad.to_local() for p in self.model.parameters() if p.grad is not None]
        ep = self.ranks.groups.ep_size
        if ep > 1:  # FSDP averaged the expert shards over their W / EP replicas; the global batch's gradient is / W
            torch._foreach_mul_([p.grad.to_local() for p in self.model.parameters()
                                 if p.grad is not None and id(p) in self._experts_of], 1.0 / ep)
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for g in grads:
            sq += g.float().square().sum()
        with parallel.named_collective("gradient norm", self.ranks.groups,
                                       "the sum of squares of every rank's gradient shards"):
            dist.all_reduce(sq)
        # clipping folded into the update (experiments.optim.clipped_update: torch's formula, the fused kernel's
        # grad_scale or one _foreach_mul_ of the local shards)
        return clipped_update(optimizer, (sq / self.replicas).sqrt(), max_norm)

    # ---------------------------------------------------------------- checkpoints

    def _expert_global(self, local: Tensor, num_experts: int) -> DTensor:
        """An expert tensor's local FSDP shard as a piece of its full-size [E, ...] tensor."""
        placements = (Replicate(), Shard(0), Shard(0))
        shape = torch.Size((num_experts, *local.shape[1:]))
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.expert_checkpoint_mesh, placements, shape=shape, stride=stride)

    def _global(self, p: Tensor, value: Tensor) -> Tensor:
        """value (p itself or a moment of p) as the DTensor of its full-size tensor, sharing p's local storage."""
        if id(p) in self._experts_of:
            return self._expert_global(value.to_local(), self._experts_of[id(p)])
        return value

    def _named_state(self) -> dict[str, Tensor]:
        """Parameters (as full-size DTensors) and buffers under their state-dict keys, a tied lm_head left out."""
        return {k: self._global(t, t) if isinstance(t, DTensor) else t for k, t in self._state.items()}

    def _moments(self, optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Tensor]]:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        return {i: {k: self._global(p, v) if isinstance(v, DTensor) else v for k, v in optimizer.state[p].items()}
                for i, p in enumerate(params) if p in optimizer.state}

    def state_to_save(self, optimizer: torch.optim.Optimizer, sharded: bool, step: int = 0) -> SavedState:
        weights, moments = self._named_state(), self._moments(optimizer)
        groups = optimizer.state_dict()["param_groups"]
        if sharded:
            return ShardedState(flat(weights, moments), groups)
        full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731 (an all-gather)
        return FullState({k: full(v).detach() for k, v in weights.items()},
                         {"state": {i: {k: full(v) for k, v in s.items()} for i, s in moments.items()},
                          "param_groups": groups})

    @torch.no_grad()
    def load_state(self, optimizer: torch.optim.Optimizer, state) -> None:
        """Weights and moments from a sharded checkpoint (each rank reads its own pieces: any world size and EP
        wrote it) or from full-size tensors (each rank keeps its pieces)."""
        targets = self._named_state()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if isinstance(state, ShardedSource):
            saved = {int(k.split("/")[1]) for k in tensor_shapes(state.folder) if k.startswith(MOMENT)}
        else:
            saved = set(state.optimizer["state"])
        # AdamW's state for every parameter the checkpoint has state for (a parameter that never had a gradient has
        # none, as in a fresh AdamW), created as its first step would, then overwritten
        moments = {i: {"step": torch.zeros((), dtype=torch.float32), "exp_avg": torch.zeros_like(p),
                       "exp_avg_sq": torch.zeros_like(p)} for i, p in enumerate(params) if i in saved}
        views = {i: {k: self._global(params[i], v) if isinstance(v, DTensor) else v for k, v in m.items()}
                 for i, m in moments.items()}  # the same storage, as pieces of full-size tensors
        if isinstance(state, ShardedSource):
            read_into(state.folder, flat(targets, views))
            groups = state.param_groups
        else:
            for key, target in targets.items():
                _copy_piece(target, state.weights[key])
            for i, m in views.items():
                for k, v in m.items():
                    _copy_piece(v, state.optimizer["state"][i][k])
            groups = state.optimizer["param_groups"]
        optimizer.load_state_dict({"state": moments, "param_groups": groups})

    def close(self) -> None:
        self.ranks.close()


def _copy_piece(target: Tensor, full: Tensor) -> None:
    """Copies this rank's piece of the full-size tensor into target (a DTensor's local shard, or a whole tensor)."""
    if isinstance(target, DTensor):
        piece = distribute_tensor(full.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(piece.to_local())
    else:
        target.copy_(full)
