"""trainer=deepspeed: the DeepSpeed engine behind the Engine protocol (experiments.engines).

    torchrun --nproc_per_node=N -m experiments.train trainer=deepspeed [deepspeed=zero0|zero1|zero2] hydra.run.dir=DIR
    deepspeed --no_local_rank --num_gpus=N --module experiments.train trainer=deepspeed hydra.run.dir=DIR

Everything that makes trainer=ddp equal to trainer=single holds here too (experiments.engines.ddp): every rank draws
the global batch and keeps rows rank::N, the model is built at full size under the run's seed and its experts are
sharded (model.moe.expert_parallel), the load-balancing loss is global, only rank 0 writes, and checkpoints are our
plain full-size directories. What DeepSpeed does instead of moe.parallel: the gradient reduction (ZeRO 0: an
all-reduce after the backward; ZeRO 1: a reduction into each rank's partition; ZeRO 2: bucketed during the backward),
the partitioning of optimizer state (and gradients) and the all-gather of the updated weights.

How the engine learns that the model has experts. DeepSpeed recognises MoE models only through its own
`deepspeed.moe.layer.MoE` class: `engine.has_moe_layers` decides whether gradients of parameters tagged
`allreduce=False` are reduced over their expert-data-parallel group (`group_name` -> deepspeed.utils.groups) instead
of the world, whether ZeRO partitions the expert parameter groups over that group, and how the global gradient norm
counts the expert shards. Our layers are not DeepSpeed's, so:
- the process groups are DeepSpeed's own (`groups._create_expert_and_data_parallel(ep)`, the same layout as
  moe.parallel: expert-parallel blocks of consecutive ranks, expert-data-parallel groups strided by ep), checked
  against moe.parallel's layout and handed to our layers (all-to-all, global balancing loss) as ParallelGroups;
- the engine wraps a small module (`EngineModule`) holding the Transformer and a parameter-less `MoE` subclass that
  only announces the experts (num_experts, ep_size, group name): the engine sets has_moe_layers, registers the
  expert groups and builds ZeRO's MoE partitions, without a second MoE implementation in the model;
- the optimizer is our AdamW (experiments.optim: same param groups, decay only on matrices) with its groups split by
  `deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer` (expert parameters in groups marked
  moe=True, named by group_name), passed as a client optimizer; the learning rate is set by the Trainer from the
  same schedule (experiments.optim.lr_at), so no DeepSpeed scheduler is involved.
DeepSpeed's expert reduction averages over the world size (sum over the expert-data-parallel replicas / W), as
moe.parallel.reduce_gradients does, so gradients equal the single process's. The global norm: ZeRO 1/2 compute it
exactly (every partition counted once over the world); ZeRO 0's fp32 path averages per-rank norms, which is wrong
with expert parallelism, so at ZeRO 0 DeepSpeed's clipping is off and a step pre-hook on the optimizer clips with
moe.parallel.clip_grad_norm (the trainer=ddp arithmetic) after DeepSpeed's reduction.

Gradient accumulation: DeepSpeed's `managed_gradient_accumulation=false`, the Trainer owns the boundary: it calls
backward on each micro-batch's loss (already divided by trainer.grad_accum) and `engine.step()` once per step.

Checkpoints are ours (moe.checkpoint): full-size weights and the optimizer state in trainer=single's layout (ZeRO
partitions gathered with deepspeed.utils.safe_get_full_optimizer_state), so a deepspeed run resumes under any
trainer and vice versa. `deepspeed.engine_checkpoint=true` also writes DeepSpeed's own checkpoint; see
experiments.convert_deepspeed for reading one.
"""
from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from experiments.engines import FullState, SavedState, checked_model_config
from experiments.engines.full_size import (as_full, autocast, full_optimizer_state, load_full_optimizer_state,
                                           use_bf16)
from experiments.engines.ranks import TIMEOUT_KEY, Torchrun, check_batch, init_process_group, launch_env, resolve_device
from experiments.optim import build_optimizer
from moe import parallel
from moe.checkpoint import model_state
from moe.parallel import ParallelGroups

