"""Recipes: the exact ones give the dense model's logits at step 0 (max |Δ| < 1e-5), the inexact ones report a gap;
a recipe that does not fit raises with the field named."""
from __future__ import annotations

import pytest
import torch

from moe.layer import MoELayer
from routing.config import RouterConfig
from tests.upcycle.conftest import TINY, ids_for, make_hf
from upcycle import UpcycleConfig, down_factor, exactness, read_dense, step0_check, upcycle


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_hf("llama", path)
    return read_dense(path).build_model()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    make_hf("gpt2", path)
    return read_dense(path).build_model()


def _check(dense, cfg):
    moe = upcycle(dense, cfg)
    return step0_check(dense, moe, ids_for(TINY["vocab"], length=33), cfg.recipe, *exactness(cfg)), moe


EXACT = {
    "copy_default_router": dict(recipe="copy"),  # N(0, 0.02^2), Komatsuzaki et al.'s router init
    "copy_zero_router": dict(recipe="copy", router_init_std=0.0),
    "copy_random_router": dict(recipe="copy", router_init_std=0.5),
    "copy_renormalised_softmax_topk": dict(recipe="copy", router_init_std=0.5,
                                           router=RouterConfig(order="softmax_topk", renormalize=True)),
    "copy_softmax_topk_zero_router": dict(recipe="copy", router_init_std=0.0,
                                          router=RouterConfig(order="softmax_topk", top_k=3)),
    "copy_top1_scaled": dict(recipe="copy", router_init_std=0.5, router=RouterConfig(top_k=1, scale=2.5)),
    "copy_all_layers_einsum": dict(recipe="copy", layers="all", dispatcher="einsum", router_init_std=0.5),
    "granular_G2": dict(recipe="granular", shards=2, num_experts=8, router=RouterConfig(top_k=2)),
    "granular_G4_k4": dict(recipe="granular", shards=4, num_experts=8, router=RouterConfig(top_k=4)),
    "granular_renormalised": dict(recipe="granular", shards=2, router=RouterConfig(order="softmax_topk", renormalize=True, top_k=4)),
    "shared": dict(recipe="shared"),
    "shared_renormalised_softmax_topk": dict(recipe="shared", router=RouterConfig(order="softmax_topk", renormalize=True)),
    "granular_G2_default_router_k4": dict(recipe="granular", shards=2, router=RouterConfig(top_k=4)),
    "shared_gate_G2": dict(recipe="shared", shared_gate=True, shards=2, shared_fraction=0.3, router_init_std=0.5),
}


@pytest.mark.parametrize("model", ["llama", "gpt2"])
@pytest.mark.parametrize("name", list(EXACT))
def test_exact_recipes_equal_dense(request, model, name):
    dense = request.getfixturevalue(model)
    report, moe = _check(dense, UpcycleConfig(**EXACT[name]))
    assert report.expected_exact, report.reason
    assert report.max_abs_diff < 1e-5, report.text()
    assert report.passed and "EXACT" in report.text()
    assert abs(report.moe_loss - report.dense_loss) < 1e-5
    assert moe.cfg.is_moe and all(isinstance(moe.blocks[i].ffn, MoELayer) for i in moe.cfg.sparse_layers)


@pytest.mark.parametrize("kw", [dict(recipe="noise", noise_std=0.05), dict(recipe="drop", drop_ratio=0.5),
                                dict(recipe="copy", router_init_std=0.5, router=RouterConfig(order="softmax_topk")),
                                dict(recipe="copy", router=RouterConfig(order="softmax_topk"))])  # default random router
def test_inexact_recipes_report_a_gap(llama, kw):
    report, _ = _check(llama, UpcycleConfig(**kw))
    assert not report.expected_exact and report.passed
    assert report.max_abs_diff > 1e-4 and report.moe_loss != report.dense_loss
    assert "INEXACT" in report.text()


def test_layers_choice(llama):
    for spec, want in (("every:2", (1, 3)), ("last:1", (3,)), ("0,2", (0, 2)), ("all", (0, 1, 2, 3))):
        moe = upcycle(llama, UpcycleConfig(layers=spec))
        assert moe.cfg.sparse_layers == want
        assert [isinstance(b.ffn, MoELayer) for b in moe.blocks] == [i in want for i in range(4)]


def test_copy_experts_are_the_ffn(llama):
    moe = upcycle(llama, UpcycleConfig(num_experts=4))
    ffn, ex = llama.blocks[1].ffn, moe.blocks[1].ffn.experts
    for e in range(4):
        assert torch.equal(ex.w_up[e], ffn.up.weight.t()) and torch.equal(ex.w_gate[e], ffn.gate.weight.t())
        assert torch.equal(ex.w_down[e], ffn.down.weight.t())
    w = moe.blocks[1].ffn.router.gate.weight  # [E, d]: N(0, 0.02^2) by default
    assert torch.count_nonzero(w) == w.numel() and 0.015 < float(w.detach().std()) < 0.025
    zero = upcycle(llama, UpcycleConfig(num_experts=4, router_init_std=0.0)).blocks[1].ffn.router.gate.weight
    assert torch.count_nonzero(zero) == 0  # a zero router only on request
    # Everything outside the sparse FFNs is the dense model's.
    assert torch.equal(moe.blocks[1].attn.q_proj.weight, llama.blocks[1].attn.q_proj.weight)


