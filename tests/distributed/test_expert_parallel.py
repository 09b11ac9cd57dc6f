"""Expert parallelism equals one process: ep=2 and ep=4 (and ep=2 x 2 data-parallel replicas) against the
single-process run of the same global batch, in outputs, loss, every gradient and the clipped gradient norm, for
top-1, top-2 and expert choice, and with skewed routing where experts and whole ranks get no tokens.

One spawn per world size runs every case (process start-up dominates on 2 cores); each test then checks its case.
Expert choice: its experts compete for the tokens of a group, and a rank routes its own tokens, so the plan equals
the single-process plan only when the single process routes each rank's shard as its own batch; that is the
reference for expert choice (token choice, dropless, is compared with the one global batch).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moe.config import ModelConfig, MoEConfig
from moe.dispatch.alltoall import MoECollectiveError, describe_exchange
from moe.layer import MoELayer
from moe.model import Transformer
from moe.parallel import check_parallel, clip_grad_norm, distribute, make_groups, reduce_gradients, shard_experts
from tests.distributed._spawn import init_gloo, run_workers

pytestmark = pytest.mark.distributed

E = 8  # experts per sparse layer: 4 per rank at ep=2, 2 at ep=4
LOCAL_B, S = 4, 8  # sequences per rank, tokens per sequence
MAX_NORM = 0.05  # small enough that clipping scales every gradient
CASES = {
    "top1": dict(name="topk", top_k=1),
    "top2": dict(name="topk", top_k=2),
    "expert_choice": dict(name="expert_choice", top_k=2, capacity_factor=1.0),
    # Every token goes to experts 0 and 1: experts 2..7 get nothing, and so do ranks 1 (ep=2) and 1..3 (ep=4).
    "top2_skewed": dict(name="topk", top_k=2),
    "top1_skewed": dict(name="topk", top_k=1),
}
TOL = 2e-5


def model_config(router: dict, ep: int) -> ModelConfig:
    return ModelConfig(vocab_size=64, n_layer=2, d_model=16, n_head=2, d_ff=32, max_seq_len=16, activation="silu",
                       glu=True, ffn_bias=True, norm="rmsnorm", position="rope",
                       moe=MoEConfig(layers="all", num_experts=E, expert_hidden=8, expert_parallel=ep, router=router))


@torch.no_grad()
def skew(model: Transformer) -> None:
    """Feature 0 of the residual stream becomes a large constant, and every gate prefers experts 0 and 1 through it."""
    model.embed.weight[:, 0] = 10.0
    for block in model.blocks:
        gate = block.ffn.router.gate.weight  # [E, d]
        gate[:, 0] = torch.tensor([3.0, 2.5] + [-3.0] * (E - 2))


def compare_case(name: str, groups, W: int, rank: int) -> dict:
    """One case at one ep on this rank: max differences from the single-process reference."""
    router = CASES[name]
    torch.manual_seed(0)
    ref = Transformer(model_config(router, 1))
    if name.endswith("skewed"):
        skew(ref)
    model = Transformer(model_config(router, groups.ep_size))
    model.load_state_dict(ref.state_dict())
    distribute(model, groups)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 64, (LOCAL_B * W, S), generator=g)
    tgt = torch.randint(0, 64, (LOCAL_B * W, S), generator=g)

    # the single process, on the global batch (expert choice: each rank's shard routed as its own batch)
    if router["name"] == "expert_choice":
        outs = [ref(idx[r::W], tgt[r::W]) for r in range(W)]
        ref_loss, ref_lm = sum(o.total_loss for o in outs) / W, sum(o.loss for o in outs) / W
        ref_logits = outs[rank].logits
    else:
        out = ref(idx, tgt)
        ref_loss, ref_lm, ref_logits = out.total_loss, out.loss, out.logits[rank::W]
    ref_loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)

    # this rank's shard of the batch, its experts' shard of the model
    out = model(idx[rank::W], tgt[rank::W])
    out.total_loss.backward()
    params = list(model.parameters())
    reduce_gradients(params, groups)
    norm = clip_grad_norm(params, MAX_NORM, groups)
    losses = torch.stack([out.total_loss.detach(), out.loss.detach()])
    dist.all_reduce(losses)
    losses /= W

    ref_params = dict(ref.named_parameters())
    grad_diff, expert_grad_diff, zero_grad_rows = 0.0, 0.0, 0
    for pname, p in model.named_parameters():
        want = ref_params[pname].grad
        if getattr(p, "allreduce", True) is False:
            bank = model.get_submodule(pname.rsplit(".", 1)[0])
            want = want[bank.first_expert:bank.first_expert + bank.num_experts]
            expert_grad_diff = max(expert_grad_diff, (p.grad - want).abs().max().item())
            zero_grad_rows += int((p.grad.flatten(1).abs().sum(1) == 0).sum()) if pname.endswith("w_up") else 0
        grad_diff = max(grad_diff, (p.grad - want).abs().max().item())
    counts = torch.stack([s["tokens_per_expert"] for s in out.stats.values()])  # [layers, E] this rank's rows
    dist.all_reduce(counts)
    per_rank = counts.view(counts.shape[0], groups.ep_size, -1).sum(-1)  # [layers, ep] rows each rank receives
    diffs = torch.tensor([
        (out.logits - ref_logits).abs().max().item(),
        abs(losses[0].item() - ref_loss.item()),
        abs(losses[1].item() - ref_lm.item()),
        grad_diff,
        expert_grad_diff,
        abs(norm.item() - ref_norm.item()),
    ], dtype=torch.float64)
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    zero = torch.tensor([zero_grad_rows], dtype=torch.float64)
    dist.all_reduce(zero)
    keys = ("logits", "loss", "lm_loss", "grad", "expert_grad", "grad_norm")
    return {**dict(zip(keys, diffs.tolist())), "ref_grad_norm": ref_norm.item(),
            "empty_experts": int((counts == 0).sum()), "empty_ranks": int((per_rank == 0).sum()),
            "zero_grad_expert_rows": int(zero.item()) // (groups.dp_size or 1)}


def _ep_worker(rank: int, world: int, port: int, eps: list[int], out_path: str) -> None:
    init_gloo(rank, world, port)
    results = {}
    for ep in eps:
        groups = make_groups(ep, E)
        for name in CASES:
            results[f"{name}/ep{ep}/world{world}"] = compare_case(name, groups, world, rank)
    if world == 2:  # the same spawn: ranks with different numbers of tokens, one with none
        results["uneven"] = uneven_case(rank, world, [0, 19])
    if rank == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = {}
    for world, eps in ((2, [2]), (4, [4, 2])):  # ep=2 on 4 ranks: 2 data-parallel replicas of each shard
        path = tmp_path_factory.mktemp("ep") / f"world{world}.json"
        t0 = time.perf_counter()
        run_workers(_ep_worker, world, eps, str(path), timeout_s=180)
        out.update(json.loads(path.read_text()))
        print(f"world {world}: {time.perf_counter() - t0:.1f} s")
    return out


@pytest.mark.parametrize("setting", ["ep2/world2", "ep4/world4", "ep2/world4"])
@pytest.mark.parametrize("case", list(CASES))
def test_expert_parallel_equals_one_process(results, case, setting):
    ep, world = setting.split("/")
    r = results[f"{case}/{ep}/{world}"]
    print(case, setting, {k: f"{v:.2e}" if isinstance(v, float) else v for k, v in r.items()})
    for key in ("logits", "loss", "lm_loss", "grad", "expert_grad", "grad_norm"):
        assert r[key] <= TOL, f"{case} {setting}: max |difference| of {key} is {r[key]:.3g}"
    assert r["ref_grad_norm"] > MAX_NORM, "clipping must be active for the norm check to mean something"
    if case.endswith("skewed"):
        ep_size = int(ep[2:])
        assert r["empty_experts"] >= 2 * (E - 2), "experts 2..7 of both layers must get no tokens"
        assert r["empty_ranks"] == 2 * (ep_size - 1), "every rank but the first must receive no tokens"
        assert r["zero_grad_expert_rows"] == r["empty_experts"], "empty experts must get exactly zero gradients"


# ---------------------------------------------------------------- uneven ranks, at the layer

def uneven_case(rank: int, world: int, sizes: list[int]) -> float:
    """Ranks with different numbers of tokens (one with none): a bare MoELayer, the loss a sum, no reduction. The
    largest difference from one process over every rank (outputs, input and gate gradients, expert gradients)."""
    cfg = model_config(dict(name="topk", top_k=2, aux_loss_coef=0.0, z_loss_coef=0.0), world)
    torch.manual_seed(0)
    ref = MoELayer(cfg.replace(moe=dataclasses.replace(cfg.moe, expert_parallel=1)))
    with torch.no_grad():
        for p in ref.parameters():
            torch.nn.init.normal_(p, 0.0, 0.5)
    layer = copy.deepcopy(ref)
    shard_experts(layer, make_groups(world, E))
    x = torch.randn(sum(sizes), 16, generator=torch.Generator().manual_seed(2))
    g = torch.randn(sum(sizes), 16, generator=torch.Generator().manual_seed(3))
    xr = x.clone().requires_grad_(True)
    (ref(xr)[0] * g).sum().backward()
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    xl = x[lo:hi].clone().requires_grad_(True)
    y, _ = layer(xl)
    (y * g[lo:hi]).sum().backward()
    gate = layer.router.gate.weight.grad.clone()
    dist.all_reduce(gate)  # each rank's gate gradient is its tokens' share
    bank = layer.experts
    diffs = [(y - ref(x)[0][lo:hi]).abs().max().item() if hi > lo else 0.0,
             (xl.grad - xr.grad[lo:hi]).abs().max().item() if hi > lo else 0.0,
             (gate - ref.router.gate.weight.grad).abs().max().item()]
    for n, p in bank.named_parameters():
        want = dict(ref.experts.named_parameters())[n].grad[bank.first_expert:bank.first_expert + bank.num_experts]
        diffs.append((p.grad - want).abs().max().item())
    t = torch.tensor([max(diffs)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def test_ranks_with_different_token_counts(results):
    assert results["uneven"] <= TOL


# ---------------------------------------------------------------- a stuck peer is reported, not a silent hang

def _timeout_worker(rank: int, world: int, port: int, out_path: str) -> None:
    init_gloo(rank, world, port, timeout_s=2.0)
    torch.manual_seed(0)
    # no load-balancing loss: the layer's first collective is the all-to-all of the counts (with it, the router's
    # all-reduce comes first: test_router_collective_failure_names_the_layer)
    model = distribute(Transformer(model_config({**CASES["top2"], "aux_loss_coef": 0.0}, 2)),
                       make_groups(2, E, timeout=datetime.timedelta(seconds=2)))
    done = Path(out_path)
    if rank == 0:
        try:
            model(torch.zeros(2, S, dtype=torch.long))
            message = "no error"
        except MoECollectiveError as e:
            message = str(e)
        done.write_text(message)
    else:  # never reaches the layer: stays alive until rank 0 has reported, so rank 0 sees a timeout
        deadline = time.monotonic() + 30
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    # The group is broken on purpose: tearing it down at interpreter exit can abort in gloo's destructors.
    os._exit(0)


def test_collective_timeout_names_rank_layer_and_counts(tmp_path):
    path = tmp_path / "timeout.txt"
    run_workers(_timeout_worker, 2, str(path), timeout_s=60)
    message = path.read_text()
    assert "failed on rank 0 (expert-parallel rank 0 of 2, experts 0..3)" in message, message
    assert "MoE layer blocks.0.ffn during the exchange of per-expert counts" in message, message
    assert "this rank's token rows per expert [" in message and "Timed out" in message, message


def test_router_collective_failure_names_the_layer(monkeypatch):
    """Data parallelism: a failed load-balancing all-reduce is reported with the layer and this rank's counts."""
    def stuck(*args, **kwargs):
        raise RuntimeError("Timed out waiting 2000ms for recv operation to complete")

    model = Transformer(model_config(CASES["top2"], 1))
    for name, block in enumerate(model.blocks):
        block.ffn.distribute(f"blocks.{name}.ffn", batch_group=object())  # any group: the collective never runs
    monkeypatch.setattr(dist, "all_reduce", stuck)
    with pytest.raises(MoECollectiveError) as e:
        model(torch.zeros(2, S, dtype=torch.long))
    message = str(e.value)
    assert "MoE layer blocks.0.ffn during the all-reduce of the load-balancing loss's expert counts" in message
    assert "this rank's token rows per expert [" in message and "Timed out" in message