INSTALL = "pip install -e '.[deepspeed]'"
ENGINE_DIR = "deepspeed"  # RUN_DIR/deepspeed/step_N: DeepSpeed's own checkpoints (deepspeed.engine_checkpoint=true)
# Expert shards of an expert-parallel run, one file per expert-parallel rank (a name DeepSpeed's own globs skip):
# safetensors, never a pickle, so reading one (experiments.convert_deepspeed) cannot run code. The shard's place
# (ep_size, ep_rank, banks) rides as JSON in the safetensors metadata under EXPERT_SHARD_META.
EXPERT_SHARD_FILE = "switchyard_experts_ep_rank_{ep_rank:02d}.safetensors"
EXPERT_SHARD_META = "switchyard_expert_parallel"


def import_deepspeed():
    """deepspeed, or a ValueError that names the extra to install."""
    try:
        import deepspeed
    except ImportError as e:
        raise ValueError(f"trainer=deepspeed needs DeepSpeed, which cannot be imported ({e}); install it with "
                         f"{INSTALL}, or use trainer=ddp") from None
    return deepspeed


def engine_config(cfg, world_size: int, bf16: bool) -> dict[str, Any]:
    """DeepSpeed's JSON config from a RunConfig: batch sizes from the trainer's global batch and the world size,
    accumulation, clipping and precision from the trainer, ZeRO from cfg.deepspeed."""
    tc, dc = cfg.trainer, cfg.deepspeed
    zero: dict[str, Any] = {"stage": dc.zero_stage}
    if dc.zero_stage > 0:
        zero.update(reduce_bucket_size=dc.reduce_bucket_size, allgather_bucket_size=dc.allgather_bucket_size,
                    overlap_comm=dc.overlap_comm and dc.zero_stage == 2,
                    contiguous_gradients=dc.contiguous_gradients,
                    reduce_scatter=True, allgather_partitions=True)
    return {
        "train_batch_size": tc.batch_size * tc.grad_accum,  # = micro batch x accumulation x data-parallel ranks
        "train_micro_batch_size_per_gpu": tc.batch_size // world_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "managed_gradient_accumulation": False,  # the Trainer calls step() once per optimizer step
        # ZeRO 0 (fp32): clipped exactly by a step pre-hook instead (module docstring)
        "gradient_clipping": 0.0 if dc.zero_stage == 0 else tc.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # progress goes to metrics.jsonl, not DeepSpeed's log
        "wall_clock_breakdown": False,
    }


HOW = ("torchrun --nproc_per_node=N -m experiments.train trainer=deepspeed ..., or "
       "deepspeed --no_local_rank --num_gpus=N --module experiments.train trainer=deepspeed ...")


def check_deepspeed(cfg) -> tuple[int, int, int, Any]:
    """Every check that needs no process group, for trainer=deepspeed; returns (world, rank, local_rank, the model
    config: init_from's when set)."""
    if cfg.trainer.compile:
        raise ValueError("trainer.compile=true is not supported with trainer=deepspeed (DeepSpeed's engine wraps the "
                         "model and its hooks; moe.compile compiles blocks for trainer=single, ddp and fsdp); set "
                         "trainer.compile=false or use trainer=ddp")
    import_deepspeed()
    world, rank, local_rank = launch_env("deepspeed", HOW, "torchrun or the deepspeed launcher")
    if cfg.deepspeed.zero_stage == 0 and use_bf16(cfg.trainer.precision, resolve_device(cfg.trainer.device)):
        raise ValueError(
            f"deepspeed.zero_stage=0 with bf16 (trainer.precision={cfg.trainer.precision!r}) is not supported: "
            f"DeepSpeed then wraps the optimizer in its FP16_UnfusedOptimizer, whose clipping norm leaves the expert "
            f"gradients out; "
            f"use deepspeed=zero1 or zero2 for bf16, or trainer.precision=fp32"
        )
    mcfg = checked_model_config(cfg)
    ep = cfg.model.moe.expert_parallel
    if mcfg.is_moe or ep > 1:
        parallel.check_parallel(mcfg.moe.num_experts, ep, world)
    check_batch(cfg.trainer.batch_size, world)
    return world, rank, local_rank, mcfg


