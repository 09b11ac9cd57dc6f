"""The expert-parallel combine is deterministic: ep=2 on two gloo processes, top-3 routing (k >= 3, where an atomic
bf16 sum shows its order), forward and backward run twice give bitwise equal outputs and gradients, in fp32 and
bf16, and equal the single-process `sorted` run. On CPU index_add_ was repeatable too; what this pins is that the
new fixed-order reduction (moe.dispatch.token_rows) is, and that it is what the dispatcher runs
(tests/moe/test_token_rows.py checks the CUDA case, where index_add_ is atomic)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from moe.config import ModelConfig, MoEConfig
from moe.layer import MoELayer
from moe.parallel import distribute, make_groups
from tests.distributed._spawn import init_gloo, run_workers

pytestmark = pytest.mark.distributed

E, T, D = 4, 16, 16  # experts, tokens per rank, model width


def _cfg(ep: int) -> ModelConfig:
    return ModelConfig(d_model=D, d_ff=32, n_head=2, activation="silu", glu=True, ffn_bias=True,
                       moe=MoEConfig(layers="all", num_experts=E, expert_hidden=8, expert_parallel=ep,
                                     dispatcher="sorted", router={"top_k": 3}))


def _run(layer: MoELayer, x: torch.Tensor, gy: torch.Tensor) -> list[torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    xs = x.clone().requires_grad_(True)
    y, _ = layer(xs)
    y.backward(gy)
    return [y.detach(), xs.grad] + [p.grad.clone() for p in layer.experts.parameters()]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world, port)
    torch.manual_seed(0)
    ref = MoELayer(_cfg(1))
    layer = MoELayer(_cfg(world))
    layer.load_state_dict(ref.state_dict())
    distribute(layer, make_groups(world, E))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(world * T, D, generator=g)
    gy = torch.randn(world * T, D, generator=g)
    mine = slice(rank * T, (rank + 1) * T)
    result = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        layer.to(dtype)  # the router keeps fp32 (Router._apply)
        first, second = (_run(layer, x[mine].to(dtype), gy[mine].to(dtype)) for _ in range(2))
        result[f"{name} repeatable"] = all(torch.equal(a, b) for a, b in zip(first, second))
        if dtype == torch.float32:
            y_ref = ref(x)[0][mine]
            result["fp32 max diff vs one process"] = (first[0] - y_ref).abs().max().item()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ep2_top3_bitwise_repeatable(tmp_path):
    run_workers(_worker, 2, str(tmp_path), timeout_s=180)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert r["fp32 repeatable"] and r["bf16 repeatable"], f"rank {rank}: {r}"
        assert r["fp32 max diff vs one process"] < 1e-5, f"rank {rank}: {r}"