def test_describe_exchange_lists_counts_by_source():
    msg = describe_exchange("blocks.3.ffn", 5, 1, 2, "exchange of token rows", [3, 0, 2, 1], [0, 4, 2, 0])
    assert "rank 5 (expert-parallel rank 1 of 2, experts 2..3)" in msg
    assert "MoE layer blocks.3.ffn during the exchange of token rows" in msg
    assert "rows per expert [3, 0, 2, 1]" in msg and "from each rank [[0, 4], [2, 0]]" in msg


# ---------------------------------------------------------------- bad settings, before any process group

@pytest.mark.parametrize("num_experts, ep, world, match", [
    (8, 3, 3, r"model.moe.expert_parallel=3 does not divide model.moe.num_experts=8"),
    (8, 4, 2, r"model.moe.expert_parallel=4 does not divide the world size 2"),
    (8, 0, 2, r"model.moe.expert_parallel=0 must be at least 1"),
])
def test_bad_expert_parallel_settings(num_experts, ep, world, match):
    with pytest.raises(ValueError, match=match):
        check_parallel(num_experts, ep, world)
    assert not dist.is_initialized()


def test_bad_expert_parallel_config():
    with pytest.raises(ValueError, match=r"model.moe.expert_parallel=3 does not divide model.moe.num_experts=8"):
        MoEConfig(layers="all", num_experts=8, expert_parallel=3)
    with pytest.raises(ValueError, match=r"model.moe.dispatcher='einsum' cannot run expert-parallel"):
        MoEConfig(layers="all", num_experts=8, expert_parallel=2, dispatcher="einsum")
