"""moe.parallel and moe.expert_shard in one process: the shard description, the one divisibility check, sharding
a bank (exact slices, tags, no random draws), distribute, and the gradient arithmetic with the collectives
replaced by stand-ins that add what the other ranks would (the real multi-process runs: tests/distributed)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe import parallel
from moe.config import ModelConfig, MoEConfig
from moe.expert_shard import ExpertShard, check_expert_parallel
from moe.experts import Experts
from moe.model import Transformer
from moe.parallel import ParallelGroups

E = 8


def _groups(world: int, ep: int, rank: int) -> ParallelGroups:
    # Distinct stand-in objects: the fake collectives below record which group each reduction used.
    return ParallelGroups(world_size=world, rank=rank, ep_size=ep, ep_rank=rank % ep,
                          ep_group="ep-group" if ep > 1 else None, expert_dp_group="expert-dp-group",
                          world_group="world-group", timeout_s=None)


def _model(ep: int = 1) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=32, n_layer=2, d_model=8, n_head=2, d_ff=12, max_seq_len=8,
                                   moe=MoEConfig(layers="all", num_experts=E, expert_parallel=ep)))


def test_shard_description():
    shard = ExpertShard(num_global_experts=8, ep_size=4, ep_rank=3, group="g", layer_name="blocks.1.ffn")
    assert (shard.num_experts, shard.first_expert) == (2, 6)
    assert ExpertShard(5).num_experts == 5 and ExpertShard(5).first_expert == 0  # one process holds all
    with pytest.raises(ValueError, match=r"ep_rank=4 must be in \[0, ep_size=4\)"):
        ExpertShard(8, 4, 4)
    with pytest.raises(AttributeError):
        shard.ep_rank = 0  # frozen: a bank's shard never changes after construction


@pytest.mark.parametrize("num_experts, ep, match", [
    (8, 3, r"model.moe.expert_parallel=3 does not divide model.moe.num_experts=8"),
    (8, 0, r"model.moe.expert_parallel=0 must be at least 1"),
])
def test_one_divisibility_check_everywhere(num_experts, ep, match):
    with pytest.raises(ValueError, match=match):
        check_expert_parallel(num_experts, ep)
    with pytest.raises(ValueError, match=match):
        ExpertShard(num_experts, ep)
    with pytest.raises(ValueError, match=match):
        parallel.check_parallel(num_experts, ep, 24)


def test_sharded_bank_holds_exact_slices_and_draws_nothing():
    full = Experts(E, 4, 6, "silu", glu=True, bias=True)
    full.w_up.requires_grad_(False)  # requires_grad travels with the slice
    full.eval()  # so does the mode
    rng = torch.get_rng_state()
    part = full.sharded(ExpertShard(E, ep_size=4, ep_rank=2, layer_name="blocks.0.ffn"))
    assert torch.equal(torch.get_rng_state(), rng)
    assert (part.num_experts, part.first_expert, part.num_global_experts, part.ep_size) == (2, 4, 8, 4)
    for name, p in full.named_parameters():
        q = dict(part.named_parameters())[name]
        assert torch.equal(q, p[4:6]) and q.data_ptr() != p.data_ptr(), name  # a copy of experts 4 and 5
        assert q.requires_grad == p.requires_grad and q.allreduce is False and q.group_name == "ep_size_4", name
    assert part.w_up.device == full.w_up.device and part.layer_name == "blocks.0.ffn" and not part.training
    x, counts = torch.randn(5, 4), torch.tensor([2, 3])
    index = torch.repeat_interleave(torch.arange(2), counts)
    ref = Experts(2, 4, 6, "silu", glu=True, bias=True)
    ref.load_state_dict({k: v[4:6] for k, v in full.state_dict().items()})
    torch.testing.assert_close(part.forward_sorted(x, index, counts), ref.forward_sorted(x, index, counts),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"only a full-size bank of 8 experts can be sharded, this one holds 2"):
        part.sharded(ExpertShard(E, 4, 0))


def test_distribute_shards_through_each_layer_and_names_it():
    model = parallel.distribute(_model(ep=2), _groups(world=4, ep=2, rank=3))
    layers = parallel.moe_layers(model)
    assert [name for name, _ in layers] == ["blocks.0.ffn", "blocks.1.ffn"]
    for name, layer in layers:
        bank = layer.experts
        assert (bank.num_experts, bank.first_expert, bank.ep_group, bank.layer_name) == (4, 4, "ep-group", name)
        assert layer.name == name and layer.router.batch_group == "world-group"
    full = _model(ep=1)  # the same seed: the shard is the second half of one process's experts
    for (_, layer), (_, ref) in zip(layers, parallel.moe_layers(full)):
        assert torch.equal(layer.experts.w_down, ref.experts.w_down[4:])
    shapes = parallel.full_shapes(model)
    assert shapes["blocks.0.ffn.experts.w_up"] == (E, 8, 12)  # checkpoints stay full-size
    with pytest.raises(ValueError, match=r"blocks.0.ffn is already sharded \(expert_parallel=2\)"):
        parallel.shard_experts(model, _groups(world=4, ep=2, rank=3))


def test_distribute_without_expert_parallelism_keeps_the_banks():
    model = _model()
    banks = [id(b) for _, b in parallel.expert_banks(model)]
    parallel.distribute(model, _groups(world=2, ep=1, rank=0))
    assert [id(b) for _, b in parallel.expert_banks(model)] == banks
    assert all(layer.router.batch_group == "world-group" for _, layer in parallel.moe_layers(model))
    parallel.distribute(model, _groups(world=1, ep=1, rank=0))  # one process: back to local statistics
    assert all(layer.router.batch_group is None for _, layer in parallel.moe_layers(model))


def test_split_shard_and_its_error():
    model = parallel.distribute(_model(ep=2), _groups(world=2, ep=2, rank=1))
    bank = model.blocks[0].ffn.experts
    full = torch.arange(E * 3.0).view(E, 3)
    assert torch.equal(parallel.split_shard(full, bank), full[4:])
    with pytest.raises(ValueError, match=r"blocks.0.ffn: a full-size expert tensor has 8 experts, got shape \(6, 3\)"):
        parallel.split_shard(full[:6], bank)


def _params():
    dense = torch.nn.Parameter(torch.zeros(3))
    dense.grad = torch.tensor([1.0, 2.0, 3.0])
    expert = torch.nn.Parameter(torch.zeros(2))
    expert.allreduce = False
    expert.grad = torch.tensor([4.0, 8.0])
    idle = torch.nn.Parameter(torch.zeros(2))  # an expert that got no token anywhere: no gradient yet
    idle.allreduce = False
    return dense, expert, idle


def test_gradient_reduction_sums_over_the_right_groups_and_divides_by_the_world(monkeypatch):
    calls = []

    def all_reduce(t, group=None):  # stands in for 3 other ranks whose gradients are all 10
        calls.append((group, t.numel()))
        t.add_(30.0)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    dense, expert, idle = _params()
    parallel.reduce_gradients([dense, expert, idle, dense], _groups(world=4, ep=2, rank=1))  # dense twice: once
    assert calls == [("world-group", 3), ("expert-dp-group", 4)]  # one bucket each; idle joins with zeros
    assert dense.grad.tolist() == [31 / 4, 32 / 4, 33 / 4]
    assert expert.grad.tolist() == [34 / 4, 38 / 4] and idle.grad.tolist() == [30 / 4, 30 / 4]


def test_global_norm_adds_the_expert_shards_of_the_group_once(monkeypatch):
    def all_reduce(t, group=None):  # the other shard of the group holds expert gradients of squared norm 11
        assert group == "ep-group"
        t.add_(11.0)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    dense, expert, _ = _params()
    norm = parallel.global_grad_norm([dense, expert], _groups(world=2, ep=2, rank=0))
    assert norm.item() == pytest.approx((1 + 4 + 9 + 16 + 64 + 11) ** 0.5, rel=1e-6)


def test_clipping_in_one_process_equals_torch():
    dense, expert, _ = _params()
    ref = [torch.nn.Parameter(torch.zeros_like(p)) for p in (dense, expert)]
    for r, p in zip(ref, (dense, expert)):
        r.grad = p.grad.clone()
    got = parallel.clip_grad_norm([dense, expert], 2.0, None)
    want = torch.nn.utils.clip_grad_norm_(ref, 2.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-6) and got.item() == pytest.approx(94 ** 0.5)
    for r, p in zip(ref, (dense, expert)):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=0)
