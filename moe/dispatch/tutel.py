"""Tutel's fast dispatch kernels behind a RoutingPlan (optional: tutel is not on PyPI).

Shape legend: T tokens, d model width, E experts, C slots per expert, N plan rows, K the most rows any token has.

Tutel describes a routing as K choice lists of length T, its "critical data":
    indices_s[j][t]    expert of token t's j-th assignment      (int32; negative: no assignment)
    locations_s[j][t]  slot of that assignment in its expert    (int32; >= C: dropped)
    gates_s[j][t]      combine weight of that assignment
and its kernels copy x[t] into slot (indices, locations) of an [E*C, d] buffer (fast_encode) and sum
gate * buffer[slot] back per token (fast_decode), skipping entries with a negative index or a location past C.
A plan lists rows instead, and a token may hold any number of them (0 after drops, up to E under expert choice),
so the adapter numbers each token's rows j = 0..m_t-1 and marks the (token, j) entries that do not exist with
index -1. Expert compute runs on the [E, C, d] slot buffer (Experts.forward_padded), as in Tutel's own layer.
Expert parallelism is ours (the `alltoall` dispatcher); this adapter runs the local, single-process case.
"""
from __future__ import annotations

import importlib

import torch
from torch import Tensor

from routing.plan import RoutingPlan

INSTALL_HINT = ("tutel is not installed, and it is not on PyPI: install it from source "
                "(pip install git+https://github.com/microsoft/tutel), or choose model.moe.dispatcher=sorted")


def tutel_kernels():
    """Tutel's (fast_encode, fast_decode), or ValueError saying how to get them."""
    try:
        mod = importlib.import_module("tutel.impls.fast_dispatch")
    except ImportError as e:
        raise ValueError(f"model.moe.dispatcher='tutel': {INSTALL_HINT} ({e})") from e
    return mod.fast_encode, mod.fast_decode


def critical_data(plan: RoutingPlan) -> tuple[int, list[Tensor], list[Tensor], list[Tensor], int]:
    """The plan as Tutel's (E, indices_s, locations_s, gates_s, capacity); gates_s stay differentiable."""
    T, E = plan.num_tokens, plan.num_experts
    token = plan.token_index  # [N]
    device = token.device
    # j: rank of each row among its token's rows (rows of one token are ordered as in the plan, i.e. by expert)
    order = torch.argsort(token, stable=True)
    per_token = torch.bincount(token, minlength=T)  # [T]
    starts = torch.cumsum(per_token, 0) - per_token
    j = torch.empty_like(token)
    j[order] = torch.arange(token.numel(), device=device) - starts[token[order]]
    K = max(int(per_token.max()), 1) if T else 1  # host syncs: Tutel takes the list count and C as Python ints
    capacity = plan.capacity if plan.capacity is not None else max(int(plan.counts.max()), 1)
    indices = torch.full((K, T), -1, dtype=torch.int32, device=device)
    indices[j, token] = plan.expert_index.to(torch.int32)
    locations = torch.zeros((K, T), dtype=torch.int32, device=device)
    locations[j, token] = plan.position.to(torch.int32)
    gates = torch.zeros((K, T), dtype=torch.float32, device=device).index_put((j, token), plan.weight.float())
    return E, list(indices.unbind(0)), list(locations.unbind(0)), list(gates.unbind(0)), capacity


def tutel_dispatch(x: Tensor, plan: RoutingPlan, experts) -> Tensor:
    """x [T, d] -> y [T, d]; same contract as einsum_dispatch, through Tutel's encode/decode kernels."""
    fast_encode, fast_decode = tutel_kernels()
    crit = critical_data(plan)
    E, C = crit[0], crit[4]
    slots = fast_encode(x, crit).view(E, C, x.shape[-1])  # [E, C, d]
    out = experts.forward_padded(slots.to(x.dtype))  # [E, C, d]
    return fast_decode(out.reshape(E * C, -1), crit).view(x.shape).to(x.dtype)  # gates applied here (post-score)
