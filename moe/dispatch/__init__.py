"""Dispatchers move tokens to experts and back according to a RoutingPlan; all compute the same function.

model.moe.dispatcher picks one: einsum, sorted, triton, tutel (Tutel's kernels, where tutel is installed), or auto
(the default: triton on CUDA when triton imports, else sorted). `resolve_dispatcher` turns the configured name and
the tensors' device into the one that runs, and `describe_dispatch` says which, and why, for a run's log.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from moe.dispatch.alltoall import alltoall_dispatch
from moe.dispatch.einsum import einsum_dispatch
from moe.dispatch.sorted import sorted_dispatch
from moe.dispatch.triton import triton_dispatch  # imports triton only when it runs
from moe.dispatch.tutel import tutel_dispatch, tutel_kernels  # imports tutel only when it runs

# The dispatchers that run everywhere (the equivalence tests iterate over them on CPU).
DISPATCHERS = {
    "einsum": einsum_dispatch,
    "sorted": sorted_dispatch,
}
# `triton` needs CUDA (or TRITON_INTERPRET=1 on CPU, for tests) and `tutel` an install from source, so they are
# looked up by dispatch_fn, not listed above.
# Not a choice of model.moe.dispatcher either: MoELayer switches to alltoall_dispatch by itself when its experts are an
# expert-parallel shard (moe.parallel.distribute); the resolved `sorted` or `triton` then runs the local experts.
ALL_DISPATCHERS = {**DISPATCHERS, "triton": triton_dispatch, "tutel": tutel_dispatch}


def resolve_dispatcher(name: str, device: torch.device, expert_parallel: bool = False) -> tuple[str, str]:
    """The configured model.moe.dispatcher and the tensors' device -> (dispatcher that runs, why).

    auto picks triton only for CUDA tensors with triton importable (never the CPU interpreter, however
    TRITON_INTERPRET is set); an explicit triton that cannot run raises a ValueError saying what to change."""
    from moe.kernels import triton_status  # does not import triton itself

    device = torch.device(device)
    if name in DISPATCHERS:
        return name, f"model.moe.dispatcher={name}"
    if name == "auto":
        if device.type != "cuda":
            return "sorted", f"auto: no CUDA device ({device.type} tensors)"
        ok, why = triton_status(device)
        return ("triton" if ok else "sorted"), f"auto: {why}"
    if name == "triton":
        ok, why = triton_status(device)
        if not ok:
            raise ValueError(
                f"model.moe.dispatcher=triton cannot run here: {why}; set model.moe.dispatcher=auto (triton on CUDA, "
                f"else sorted) or sorted, or set TRITON_INTERPRET=1 to run the kernels on CPU (slow; for tests)"
            )
        return "triton", why
    if name == "tutel":
        if expert_parallel:
            raise ValueError("model.moe.dispatcher=tutel cannot run expert-parallel (Switchyard's all-to-all runs sorted "
                             "on the local experts); set model.moe.dispatcher=auto or sorted")
        tutel_kernels()  # a ValueError that says how to install tutel
        return "tutel", "model.moe.dispatcher=tutel (Tutel's fast_encode/fast_decode kernels)"
    raise ValueError(f"model.moe.dispatcher={name!r} must be one of auto, einsum, sorted, triton, tutel")


def dispatch_fn(name: str) -> Callable:
    """A resolved dispatcher's name -> its function (x [T, d], plan, experts) -> y [T, d]."""
    return ALL_DISPATCHERS[name]


def describe_dispatch(model: nn.Module) -> str:
    """One line for a run's log: the dispatcher the model's sparse layers run on their device, and why."""
    from moe.layer import MoELayer  # late: moe.layer imports this package

    lines = []
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            device = layer.experts.w_up.device
            ep = layer.experts.ep_size
            try:
                name, why = resolve_dispatcher(layer.dispatcher, device, expert_parallel=ep > 1)
            except ValueError as e:
                name, why = f"{layer.dispatcher} (cannot run)", str(e)
            line = f"dispatcher: {name} ({why})"
            if ep > 1:
                line = f"dispatcher: alltoall over {ep} expert-parallel ranks, {name} locally ({why})"
            if line not in lines:
                lines.append(line)
    return "; ".join(lines) if lines else "dispatcher: none (dense model)"


__all__ = ["ALL_DISPATCHERS", "DISPATCHERS", "alltoall_dispatch", "describe_dispatch", "dispatch_fn",
           "einsum_dispatch", "resolve_dispatcher", "sorted_dispatch", "triton_dispatch", "tutel_dispatch"]
