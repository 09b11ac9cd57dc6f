"""Hash routing: a fixed, balanced token-id -> expert table that travels in checkpoints; no gate, no losses."""
import pytest
import torch

from moe.checkpoint import load_model, save_checkpoint
from moe.layer import MoELayer
from moe.model import Transformer
from routing import RouterConfig, build_router
from routing.hash import HashRouter, hash_table
from tests.routing.test_expert_choice import B, D, E, S, VOCAB, assert_dispatchers_agree, model_cfg, train_one_step
from tests.routing.test_topk import check_plan_invariants

T = 40


def _hash(seed: int = 0, vocab: int = VOCAB, num_experts: int = E, **cfg) -> HashRouter:
    return build_router(D, num_experts, RouterConfig(name="hash", top_k=1, hash_seed=seed, **cfg), vocab_size=vocab)


def _ids(seed: int = 1, t: int = T, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (t,), generator=torch.Generator().manual_seed(seed))


def _x(t: int = T) -> torch.Tensor:
    return torch.randn(t, D, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("vocab,num_experts", [(32, 4), (257, 8), (50, 3), (3, 4), (1, 2)])
def test_table_is_balanced(vocab, num_experts):
    table = hash_table(vocab, num_experts, seed=0)
    assert table.shape == (vocab,) and table.dtype == torch.long
    assert ((table >= 0) & (table < num_experts)).all()
    load = torch.bincount(table, minlength=num_experts)
    assert load.max() - load.min() <= 1
    assert load.sum() == vocab


def test_table_depends_on_seed_only():
    assert torch.equal(hash_table(100, 4, 0), hash_table(100, 4, 0))
    assert not torch.equal(hash_table(100, 4, 0), hash_table(100, 4, 1))
    assert torch.equal(_hash(seed=5).table, _hash(seed=5).table)


def test_same_token_same_expert_and_plan_invariants():
    router = _hash()
    ids = torch.cat([_ids(), _ids()])  # every id twice
    x = torch.cat([_x(), -_x()])  # ... with different hidden states: the hidden state plays no part
    plan = router(x, ids)
    check_plan_invariants(plan, 2 * T, E)
    assert plan.token_index.numel() == 2 * T and plan.capacity is None
    expert_of = torch.empty(2 * T, dtype=torch.long)
    expert_of[plan.token_index] = plan.expert_index
    assert torch.equal(expert_of, router.table[ids])
    assert torch.equal(expert_of[:T], expert_of[T:])
    # rows within an expert keep token order
    for e in range(E):
        seg = plan.token_index[plan.expert_index == e]
        assert torch.equal(seg, seg.sort().values)


def test_weight_one_no_losses_one_hot_stats():
    router = _hash()
    plan = router(_x(), _ids())
    assert plan.weight.dtype == torch.float32 and torch.equal(plan.weight, torch.ones(T))
    assert not plan.weight.requires_grad
    assert plan.aux_losses == {}
    st = plan.stats
    assert st["router_entropy"].item() == 0.0 and st["top1_prob"].item() == 1.0
    assert st["dropped_fraction"].item() == 0.0
    assert st["tokens_per_expert"].tolist() == [float(c) for c in torch.bincount(router.table[_ids()], minlength=E)]
    assert torch.equal(_hash(scale=0.5)(_x(), _ids()).weight, torch.full((T,), 0.5))


def test_no_parameters_and_a_persistent_buffer():
    router = _hash()
    assert router.gate is None and list(router.parameters()) == []
    assert list(router.state_dict()) == ["table"]


def test_table_survives_state_dict_round_trip():
    src = _hash(seed=3)
    dst = _hash(seed=4)  # a different seed: only the loaded table may decide
    assert not torch.equal(src.table, dst.table)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.table, src.table)
    assert torch.equal(dst(_x(), _ids()).expert_index, src(_x(), _ids()).expert_index)


def test_table_survives_checkpoint_and_dtype_cast(tmp_path):
    torch.manual_seed(0)
    model = Transformer(model_cfg(RouterConfig(name="hash", top_k=1, aux_loss_coef=0.0, z_loss_coef=0.0)))
    router = model.blocks[0].ffn.router
    with torch.no_grad():
        router.table.copy_(router.table.roll(1))  # a table no seed reproduces
    save_checkpoint(tmp_path / "ckpt", model)
    loaded = load_model(tmp_path / "ckpt")
    assert torch.equal(loaded.blocks[0].ffn.router.table, router.table)
    # every layer draws its table from model.moe.router.hash_seed and its block index; only layer 0's was changed
    assert torch.equal(loaded.blocks[1].ffn.router.table, hash_table(VOCAB, E, 0, layer=1))
    assert not torch.equal(loaded.blocks[1].ffn.router.table, router.table)
    loaded.to(torch.bfloat16)
    assert loaded.blocks[0].ffn.router.table.dtype == torch.long


def test_missing_token_ids_raise():
    with pytest.raises(ValueError, match="hash routing needs token ids"):
        _hash()(_x())
    layer = MoELayer(model_cfg(RouterConfig(name="hash", top_k=1)))
    with pytest.raises(ValueError, match="hash routing needs token ids"):
        layer(torch.randn(B, S, D))
    with pytest.raises(ValueError, match="token_ids of shape"):
        _hash()(_x(), _ids(t=T - 1))


def test_build_errors():
    with pytest.raises(ValueError, match="vocabulary size"):
        build_router(D, E, RouterConfig(name="hash", top_k=1))
    with pytest.raises(ValueError, match="model.moe.router.top_k=2"):  # k > 1 is not built: it says which field to change
        build_router(D, E, RouterConfig(name="hash", top_k=2), vocab_size=VOCAB)
    with pytest.raises(ValueError, match="model.moe.router.top_k=2"):
        MoELayer(model_cfg(RouterConfig(name="hash", top_k=2)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dispatchers_agree(training):
    results = assert_dispatchers_agree(RouterConfig(name="hash", top_k=1, aux_loss_coef=0.0, z_loss_coef=0.0), training)
    assert "gate" not in results["einsum"][1]
    check_plan_invariants(results["einsum"][2], B * S, E)


def test_training_step():
    losses = train_one_step(RouterConfig(name="hash", top_k=1, aux_loss_coef=0.0, z_loss_coef=0.0), steps=3)
    assert losses[-1] < losses[0]
