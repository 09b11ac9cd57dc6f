"""Expert parallelism with the fused Triton kernels as the local dispatcher (TRITON_INTERPRET=1 on CPU): ep=2 on two
gloo processes equals one process running `sorted`, in outputs and every gradient."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.distributed as dist

from moe.config import ModelConfig, MoEConfig
from moe.layer import MoELayer
from moe.parallel import distribute, make_groups
from tests.distributed._spawn import init_gloo, run_workers

# Not imported here: triton must first be imported after TRITON_INTERPRET is set (the kernel tests set it at import).
pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")]

E, T, D = 4, 12, 16  # tokens per rank


def _cfg(ep: int, dispatcher: str) -> ModelConfig:
    return ModelConfig(d_model=D, d_ff=32, n_head=2, activation="silu", glu=True, ffn_bias=True,
                       moe=MoEConfig(layers="all", num_experts=E, expert_hidden=8, expert_parallel=ep,
                                     dispatcher=dispatcher, router={"top_k": 2}))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world, port)
    torch.manual_seed(0)
    ref = MoELayer(_cfg(1, "sorted"))
    with torch.no_grad():  # skew: expert 3 never wins, so rank 1 gets one empty expert
        ref.router.gate.weight[3] = -10.0
    layer = MoELayer(_cfg(world, "triton"))
    layer.load_state_dict(ref.state_dict())
    distribute(layer, make_groups(world, E))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(world * T, D, generator=g)
    gy = torch.randn(world * T, D, generator=g)

    y_ref, _ = ref(x)
    (y_ref * gy).sum().backward()
    xs = x[rank * T:(rank + 1) * T].clone().requires_grad_(True)
    y, _ = layer(xs)
    (y * gy[rank * T:(rank + 1) * T]).sum().backward()
    # the router's gradient is replicated: sum it over ranks as data-parallel reduction would
    dist.all_reduce(layer.router.gate.weight.grad)
    lo, hi = rank * (E // world), (rank + 1) * (E // world)
    diffs = {"y": (y - y_ref[rank * T:(rank + 1) * T]).abs().max().item(),
             "gate": (layer.router.gate.weight.grad - ref.router.gate.weight.grad).abs().max().item()}
    for name, p in layer.experts.named_parameters():
        diffs[name] = (p.grad - getattr(ref.experts, name).grad[lo:hi]).abs().max().item()
    torch.save(diffs, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ep2_triton_local_equals_single_process_sorted(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned workers
    run_workers(_worker, 2, str(tmp_path), timeout_s=300)
    for rank in range(2):
        diffs = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(diffs) >= {"y", "gate", "w_up", "w_gate", "w_down", "b_up", "b_down"}
        for name, d in diffs.items():
            assert d < 1e-5, f"rank {rank}: {name} differs by {d:.2e}"