def expert_groups(ep: int) -> ParallelGroups:
    """DeepSpeed's expert-parallel and expert-data-parallel groups for ep (created once; every rank calls this), as
    the ParallelGroups our layers use. Asserts that DeepSpeed's layout is moe.parallel's."""
    from deepspeed.utils import groups as ds_groups

    W, rank = dist.get_world_size(), dist.get_rank()
    name = f"ep_size_{ep}"
    if name not in ds_groups._get_expert_parallel_group_dict():
        ds_groups._create_expert_and_data_parallel(ep)
    ep_ranks = list(ds_groups._get_expert_parallel_group_ranks(name))
    edp_ranks = list(ds_groups._get_expert_data_parallel_group_ranks(name))
    assert ep_ranks == list(range(rank // ep * ep, rank // ep * ep + ep)), (ep_ranks, rank, ep)
    assert edp_ranks == list(range(rank % ep, W, ep)), (edp_ranks, rank, ep)
    return ParallelGroups(
        world_size=W, rank=rank, ep_size=ep, ep_rank=rank % ep,
        ep_group=ds_groups._get_expert_parallel_group(name) if ep > 1 else None,
        expert_dp_group=ds_groups._get_expert_data_parallel_group(name) if ep < W else None,
        world_group=dist.group.WORLD, timeout_setting=TIMEOUT_KEY,
    )


def _moe_announcer(num_experts: int, ep: int) -> nn.Module:
    """A parameter-less subclass of deepspeed.moe.layer.MoE: the engine's only way to learn that the model has
    experts (has_moe_layers, num_experts, the expert group name). It never runs; the groups exist already."""
    from deepspeed.moe.layer import MoE

    class ExpertsAnnouncement(MoE):
        def __init__(self) -> None:
            nn.Module.__init__(self)  # not MoE.__init__: no gate, no experts of its own
            self.num_experts, self.ep_size = num_experts, ep
            self.num_local_experts = num_experts // ep
            self.expert_group_name = f"ep_size_{ep}"
            self.use_residual, self.enable_expert_tensor_parallelism = False, False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # expert_groups() created DeepSpeed's groups before the engine

        def forward(self, *args, **kwargs):
            raise RuntimeError("ExpertsAnnouncement only tells the DeepSpeed engine about the experts; it never runs")

    return ExpertsAnnouncement()


class EngineModule(nn.Module):
    """The module the engine wraps: the Transformer (`model.`), and for an MoE model the announcement (`moe.`, no
    state). forward returns a tuple whose tensors (the LM loss and each aux loss) the engine hooks for its backward
    prologue; the ModelOutput rides along."""

    def __init__(self, model: nn.Module, announcement: Optional[nn.Module]):
        super().__init__()
        self.model = model
        self.moe = announcement

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        out = self.model(x, y)
        return out.loss, dict(out.aux_losses), out


def moe_param_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The optimizer's param groups (named decay / no_decay) split by DeepSpeed's MoE helper: expert parameters
    move to groups marked moe=True and named by their group_name (the expert-data-parallel group ZeRO partitions
    them over); every group keeps its hyper-parameters (weight decay)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(g["params"]),
              "name": f"group{i}"} for i, g in enumerate(optimizer.param_groups)]
    return [g for g in split_params_into_different_moe_groups_for_optimizer(named) if g["params"]]


def _adam_keys(state: dict) -> list[str]:
    return [k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0]


