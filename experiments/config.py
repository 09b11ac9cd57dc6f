"""The application's plain config dataclasses, and the one boundary where a composed Hydra config becomes them.

The library (moe/, routing/) never sees Hydra; experiments turn `DictConfig` into these dataclasses here,
so a typo or a bad value fails with a named field before any data is read or any model is built.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from experiments.data import DataConfig
from experiments.twins import build_twin
from moe.config import ModelConfig, _from_dict


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

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"optim.schedule={self.schedule!r} must be cosine, linear or constant")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim.lr={self.lr} and optim.min_lr={self.min_lr} need 0 <= min_lr <= lr and lr > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be non-negative")


@dataclass
class TrainerConfig:
    kind: str = "single"  # single (one process) or ddp (torchrun: data x expert parallel, experiments.distributed)
    max_steps: int = 300  # optimizer steps of the whole run (the schedule's length)
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int = 128  # tokens per sequence (at most model.max_seq_len)
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_interval: int = 100  # optimizer steps between validation passes (and always at the end); 0: only at the end
    eval_batches: int = 8  # validation batches per pass (a fixed set: curves are comparable across runs)
    log_interval: int = 10  # optimizer steps between metrics records
    ckpt_interval: int = 0  # optimizer steps between checkpoints; 0: only the final one
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16
    threads: int = 0  # torch intra-op threads on CPU; 0 keeps torch's default
    progress: bool = True  # a progress bar with loss and tokens/s
    collective_timeout_s: float = 600.0  # trainer=ddp: a collective waiting longer fails, naming rank and layer

    def __post_init__(self) -> None:
        if self.kind == "deepspeed":
            raise ValueError(
                "trainer.kind='deepspeed' is not built yet: use trainer=ddp (torchrun) for data and expert "
                "parallelism, or trainer=single"
            )
        if self.kind not in ("single", "ddp"):
            raise ValueError(f"trainer.kind={self.kind!r} must be single or ddp")
        if self.collective_timeout_s <= 0:
            raise ValueError(f"trainer.collective_timeout_s={self.collective_timeout_s} must be positive")
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name}={getattr(self, name)} must be at least 1")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"trainer.precision={self.precision!r} must be auto, fp32 or bf16")
        if self.keep_checkpoints < 1:
            raise ValueError(f"trainer.keep_checkpoints={self.keep_checkpoints} must be at least 1")


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


@dataclass
class RunConfig:
    model: ModelConfig  # the model to train (ignored in favour of the checkpoint's when init_from is set)
    data: DataConfig = field(default_factory=DataConfig)  # corpus and tokenizer
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer and schedule
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # loop, evaluation, checkpoints
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # where metrics go besides metrics.jsonl
    run_dir: str = "."  # where metrics.jsonl and checkpoints/ are written
    seed: int = 0  # seeds initialisation, batches, dropout and router noise
    resume: str = "never"  # never, or auto: continue from the newest complete checkpoint in run_dir
    init_from: Optional[str] = None  # checkpoint directory whose config and weights start this run
    # A twin of `model` (experiments.twins): dense, moe_e{E}_k{k} (same training FLOPs per token) or
    # dense_wide_e{E}_k{k} (same total parameters as that MoE); `model` then holds the resolved twin.
    twin: Optional[str] = None

    def __post_init__(self) -> None:
        if self.resume not in ("never", "auto"):
            raise ValueError(f"resume={self.resume!r} must be never or auto")
        if self.twin is not None and self.init_from:
            raise ValueError(f"twin={self.twin!r} and init_from={self.init_from!r} exclude each other: a twin is "
                             f"built from the composed model, init_from takes the checkpoint's; drop one of them")
        if self.model.moe.expert_parallel > 1 and self.trainer.kind == "single":
            raise ValueError(
                f"model.moe.expert_parallel={self.model.moe.expert_parallel} needs one process per rank: launch "
                f"torchrun --nproc_per_node=N -m experiments.train trainer=ddp, or set model.moe.expert_parallel=1"
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


def _checked(cls, d: Any, where: str) -> Any:
    """d with each value checked against the field types of cls: the YAML groups are untyped in Hydra, so
    without this `trainer.max_steps=abc` fails later with a bare TypeError, or not at all."""
    if not isinstance(d, dict):
        return d  # _from_dict names the problem
    hints, out = typing.get_type_hints(cls), dict(d)
    for name, value in d.items():
        args = typing.get_args(hints.get(name))
        base = next((a for a in args if a is not type(None)), None) if args else hints.get(name)
        if base not in (bool, int, float, str) or (value is None and type(None) in args):
            continue  # unknown fields are named by _from_dict
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if base is str and number:
            out[name] = str(value)  # what a typed Hydra node does with `logger.name=123`
        elif not {bool: isinstance(value, bool), int: number and isinstance(value, int), float: number,
                  str: isinstance(value, str)}[base]:
            what = base.__name__ + (" or null" if type(None) in args else "")
            raise ValueError(f"{where + '.' if where else ''}{name}={value!r} must be {what}")
    return out


def run_config_from_dict(d: dict[str, Any], run_dir: str) -> RunConfig:
    """Builds and validates a RunConfig from a resolved config mapping (what Hydra composed)."""
    known = {f.name for f in dataclasses.fields(RunConfig)} - {"run_dir"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown top-level config key(s) {unknown}; known keys are {sorted(known)}")
    if "model" not in d:
        raise ValueError("the config has no model; choose one with model=PRESET")
    top = _checked(RunConfig, {k: d[k] for k in ("seed", "resume", "init_from", "twin") if k in d}, "")
    model = ModelConfig.from_dict(d["model"])
    trainer = _from_dict(TrainerConfig, _checked(TrainerConfig, d.get("trainer", {}), "trainer"), "trainer")
    if top.get("twin") is not None:  # the twin is resolved here, at the boundary: the trainer sees a plain model
        model = build_twin(model, top["twin"], seq_len=min(trainer.seq_len, model.max_seq_len))
    return RunConfig(
        model=model,
        data=_from_dict(DataConfig, _checked(DataConfig, d.get("data", {}), "data"), "data"),
        optim=_from_dict(OptimConfig, _checked(OptimConfig, d.get("optim", {}), "optim"), "optim"),
        trainer=trainer,
        logger=_from_dict(LoggerConfig, _checked(LoggerConfig, d.get("logger", {}), "logger"), "logger"),
        run_dir=run_dir,
        seed=top.get("seed", 0),
        resume=top.get("resume", "never"),
        init_from=top.get("init_from"),
        twin=top.get("twin"),
    )
