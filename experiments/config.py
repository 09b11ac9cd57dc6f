"""The training application's typed configs: the schema Hydra composes `train` into, and the checked RunConfig.

Every group of conf/train.yaml is a field of TrainConfig, registered in Hydra's ConfigStore as the primary config's
schema (experiments/hydra_conf.py): Hydra itself refuses a wrong type or an unknown key in any group, and the
defaults live here once (the YAML files under conf/ hold only what makes their option different). The dataclasses
are plain: the library (moe/, routing/) never sees Hydra, and this module imports neither Hydra nor torch, so
composing a config (`--help`, `--cfg job`, tab completion) stays fast.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from experiments.data_config import DataConfig
from experiments.typed_config import from_mapping
from moe.config import ModelConfig
from moe.twins import ROUTER_CHOICES, build_twin
from routing.config import check_finite


FUSED_CHOICES = ("auto", "true", "false")  # optim.fused


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate, reached at the end of warmup
    min_lr: float = 3e-4  # floor of the decay
    warmup_steps: int = 20  # linear warmup from 0 to lr over this many optimizer steps
    schedule: str = "cosine"  # decay after warmup: cosine (to min_lr at max_steps), linear, or constant
    weight_decay: float = 0.1  # AdamW decay on matrices; never on norms, biases or embeddings
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    # The update's kernel: auto (torch's fused AdamW wherever it runs: trainer=single, ddp and fsdp on every device
    # torch has the kernel for; foreach under trainer=deepspeed, which steps its own flat partitions), true (fused,
    # an error where it cannot run) or false (foreach: one kernel per op over all tensors). The fused update moves
    # 3-4x fewer bytes (at E=64 on CPU 28 ms against 104 ms a step, docs/benchmarks.md) and takes the gradient clip
    # as its grad_scale; equal to foreach within fp32 round-off, not bitwise. The run's log names the choice.
    fused: str = "auto"

    def __post_init__(self) -> None:
        check_finite(self, "optim")
        # Hydra types optim.fused=true as the string 'True'; older run.json files and Python callers hold a bool
        self.fused = str(self.fused).lower()
        if self.fused not in FUSED_CHOICES:
            raise ValueError(f"optim.fused={self.fused!r} must be auto, true or false")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"optim.schedule={self.schedule!r} must be cosine, linear or constant")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim.lr={self.lr} and optim.min_lr={self.min_lr} need 0 <= min_lr <= lr and lr > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be non-negative")
        # torch.optim.AdamW checks the betas and eps itself, but without naming the config field, and it never sees
        # weight_decay (that goes in the param groups, unchecked): a negative value grows the weights every step.
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay={self.weight_decay} must be non-negative (0 disables decay)")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optim.{name}={getattr(self, name)} must be in [0, 1) (usual: beta1=0.9, beta2=0.95)")
        if self.eps <= 0:
            raise ValueError(f"optim.eps={self.eps} must be positive: it keeps AdamW's step finite where the second "
                             f"moment is zero (usual: 1e-8)")


@dataclass
class TrainerConfig:
    # The engine (experiments.engines; README "Choosing a trainer"): single (one process), ddp (torchrun: torch DDP x
    # expert parallel), fsdp (torchrun: FSDP2 sharding x expert parallel on a DeviceMesh) or deepspeed (ZeRO 0-2 under
    # torchrun or the deepspeed launcher; settings in `deepspeed`)
    kind: str = "single"
    max_steps: int = 300  # optimizer steps of the whole run (the schedule's length)
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int = 128  # tokens per sequence (at most model.max_seq_len)
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_interval: int = 100  # optimizer steps between validation passes (and always at the end); 0: only at the end
    eval_batches: int = 8  # validation batches per pass (a fixed set: curves are comparable across runs)
    eval_at_start: bool = True  # a fresh run also evaluates before its first step: curves start at step 0
    log_interval: int = 10  # optimizer steps between metrics records
    ckpt_interval: int = 0  # optimizer steps between checkpoints; 0: only the final one
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16
    threads: int = 0  # torch intra-op threads on CPU; 0 keeps torch's default
    progress: bool = True  # a progress bar, drawn only on a terminal; the log lines are printed either way
    collective_timeout_s: float = 600.0  # trainer=ddp|deepspeed: a collective waiting longer fails
    # Steps in a row whose gradient norm is not finite that are skipped (no update, counted and logged) before the
    # run stops; 0 stops at the first. A spike of NaNs passes; a diverged run stops with its last good checkpoint named.
    max_skipped_steps: int = 5
    # trainer=fsdp: replicas of the sharded model (HSDP: shard within groups of world / replicate ranks, replicate
    # across them; 1 is plain FSDP over every rank). model.moe.expert_parallel must divide world / replicate.
    replicate: int = 1
    # Recompute each checkpointed block's activations in the backward instead of keeping them: 0 off, 1 every block,
    # n every n-th block (less memory, about one more forward per step); routing statistics are counted once.
    activation_checkpointing: int = 0
    # Checkpoint layout: full (model.safetensors, rank 0 gathers and writes), sharded (every rank writes its pieces
    # with torch.distributed.checkpoint; trainer=fsdp only) or auto (sharded under fsdp, else full). Either loads
    # under every trainer at any world size; python -m experiments.convert_checkpoint turns one into the other.
    checkpoint_format: str = "auto"
    # torch.compile each block (moe.compile: inductor, dense and MoE alike; an MoE block is one graph, its expert
    # GEMMs custom operators, so the routing's per-expert sizes never recompile); results equal eager within fp32
    # round-off.
    compile: bool = False

    def __post_init__(self) -> None:
        check_finite(self, "trainer")
        if self.kind not in ("single", "ddp", "fsdp", "deepspeed"):
            raise ValueError(f"trainer.kind={self.kind!r} must be single, ddp, fsdp or deepspeed")
        if self.checkpoint_format not in ("auto", "full", "sharded"):
            raise ValueError(f"trainer.checkpoint_format={self.checkpoint_format!r} must be auto, full or sharded")
        if self.checkpoint_format == "sharded" and self.kind != "fsdp":
            raise ValueError(f"trainer.checkpoint_format=sharded needs trainer=fsdp (trainer={self.kind} holds whole "
                             f"tensors on rank 0 and writes the full layout); use trainer.checkpoint_format=auto")
        if self.replicate < 1 or (self.replicate > 1 and self.kind != "fsdp"):
            raise ValueError(f"trainer.replicate={self.replicate} must be 1, or at least 1 with trainer=fsdp (HSDP "
                             f"replicas of the sharded model)")
        if self.activation_checkpointing < 0:
            raise ValueError(f"trainer.activation_checkpointing={self.activation_checkpointing} must be 0 (off), 1 "
                             f"(every block) or n (every n-th block)")
        if self.collective_timeout_s <= 0:
            raise ValueError(f"trainer.collective_timeout_s={self.collective_timeout_s} must be positive")
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name}={getattr(self, name)} must be at least 1")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"trainer.precision={self.precision!r} must be auto, fp32 or bf16")
        if self.keep_checkpoints < 1:
            raise ValueError(f"trainer.keep_checkpoints={self.keep_checkpoints} must be at least 1")
        for name, zero in (("eval_interval", "evaluate only at the end"), ("ckpt_interval", "only the final checkpoint"),
                           ("grad_clip", "no clipping"), ("threads", "torch's default")):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name}={getattr(self, name)} must be non-negative (0: {zero})")
        if self.max_skipped_steps < 0:
            raise ValueError(f"trainer.max_skipped_steps={self.max_skipped_steps} must be non-negative (0: stop at "
                             f"the first non-finite gradient)")


ZERO_STAGES = (0, 1, 2, 3)


@dataclass
class DeepSpeedConfig:
    """trainer=deepspeed: the DeepSpeed engine's own settings (conf/deepspeed/). What the trainer already says is not
    repeated here: the batch sizes come from trainer.batch_size (the global batch), trainer.grad_accum and the world
    size, clipping from trainer.grad_clip, bf16 from trainer.precision (auto: bf16 on CUDA, fp32 on CPU), the
    optimizer and schedule from optim (experiments.engines.deepspeed builds the DeepSpeed JSON config from all three)."""
    # ZeRO stage: 0 plain data parallel (every rank holds weights, gradients and optimizer state), 1 optimizer state
    # partitioned over the data-parallel ranks, 2 gradients too. 3 (weights partitioned too) is refused: DeepSpeed
    # does not support it with MoE layers, and this trainer's checkpoints and evaluation need whole weights.
    zero_stage: int = 1
    # ZeRO 1/2: elements per bucket of the gradient reduction (reduce-scatter / all-reduce) and of the all-gather of
    # the updated weight partitions. Larger buckets: fewer, larger collectives, more temporary memory.
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    # ZeRO 2: reduce gradient buckets while the backward still runs (overlap; more memory). ZeRO 1/2: reduce through
    # one contiguous buffer (less fragmentation; with expert parallelism required: DeepSpeed's other path all-reduces
    # expert gradients over every rank).
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    # ZeRO-Offload of the optimizer state to the CPU: none only. The offloaded optimizer is DeepSpeed's CPU Adam,
    # not this project's AdamW, so its losses would not equal trainer=single's; refused with that reason.
    offload_optimizer: str = "none"
    # Also write DeepSpeed's own engine checkpoint (engine.save_checkpoint) beside each of ours, to
    # RUN_DIR/deepspeed/step_N; `python -m experiments.convert_deepspeed` turns one into our format.
    engine_checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.zero_stage not in ZERO_STAGES:
            raise ValueError(f"deepspeed.zero_stage={self.zero_stage} must be 0, 1 or 2 (3 is not supported)")
        if self.zero_stage == 3:
            raise ValueError(
                "deepspeed.zero_stage=3 is not supported: DeepSpeed refuses ZeRO stage 3 with MoE layers, and "
                "trainer=deepspeed needs whole weights for evaluation and checkpoints; use deepspeed=zero1 or zero2"
            )
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"deepspeed.{name}={getattr(self, name)} must be at least 1")
        if self.offload_optimizer != "none":
            raise ValueError(
                f"deepspeed.offload_optimizer={self.offload_optimizer!r} is not supported: ZeRO-Offload runs "
                f"DeepSpeed's CPU Adam instead of this project's AdamW; keep deepspeed.offload_optimizer=none"
            )


@dataclass
class LoggerConfig:
    kind: str = "none"  # none (metrics.jsonl and console only) or wandb (also a wandb run)
    project: str = "switchyard"  # wandb project
    entity: Optional[str] = None  # wandb entity (team); None: the user's default
    group: Optional[str] = None  # wandb group, e.g. the sweep's name
    name: Optional[str] = None  # wandb run name; None: the run directory's name
    mode: str = "offline"  # wandb mode: offline (default, sync later with `wandb sync`), online, disabled

    def __post_init__(self) -> None:
        if self.kind not in ("none", "wandb"):
            raise ValueError(f"logger.kind={self.kind!r} must be none or wandb")
        if self.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={self.mode!r} must be offline, online or disabled")


_DEFAULT_WARMUP = OptimConfig.warmup_steps  # the dataclass default: the one source of that number


@dataclass
class TrainConfig:
    """What `python -m experiments.train` composes (conf/train.yaml); Hydra types every override against it."""
    model: ModelConfig  # the model to train (ignored in favour of the checkpoint's when init_from is set)
    data: DataConfig = field(default_factory=DataConfig)  # corpus and tokenizer
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer and schedule
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # loop, evaluation, checkpoints
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # where metrics go besides metrics.jsonl
    # trainer=deepspeed: the engine's settings (conf/deepspeed/). Always a typed node here, so that an override of
    # one of its fields is checked like any other; RunConfig keeps it only for trainer.kind=deepspeed.
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    seed: int = 0  # seeds initialisation, batches, dropout and router noise
    resume: str = "never"  # never, or auto: continue from the newest complete checkpoint in run_dir
    init_from: Optional[str] = None  # checkpoint directory whose config and weights start this run
    # A twin of `model` (moe/twins.py): dense, moe_e{E}_k{k} (same training FLOPs per token), moe_e{E}_k{k}_s{s}
    # (s shared experts too) or dense_wide_e{E}_k{k} (same total parameters as that MoE); `model` then holds it.
    twin: Optional[str] = None
    # The twin's router: auto (the balanced defaults of docs/routing_defaults.md, BASE layers for top-1 and top-k
    # with a stronger balancing loss, when the model's router is the library default; any other router is kept),
    # balanced (those defaults always) or keep (the model's router as composed, e.g. routing=topk, with k set).
    twin_router: str = "auto"
    # Round the twin's expert width to a multiple of this (1: the nearest integer). 8 gives widths whose rows are
    # whole SIMD vectors and 16-byte aligned, so the elementwise passes vectorise to the row's end and the grouped
    # GEMM can take torch's grouped_mm (docs/benchmarks.md: the demo twins' bare step 4-7% faster at 8 than at 1);
    # the FLOPs still match dense within 1% (a width that cannot is refused), and the records count the real ones.
    twin_width_multiple: int = 1


@dataclass
class RunConfig(TrainConfig):
    """One run as the trainer sees it: the composed config with its twin resolved, checked as a whole."""
    deepspeed: Optional[DeepSpeedConfig] = None  # trainer=deepspeed: the engine's settings; None for other trainers
    run_dir: str = "."  # where metrics.jsonl and checkpoints/ are written (Hydra's output directory)

    def __post_init__(self) -> None:
        if self.resume not in ("never", "auto"):
            raise ValueError(f"resume={self.resume!r} must be never or auto")
        if self.twin is not None and self.init_from:
            raise ValueError(f"twin={self.twin!r} and init_from={self.init_from!r} exclude each other: a twin is "
                             f"built from the composed model, init_from takes the checkpoint's; drop one of them")
        if (self.trainer.kind == "deepspeed") != (self.deepspeed is not None):
            raise ValueError(
                "trainer.kind='deepspeed' needs the deepspeed settings and only it uses them: select both with "
                "trainer=deepspeed (which picks deepspeed=zero1), not trainer.kind=deepspeed alone"
                if self.deepspeed is None else
                f"deepspeed settings were given but trainer.kind={self.trainer.kind!r}; use trainer=deepspeed"
            )
        if self.optim.fused == "true" and self.trainer.kind == "deepspeed":
            raise ValueError("optim.fused=true is not supported with trainer=deepspeed: the DeepSpeed engine steps the "
                             "optimizer over its own flat partitions; set optim.fused=auto or false (or use trainer=fsdp)")
        ep = self.model.moe.expert_parallel
        if self.deepspeed is not None and ep > 1 and not self.deepspeed.contiguous_gradients:
            raise ValueError(
                f"deepspeed.contiguous_gradients=false with model.moe.expert_parallel={ep}: "
                f"DeepSpeed's non-contiguous ZeRO reduction all-reduces expert gradients over every rank, mixing "
                f"different experts; keep deepspeed.contiguous_gradients=true"
            )
        if self.model.moe.expert_parallel > 1 and self.trainer.kind == "single":
            raise ValueError(
                f"model.moe.expert_parallel={self.model.moe.expert_parallel} needs one process per rank: launch "
                f"torchrun --nproc_per_node=N -m experiments.train trainer=ddp, or set model.moe.expert_parallel=1"
            )
        if self.optim.warmup_steps > self.trainer.max_steps and self.optim.warmup_steps != _DEFAULT_WARMUP:
            # The run would end inside the warmup: optim.lr is never reached and the decay never starts. The default
            # warmup is let through, so that a short check (trainer.max_steps=1) needs no second override.
            raise ValueError(
                f"optim.warmup_steps={self.optim.warmup_steps} is longer than the run (trainer.max_steps="
                f"{self.trainer.max_steps}): the learning rate would never reach optim.lr={self.optim.lr}; lower "
                f"optim.warmup_steps to at most {self.trainer.max_steps} or raise trainer.max_steps"
            )
        if self.trainer.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"trainer.seq_len={self.trainer.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
                f"lower trainer.seq_len or raise model.max_seq_len"
            )

    @property
    def path(self) -> Path:
        return Path(self.run_dir)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_config(train: TrainConfig, run_dir: str) -> RunConfig:
    """The composed config as one checked run. The twin is resolved here, at the boundary: the trainer sees a
    plain model, and run.json records the model that was trained beside the twin's name."""
    model, kind = train.model, train.trainer.kind
    if train.twin_router not in ROUTER_CHOICES:
        raise ValueError(f"twin_router={train.twin_router!r} must be one of {list(ROUTER_CHOICES)}")
    if not isinstance(train.twin_width_multiple, int) or train.twin_width_multiple < 1:
        raise ValueError(f"twin_width_multiple={train.twin_width_multiple!r} must be an integer >= 1 (1: no rounding)")
    if train.twin is not None and not train.init_from:
        try:
            model = build_twin(model, train.twin, seq_len=min(train.trainer.seq_len, model.max_seq_len),
                               multiple_of=train.twin_width_multiple, routers=train.twin_router)
        except ValueError as e:
            if train.twin_width_multiple == 1:
                raise
            raise ValueError(f"twin={train.twin} with twin_width_multiple={train.twin_width_multiple}: {e}; "
                             f"set twin_width_multiple=1 (or a smaller multiple) for this twin") from e
    if kind != "deepspeed" and train.deepspeed != DeepSpeedConfig():
        raise ValueError(f"deepspeed settings were given but trainer.kind={kind!r}; use trainer=deepspeed (or drop them)")
    fields = {f.name: getattr(train, f.name) for f in dataclasses.fields(TrainConfig)}
    deepspeed = train.deepspeed if kind == "deepspeed" else None
    return RunConfig(**{**fields, "model": model, "deepspeed": deepspeed}, run_dir=run_dir)


def run_config_from_dict(d: dict[str, Any], run_dir: str) -> RunConfig:
    """A RunConfig from a plain mapping (a resolved Hydra config, a run.json's config), typed like Hydra types it."""
    if isinstance(d, dict) and "model" not in d:
        raise ValueError("the config has no model; choose one with model=PRESET")
    # run_dir is where this run writes, not a setting; deepspeed is null in a run.json of another trainer.
    d = {k: v for k, v in d.items() if k != "run_dir" and not (k == "deepspeed" and v is None)}
    return run_config(from_mapping(TrainConfig, d), run_dir)