class DeepSpeedEngine:
    """The Engine protocol on a DeepSpeed engine. Batch rows, expert sharding, logged values and checkpoints are
    trainer=ddp's (full-size layout); forward, backward and step are the engine's."""

    skips_non_finite = False  # engine.step() updates whatever the norm (bf16/fp32 ZeRO checks no overflow)

    def __init__(self, ranks: Torchrun, cfg, num_experts: int, run_dir: Path):
        self.ranks, self.device, self.groups = ranks, ranks.device, ranks.groups
        self.cfg, self.num_experts = cfg, num_experts
        self.engine_dir = run_dir / ENGINE_DIR  # deepspeed.engine_checkpoint: every rank writes here
        self.bf16 = use_bf16(cfg.trainer.precision, self.device)
        self.autocast = autocast(self.device, self.bf16)
        self.ds_config = engine_config(cfg, ranks.world_size, self.bf16)
        self.zero = self.ds_config["zero_optimization"]["stage"]
        self.engine = None
        self.model: nn.Module = None  # the Transformer inside the engine
        self.template: Optional[torch.optim.Optimizer] = None  # our AdamW over the model: the checkpoint layout
        self._norm: Optional[float] = None  # ZeRO 0: the norm the clip hook computed in this step
        self._max_norm = cfg.trainer.grad_clip

    @classmethod
    def launch(cls, cfg) -> "DeepSpeedEngine":
        """Checks, then joins the process group and creates the expert groups (DeepSpeed's, our layout)."""
        world, rank, local_rank, mcfg = check_deepspeed(cfg)
        # gloo on CPU whatever DeepSpeed's CPU accelerator would pick (ccl when oneCCL's bindings are installed): the
        # same backend as trainer=ddp, and the one our all-to-all dispatcher is tested on. NCCL on CUDA.
        device, timeout = init_process_group(cfg.trainer.device, local_rank, world, rank,
                                             cfg.trainer.collective_timeout_s)
        deepspeed = import_deepspeed()
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        ranks = Torchrun(expert_groups(cfg.model.moe.expert_parallel), device)
        run_dir = Path(ranks.broadcast(str(cfg.path), "broadcast of rank 0's run directory"))
        return cls(ranks, cfg, mcfg.moe.num_experts if mcfg.is_moe else 0, run_dir)

    # ------------------------------------------------------------ the engine

    def wrap(self, model: nn.Module, optim) -> torch.optim.Optimizer:
        """Builds the engine around the expert-sharded model and a client copy of our AdamW (its param groups
        split into DeepSpeed's MoE groups); returns the client optimizer, whose param groups take the learning
        rate."""
        deepspeed = import_deepspeed()
        self.model = model = parallel.distribute(model.to(self.device), self.groups)
        self.template = optimizer = build_optimizer(model, optim, engine="deepspeed")  # foreach (auto)
        accepted = inspect.signature(type(optimizer).__init__).parameters  # defaults also hold derived keys
        client = type(optimizer)(moe_param_groups(optimizer),
                                 **{k: v for k, v in optimizer.defaults.items() if k in accepted})
        if self.zero == 0:  # fp32 (check_deepspeed): the engine steps our AdamW itself; the exact clip goes on it
            client.register_step_pre_hook(self._clip_hook(model))
        announcement = _moe_announcer(self.num_experts, self.groups.ep_size) if self.num_experts else None
        fp32 = {id(p): p.detach().clone() for p in model.parameters()} if self.bf16 else {}
        rng = torch.get_rng_state()  # the engine's set-up must not move the run's random stream
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.engine, _, _, _ = deepspeed.initialize(model=EngineModule(model, announcement), optimizer=client,
                                                    config=self.ds_config, dist_init_required=False)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        if self.bf16:  # fp32 master weights from the fp32 weights, not from their bf16 copies
            self._set_masters(lambda p: fp32[id(p)])
        if self.zero > 0:
            self._init_partitioned_state(client)
        return client

    def _set_masters(self, value) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        for p in self.model.parameters():
            safe_set_full_fp32_param(p, value(p))

    def _init_partitioned_state(self, client: torch.optim.Optimizer) -> None:
        """AdamW's state for the engine's flat fp32 partitions, created now as AdamW would at its first step (zero
        moments, step 0), and linked to the parameters' fragments. DeepSpeed links them lazily after the first
        param group's first step, when the other groups' state does not exist yet (we have four groups: decay and
        no decay, dense and experts), so their fragments would stay unreadable; and a resume needs them before any
        step."""
        for group in client.param_groups:
            for flat in group["params"]:
                if not client.state.get(flat):
                    client.state[flat] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                          "exp_avg": torch.zeros_like(flat, memory_format=torch.preserve_format),
                                          "exp_avg_sq": torch.zeros_like(flat, memory_format=torch.preserve_format)}
        self.engine.optimizer._hp_optimizer_states_linked = False
        self.engine.optimizer._lazy_init_hp_params_optimizer_state()

    def _clip_hook(self, model: nn.Module):
        params = list(model.parameters())

        def clip(opt, args, kwargs):  # after the engine's reduction, before AdamW's update
            max_norm = self._max_norm
            self._norm = float(parallel.clip_grad_norm(params, max_norm if max_norm > 0 else float("inf"), self.groups))
        return clip

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        # bf16: the engine holds bf16 weights, and autocast keeps the model's fp32 pieces (norms, rotary tables)
        # from meeting them uncast
        with self.autocast():
            return self.engine(x.to(self.device), y.to(self.device))[2]

    def train_micro(self, x: torch.Tensor, y: torch.Tensor, scale: float, last: bool):
        out = self.forward(x, y)  # DeepSpeed reduces at step(): managed_gradient_accumulation is off
        self.engine.backward(out.total_loss * scale, scale_wrt_gas=False)  # scale: 1 / trainer.grad_accum already
        return out

    def step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
        self._norm, self._max_norm = None, max_norm
        self.engine.step()
        norm = self._norm if self._norm is not None else self.engine.get_global_grad_norm()
        if norm is None:
            raise RuntimeError("the DeepSpeed engine reported no gradient norm")
        return float(norm)

    # ------------------------------------------------------------ checkpoints in our layout

    @contextlib.contextmanager
    def _fp32_weights(self, model: nn.Module):
        """bf16: the module holds bf16 copies; the checkpoint gets the fp32 master weights."""
        if not self.bf16 or self.engine is None:
            yield
            return
        from deepspeed.utils import safe_get_full_fp32_param

        saved = {}
        for p in model.parameters():
            full = safe_get_full_fp32_param(p)
            if full is not None:
                saved[p] = p.data
                p.data = full.to(p.device)
        try:
            yield
        finally:
            for p, data in saved.items():
                p.data = data

    def state_to_save(self, optimizer: torch.optim.Optimizer, sharded: bool, step: int = 0) -> SavedState:
        """trainer=single's layout: the fp32 weights and our AdamW's state at full size (ZeRO partitions gathered:
        collectives, every rank calls it); deepspeed.engine_checkpoint: DeepSpeed's own checkpoint as well."""
        if self.cfg.deepspeed.engine_checkpoint:
            save_engine_checkpoint(self, self.engine_dir, f"step_{step}", {"step": step})
        with self._fp32_weights(self.model):
            weights = model_state(self.model)
        return FullState(weights, self._optimizer_state(optimizer))

    def _optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """Our AdamW's state_dict, full-size, from the engine's optimizer (ZeRO partitions:
        safe_get_full_optimizer_state, a collective over each partition group)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        template, model = self.template, self.model
        params = [p for g in template.param_groups for p in g["params"]]
        step = self._step_value(optimizer)
        for p in params:
            if self.zero == 0:
                if p in optimizer.state:
                    template.state[p] = optimizer.state[p]
                continue
            keys = ("exp_avg", "exp_avg_sq") if step is not None else ()
            values = {k: safe_get_full_optimizer_state(p, k) for k in keys}
            if values and all(v is not None for v in values.values()):
                template.state[p] = {"step": step.clone(),
                                     **{k: v.reshape(p.shape).to(p.device) for k, v in values.items()}}
        for tg, cg in zip(template.param_groups, optimizer.param_groups):
            tg["lr"] = cg["lr"]
        try:
            return full_optimizer_state(template, model)
        finally:
            template.state.clear()

    def _step_value(self, optimizer: torch.optim.Optimizer) -> Optional[torch.Tensor]:
        for s in optimizer.state.values():
            if "step" in s:
                return torch.as_tensor(s["step"]).detach().clone()
        return None

    @torch.no_grad()
    def load_state(self, optimizer: torch.optim.Optimizer, state) -> None:
        """Full-size weights (and under ZeRO 1/2 the fp32 partitions the engine steps) and our AdamW's state, into
        the built engine."""
        full = as_full(state, self.model)
        parallel.load_full_state_dict(self.model, full.weights, strict=False)  # casts into bf16 module copies
        if self.zero > 0:  # ZeRO's fp32 partitions (the weights its step updates) were built from the old weights
            local = dict(self.model.named_parameters())
            saved = {id(p): full.weights[name] for name, p in local.items()}
            shards = {id(p): bank for _, bank in parallel.expert_banks(self.model) if bank.ep_size > 1
                      for p in bank.parameters()}
            self._set_masters(lambda p: (parallel.split_shard(saved[id(p)], shards[id(p)]) if id(p) in shards
                                         else saved[id(p)]).to(p.device, torch.float32))
        template = self.template
        load_full_optimizer_state(template, self.model, full.optimizer)  # our layout, this rank's expert rows
        if self.zero == 0:
            for p, s in template.state.items():
                optimizer.state[p] = s
        else:
            self._load_partitioned_state(self.model, template)
        template.state.clear()

    def _load_partitioned_state(self, model: nn.Module, template: torch.optim.Optimizer) -> None:
        """Resume under ZeRO 1/2: every parameter's moments written into its fragments of the partitions,
        and the step count."""
        if not template.state:
            return
        from deepspeed.utils import safe_set_full_optimizer_state

        step = next(iter(template.state.values()))["step"]
        keys = _adam_keys(next(iter(template.state.values())))
        for s in self.engine.optimizer.optimizer.state.values():
            s["step"] = torch.as_tensor(step, dtype=torch.float32).clone()
        for p in model.parameters():
            s = template.state.get(p)
            if s is None:
                continue
            for k in keys:
                safe_set_full_optimizer_state(p, s[k].to(p.device, torch.float32), k)

    def close(self) -> None:
        if self.engine is not None and hasattr(self.engine, "destroy"):
            self.engine.destroy()  # releases DeepSpeed's hooks and buffers
        self.engine = None
        self.ranks.close()


def save_engine_checkpoint(par: DeepSpeedEngine, save_dir: Path, tag: str, metadata: Optional[dict] = None) -> Path:
    """engine.save_checkpoint(save_dir, tag), completed for expert parallelism; every rank calls it.

    DeepSpeed writes the module's state once (data-parallel rank 0: mp_rank_00_model_states.pt, under `module`, keys
    prefixed `model.` by EngineModule) and per-expert files only for its own MoE class, so with ep > 1 the other
    ranks' expert shards would be missing: the first replica of every expert shard (ranks 0..ep-1) also writes
    EXPERT_SHARD_FILE (safetensors), its shard of every expert parameter, keyed as in the module state, with its
    place (ep_size, ep_rank, banks: first expert, local and global expert counts) in the metadata. The model config
    (and `metadata`) ride in the client state under "switchyard". experiments.convert_deepspeed reads all of it."""
    engine = par.engine
    model = engine.module.model
    client = {"switchyard": {"model": model.cfg.to_dict(), "expert_parallel": par.groups.ep_size, **(metadata or {})}}
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=client)
    g = par.groups
    if g.ep_size > 1:
        banks = parallel.expert_banks(engine.module)
        with par._fp32_weights(model):  # bf16: the fp32 master weights (a collective: every rank)
            shards = {f"{name}.{pname}": p.detach().cpu().clone()
                      for name, bank in banks for pname, p in bank.named_parameters(recurse=False)}
    if g.ep_size > 1 and g.rank < g.ep_size:  # ranks 0..ep-1 hold the first replica of shards 0..ep-1
        meta = {"ep_size": g.ep_size, "ep_rank": g.ep_rank,
                "banks": {name: [b.first_expert, b.num_experts, b.num_global_experts] for name, b in banks}}
        save_file(shards, str(Path(save_dir) / tag / EXPERT_SHARD_FILE.format(ep_rank=g.ep_rank)),
                  metadata={EXPERT_SHARD_META: json.dumps(meta)})
    dist.barrier()
    return Path(save_dir) / tag
