"""GShard random routing (model.moe.router.random_second): the second expert kept with probability min(1, 2 * g2)."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import conf
from routing import RouterConfig, build_router
from routing.topk import TopKRouter, gshard_keep_second, topk_gating
from tests.routing.test_expert_choice import B, S, assert_dispatchers_agree, train_one_step
from tests.routing.test_topk import check_plan_invariants

D, E = 8, 4
GSHARD = dict(top_k=2, order="softmax_topk", renormalize=True, random_second=True, aux_loss_coef=0.0, z_loss_coef=0.0)


def _router(seed: int = 0, std: float = 1.0, **cfg) -> TopKRouter:
    torch.manual_seed(seed)
    router = build_router(D, E, RouterConfig(**{**GSHARD, **cfg}))
    torch.nn.init.normal_(router.gate.weight, 0.0, std)
    return router


def _x(t: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(t, D, generator=torch.Generator().manual_seed(seed))


def _g2(router, x) -> torch.Tensor:
    _, w, _ = topk_gating(x @ router.gate.weight.t(), 2, "softmax_topk", renormalize=True)
    return w[:, 1]


@pytest.mark.parametrize("std", [0.3, 1.0, 3.0])
def test_keep_rate_matches_two_g2(std):
    T = 4000
    router = _router(std=std)
    x = _x(T)
    torch.manual_seed(123)
    plan = router(x)
    check_plan_invariants(plan, T, E)
    expected = torch.clamp(2 * _g2(router, x), max=1.0).mean().item()
    rate = plan.kept[:, 1].float().mean().item()
    assert rate == pytest.approx(expected, abs=0.03)  # ~4 standard errors of a mean of 4000 Bernoullis
    assert 0.05 < expected < 0.95  # the case is not trivial
    assert plan.kept[:, 0].all()  # first choices are never dropped (dropless)
    assert plan.token_index.numel() == T + int(plan.kept[:, 1].sum())
    assert plan.stats["dropped_fraction"].item() == pytest.approx(1 - (T + plan.kept[:, 1].sum().item()) / (2 * T))


def test_draw_uses_the_global_rng():
    router = _router()
    x = _x(200)
    torch.manual_seed(5)
    a = router(x)
    torch.manual_seed(5)
    b = router(x)
    torch.manual_seed(6)
    c = router(x)
    assert torch.equal(a.token_index, b.token_index) and torch.equal(a.kept, b.kept)
    assert not torch.equal(a.kept, c.kept)
    # ... and it is exactly gshard_keep_second on the top-2 gates, drawn once per forward
    torch.manual_seed(5)
    _, w, _ = topk_gating(x @ router.gate.weight.t(), 2, "softmax_topk", renormalize=True)
    assert torch.equal(a.kept[:, 1], gshard_keep_second(w))


def test_gshard_keep_second_known_cases():
    # g2 = 1/2 (equal gates) is always kept; g2 = 0 never; unnormalised gates are normalised first
    w = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.3, 0.3]])
    keep = gshard_keep_second(w.repeat(1000, 1)).view(1000, 3)
    assert keep[:, 0].all() and not keep[:, 1].any() and keep[:, 2].all()


def test_uniform_router_keeps_every_second_choice():
    router = _router()
    torch.nn.init.zeros_(router.gate.weight)  # uniform probabilities: g2 = 1/2 for every token
    plan = router(_x(50))
    assert plan.kept.all() and plan.token_index.numel() == 100


def test_eval_keeps_both():
    router = _router().eval()
    x = _x(300)
    plan = router(x)
    assert plan.kept.all() and plan.token_index.numel() == 600
    plain = _router(random_second=False).eval()(x)
    assert torch.equal(plan.token_index, plain.token_index) and torch.equal(plan.expert_index, plain.expert_index)
    torch.testing.assert_close(plan.weight, plain.weight, rtol=0, atol=0)


@pytest.mark.parametrize("policy", ["position", "probs"])
def test_dropped_second_choice_takes_no_capacity(policy):
    """Capacity applies to the surviving choices only: per expert, min(C, first choices + kept second choices)."""
    T = 64
    router = _router(capacity_factor=0.5, min_capacity=1, drop_policy=policy)  # C = ceil(0.5 * 64 * 2 / 4) = 16
    x = _x(T)
    torch.manual_seed(9)
    plan = router(x)
    check_plan_invariants(plan, T, E)
    torch.manual_seed(9)
    _, w, idx = topk_gating(x @ router.gate.weight.t(), 2, "softmax_topk", renormalize=True)
    keep2 = gshard_keep_second(w)
    load = torch.bincount(idx[:, 0], minlength=E) + torch.bincount(idx[keep2, 1], minlength=E)
    assert torch.equal(plan.counts, load.clamp(max=16))
    assert (plan.counts == 16).any(), "the case must fill an expert"
    assert not plan.kept[~keep2, 1].any()
    # what a plan row carries is a kept choice: rows == kept.sum()
    assert plan.token_index.numel() == int(plan.kept.sum())
    rows = set(zip(plan.token_index.tolist(), plan.expert_index.tolist()))
    kept_pairs = {(t, int(idx[t, j])) for t in range(T) for j in range(2) if plan.kept[t, j]}
    assert rows == kept_pairs


def test_weights_of_kept_rows_are_the_renormalised_gates():
    router = _router()
    x = _x(100)
    plan = router(x)
    _, w, idx = topk_gating(x @ router.gate.weight.t(), 2, "softmax_topk", renormalize=True)
    ref = torch.zeros(100, E).scatter_(1, idx, w)
    torch.testing.assert_close(plan.weight, ref[plan.token_index, plan.expert_index])


def test_random_second_needs_top2():
    with pytest.raises(ValueError, match="model.moe.router.random_second"):
        RouterConfig(top_k=1, random_second=True)


def test_gshard_yaml():
    node = OmegaConf.to_container(OmegaConf.load(Path(conf.__file__).parent / "routing" / "gshard.yaml"))
    cfg = RouterConfig(**node)
    assert (cfg.name, cfg.top_k, cfg.order, cfg.renormalize) == ("topk", 2, "softmax_topk", True)
    assert cfg.random_second
    assert (cfg.capacity_factor, cfg.drop_policy) == (2.0, "position")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cf", [0.0, 1.0], ids=["dropless", "cf1"])
def test_dispatchers_agree(cf, training):
    router = RouterConfig(**{**GSHARD, "capacity_factor": cf, "min_capacity": 1, "aux_loss_coef": 0.01})
    results = assert_dispatchers_agree(router, training)
    plan = results["einsum"][2]
    check_plan_invariants(plan, B * S, E)
    if training:
        assert not plan.kept[:, 1].all(), "the training case must drop some second choices"


def test_training_step():
    losses = train_one_step(RouterConfig(**{**GSHARD, "capacity_factor": 2.0, "drop_policy": "position"}), steps=3)
    assert losses[-1] < losses[0]