def test_granular_layout_and_factors(llama):
    cfg = UpcycleConfig(recipe="granular", shards=2, num_experts=8, router=RouterConfig(top_k=2))
    moe = upcycle(llama, cfg)
    layer, ffn = moe.blocks[1].ffn, llama.blocks[1].ffn
    assert layer.experts.w_up.shape == (8, TINY["d"], TINY["ff"] // 2)
    assert torch.equal(layer.experts.w_up[3], ffn.up.weight[32:].t())  # expert 3 = group 1, shard 1
    assert torch.allclose(layer.experts.w_down[2], 2 * ffn.down.weight[:, :32].t())
    w = layer.router.gate.weight
    assert torch.equal(w[0], w[1]) and torch.equal(w[6], w[7]) and not torch.equal(w[1], w[2])  # tied groups
    assert down_factor(cfg) == 2
    raw = UpcycleConfig(num_experts=8, router=RouterConfig(order="softmax_topk", top_k=2, scale=2.0))
    assert down_factor(raw) == 8 / (2 * 2.0)


def test_drop_reinitialises_a_fraction_per_expert(llama):
    moe = upcycle(llama, UpcycleConfig(recipe="drop", drop_ratio=0.25, num_experts=4))
    ffn, ex = llama.blocks[1].ffn, moe.blocks[1].ffn.experts
    changed = []
    for e in range(4):
        cols = (ex.w_up[e] != ffn.up.weight.t()).any(0)
        rows = (ex.w_down[e] != ffn.down.weight.t()).any(1)
        assert torch.equal(cols, rows) and int(cols.sum()) == 16  # r * f = 0.25 * 64 neurons
        changed.append(cols)
    assert not all(torch.equal(changed[0], c) for c in changed[1:])  # chosen per expert


@pytest.mark.parametrize("kw, match", [
    (dict(recipe="granular", shards=128, num_experts=128, router=RouterConfig(top_k=128)), "more than the FFN's 64 hidden units"),
    (dict(recipe="granular", shards=3, num_experts=6, router=RouterConfig(top_k=3)), "does not divide the FFN hidden width"),
    (dict(recipe="granular", shards=2, num_experts=7), "multiple of shards=2"),
    (dict(recipe="granular", shards=2, num_experts=8, router=RouterConfig(top_k=3)), "top_k a multiple of 2"),
    (dict(recipe="granular", shards=2, router_init_std=0.0), "router_init_std > 0"),
    (dict(layers="none"), "selects no layer"),
    (dict(router=RouterConfig(top_k=9)), "top_k=9 is larger than moe.num_experts=8"),
])
def test_recipes_that_do_not_fit(llama, kw, match):
    with pytest.raises(ValueError, match=match):
        upcycle(llama, UpcycleConfig(**kw))


@pytest.mark.parametrize("kw, match", [
    (dict(recipe="magic"), "recipe='magic' is not a known recipe"),
    (dict(recipe="granular"), "needs shards >= 2"),
    (dict(recipe="copy", shards=2), "shards=2 applies to recipe=granular"),
    (dict(recipe="drop", drop_ratio=1.5), "drop_ratio"),
    (dict(recipe="shared", shared_fraction=1.0), "shared_fraction"),
])
def test_bad_upcycle_config(kw, match):
    with pytest.raises(ValueError, match=match):
        UpcycleConfig(**kw)


def test_already_sparse_is_refused(llama):
    moe = upcycle(llama, UpcycleConfig())
    with pytest.raises(ValueError, match="already sparse"):
        upcycle(moe, UpcycleConfig())


def test_step0_report_counts_the_experts_each_layer_uses(llama):
    """The default random router spreads the sample over every expert; a zero router ties them all, and the tie rule
    (lowest index first) sends every token to experts 0 and 1 of every layer: the report names the collapse."""
    ids = ids_for(TINY["vocab"], length=33)  # [2, 33]: 64 predicted positions, top-2 -> 128 assignments per layer
    spread, _ = _check(llama, UpcycleConfig(recipe="copy"))
    assert sorted(spread.tokens_per_expert) == [1, 3]
    assert spread.experts_used == {1: 8, 3: 8} and spread.all_experts_used
    assert all(sum(c) == 2 * 64 for c in spread.tokens_per_expert.values())
    assert "layer   1: 8/8" in spread.text() and spread.to_dict()["experts_used"] == {1: 8, 3: 8}
    cfg = UpcycleConfig(recipe="copy", router_init_std=0.0)
    collapsed = step0_check(llama, upcycle(llama, cfg), ids, cfg.recipe, *exactness(cfg))
    assert collapsed.max_abs_diff < 1e-5  # still exact: identical experts, weights summing to 1
    assert collapsed.tokens_per_expert == {1: [64, 64, 0, 0, 0, 0, 0, 0], 3: [64, 64, 0, 0, 0, 0, 0, 0]}
    assert collapsed.experts_used == {1: 2, 3: 2} and not collapsed.all_experts_used
    assert "12 experts in 2 of 2 sparse layers receive no token" in collapsed.text()
    assert "as a zero router (router_init_std=0) does" in collapsed.text()
