"""AdamW with decay only on matrices, its update kernel chosen per engine (optim.fused), the clip folded into the
update, and the warmup-then-decay learning-rate schedule."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from experiments.config import OptimConfig

# Engines whose optimizer steps the model's own parameters (plain tensors, or FSDP2's DTensors: torch 2.13's fused
# AdamW accepts those on CPU with gloo and on CUDA, grad_scale included; tests/experiments/test_optim.py).
FUSED_ENGINES = ("single", "ddp", "fsdp")
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: the coefficient is max_norm / (norm + 1e-6)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; norms, biases and embeddings (1-D, or looked up rather than multiplied) do not."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # tied weights appear once
        is_embedding = name.startswith(("embed.", "pos_embed."))  # a tied lm_head is embed.weight (seen above)
        (no_decay if p.dim() < 2 or is_embedding else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolve_fused(setting: str, engine: str, params: list[Tensor]) -> tuple[bool, str]:
    """(fused?, why) for optim.fused=auto|true|false under trainer=`engine` with these parameters. fused: torch's
    one-kernel update, which reads and writes each parameter's 28 bytes once (3-4x less traffic than the foreach
    update on CPU, docs/benchmarks.md); foreach: one kernel per op over all tensors."""
    if setting == "false":
        return False, "optim.fused=false"
    if engine not in FUSED_ENGINES:
        if setting == "true":
            raise ValueError(f"optim.fused=true is not supported with trainer={engine}: the DeepSpeed engine steps "
                             f"the optimizer over its own flat partitions; set optim.fused=auto or false")
        return False, f"optim.fused=auto: trainer={engine} steps its own partitions"
    unsupported = sorted({f"{p.device.type} {p.dtype}" for p in params if not _fused_supports(p)})
    if unsupported:
        if setting == "true":
            raise ValueError(f"optim.fused=true: torch's fused AdamW does not run on parameters of "
                             f"{', '.join(unsupported)}; set optim.fused=auto (foreach there) or false")
        return False, f"optim.fused=auto: torch's fused AdamW does not run on {', '.join(unsupported)}"
    return True, f"optim.fused={setting}"


def _fused_supports(p: Tensor) -> bool:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return p.is_floating_point() and p.device.type in _get_fused_kernels_supported_devices()


def build_optimizer(model: nn.Module, cfg: OptimConfig, engine: str = "single") -> torch.optim.AdamW:
    """The run's AdamW on `model` under trainer=`engine` (optim.fused resolved by resolve_fused)."""
    groups = param_groups(model, cfg.weight_decay)
    fused, _ = resolve_fused(cfg.fused, engine, [p for g in groups for p in g["params"]])
    impl = {"fused": True, "foreach": None} if fused else {"fused": None, "foreach": True}
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **impl)

    # load_state_dict takes every group setting from the checkpoint, the kernel choice included (an older
    # checkpoint says foreach): this run's choice is kept, since the arithmetic is the same within round-off.
    def keep_impl(optimizer: torch.optim.Optimizer) -> None:
        for g in optimizer.param_groups:
            g.update(impl)
    opt.register_load_state_dict_post_hook(keep_impl)
    return opt


def describe_optimizer(optimizer: torch.optim.Optimizer, cfg: OptimConfig, engine: str) -> str:
    """One line for a run's log: the update's kernel and why (as the dispatcher and torch.compile lines)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    fused, why = resolve_fused(cfg.fused, engine, params)
    clip = "; the clip folded into the update" if engine in FUSED_ENGINES else ""  # experiments.optim.clipped_update
    return f"optimizer: AdamW, {'fused' if fused else 'foreach'} update ({why}){clip}"


@contextmanager
def _grad_scale(optimizer: torch.optim.Optimizer, scale: Tensor) -> Iterator[None]:
    """torch's fused Adam(W) divides every gradient by `optimizer.grad_scale` (a device tensor) inside its one
    kernel: the attribute torch.amp.GradScaler sets around step() and deletes after, set the same way here. No
    found_inf: that would make a step with an infinite scale skip and roll back the step count."""
    optimizer.grad_scale = scale
    try:
        yield
    finally:
        del optimizer.grad_scale


@torch.no_grad()
def clipped_update(optimizer: torch.optim.Optimizer, norm: Tensor, max_norm: float) -> float:
    """Clips the gradients to max_norm given their global norm (before clipping), updates, clears them; returns
    the norm as a float. Equal to torch.nn.utils.clip_grad_norm_ then optimizer.step() within fp32 round-off
    (bitwise on the foreach update), without clip_grad_norm_'s separate pass that rewrites every gradient:
    - a non-finite norm updates nothing (the engines skip such a step);
    - a norm within the limit (coefficient 1) skips the rescale: multiplying by 1 changes nothing;
    - a fused update takes 1 / coefficient as its grad_scale, so the scale costs no pass of its own;
    - a foreach update takes one torch._foreach_mul_ over the gradients (its moments need the scaled gradient).
    The one host read is the norm's, which the engines need anyway to decide whether to skip."""
    value = float(norm)
    if math.isfinite(value):
        if max_norm <= 0 or not math.isfinite(max_norm) or max_norm >= value + CLIP_EPS:
            optimizer.step()
        elif any(g.get("fused") for g in optimizer.param_groups):
            with _grad_scale(optimizer, (norm.float() + CLIP_EPS) / max_norm):
                optimizer.step()
        else:
            grads = [_local(p.grad) for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch._foreach_mul_(grads, torch.clamp(max_norm / (norm.float() + CLIP_EPS), max=1.0))
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (FSDP2's gradients), else the tensor: the rescale is elementwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then decay to min_lr at max_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
