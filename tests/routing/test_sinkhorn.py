"""Sinkhorn routing (Megatron-LM): the normalised matrix, selection by balanced scores in training, sigmoid
(k=1) or softmax (k>1) combine weights, top-k of the activation at evaluation, capacity, dispatchers."""
import math

import pytest
import torch

from routing import RouterConfig, build_router
from routing.sinkhorn import SinkhornRouter, sinkhorn, sinkhorn_log_duals
from routing.stats import STAT_KEYS
from tests.routing.test_base_layers import check_dispatchers_agree, check_one_training_step
from tests.routing.test_topk import check_plan_invariants

T, D, E = 32, 8, 4
TOL = dict(rtol=1e-5, atol=1e-5)


def _router(seed: int = 0, **cfg) -> SinkhornRouter:
    torch.manual_seed(seed)
    cfg = {"top_k": 1, "aux_loss_coef": 0.0, "z_loss_coef": 0.0, **cfg}
    router = build_router(D, E, RouterConfig(name="sinkhorn", **cfg))
    torch.nn.init.normal_(router.gate.weight, 0.0, 1.0)
    with torch.no_grad():
        router.gate.weight[0, 0] = 2.0  # expert 0 likes the first feature, which _skewed_x makes large
    return router


def _skewed_x(seed: int = 1, t: int = T) -> torch.Tensor:
    """Inputs whose first feature is large: most tokens prefer expert 0 under greedy routing."""
    x = torch.randn(t, D, generator=torch.Generator().manual_seed(seed))
    x[:, 0] += 2.0
    return x


def _chosen(plan, t: int, k: int) -> torch.Tensor:
    """[t, k] experts of each token, in ascending expert order (the plan's rows are expert-major)."""
    rows = sorted(zip(plan.token_index.tolist(), plan.expert_index.tolist()))
    return torch.tensor([e for _, e in rows]).reshape(t, k)


# ---------------------------------------------------------------- the normalised matrix

@pytest.mark.parametrize("tokens,experts,scale", [(32, 4, 1.0), (64, 8, 2.0), (30, 4, 0.5)])
def test_sinkhorn_marginals(tokens, experts, scale):
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(tokens)) * scale
    P = sinkhorn(logits, iters=20)
    assert P.shape == (tokens, experts) and not P.requires_grad
    torch.testing.assert_close(P.sum(1), torch.ones(tokens), rtol=0, atol=1e-5)  # rows: exact (last step)
    torch.testing.assert_close(P.sum(0), torch.full((experts,), tokens / experts), rtol=2e-3, atol=0)  # columns
    # more iterations converge further
    torch.testing.assert_close(sinkhorn(logits, iters=200).sum(0), torch.full((experts,), tokens / experts),
                               rtol=1e-5, atol=1e-5)


def test_sinkhorn_is_a_diagonal_scaling_of_exp_logits():
    logits = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    alpha, beta = sinkhorn_log_duals(logits, iters=20)
    P = sinkhorn(logits, iters=20)
    torch.testing.assert_close(P, torch.exp(logits + alpha[:, None] + beta[None, :]), **TOL)
    # the same ranking of experts within a row as logits + beta
    assert torch.equal(P.argmax(1), (logits + beta).argmax(1))


def test_sinkhorn_custom_column_mass_and_large_logits():
    logits = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    mass = torch.tensor([4.0, 3.0, 2.0, 1.0])
    torch.testing.assert_close(sinkhorn(logits, 100, col_mass=mass).sum(0), mass, rtol=1e-3, atol=1e-3)
    big = torch.randn(16, 4, generator=torch.Generator().manual_seed(2)) * 300  # exp() would overflow fp32
    P = sinkhorn(big, 20)
    assert torch.isfinite(P).all()
    torch.testing.assert_close(P.sum(1), torch.ones(16), rtol=0, atol=1e-4)


# ---------------------------------------------------------------- training: balanced selection, sigmoid weights

@pytest.mark.parametrize("k", [1, 2])
def test_training_selects_topk_of_sinkhorn_scores(k):
    router = _router(top_k=k)
    x = _skewed_x()
    plan = router(x)
    check_plan_invariants(plan, T, E)
    logits = (x @ router.gate.weight.t()).detach()
    expected = sinkhorn(logits, 20).topk(k, -1).indices.sort(-1).values
    assert torch.equal(_chosen(plan, T, k), expected)
    assert plan.token_index.numel() == T * k and plan.capacity is None
    assert bool(plan.kept.all())


def test_training_weights_are_sigmoid_at_chosen_experts_k1():
    router = _router(top_k=1)
    x = _skewed_x()
    plan = router(x)
    logits = x @ router.gate.weight.t()
    torch.testing.assert_close(plan.weight, torch.sigmoid(logits[plan.token_index, plan.expert_index]), **TOL)
    plan.weight.sum().backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def test_training_weights_are_softmax_at_chosen_experts_k2():
    """Megatron's _sinkhorn_activation: softmax over all E experts when k > 1 (not renormalised over the k)."""
    router = _router(top_k=2)
    x = _skewed_x()
    plan = router(x)
    probs = torch.softmax(x @ router.gate.weight.t(), -1)
    torch.testing.assert_close(plan.weight, probs[plan.token_index, plan.expert_index], **TOL)
    per_token = torch.zeros(T).index_add_(0, plan.token_index, plan.weight.detach())
    assert (per_token < 1).all()


def test_training_balances_better_than_greedy():
    router = _router(top_k=1)
    x = _skewed_x()
    train_plan = router(x)
    router.eval()
    eval_plan = router(x)
    # seeded numbers: greedy sends 24 of 32 tokens to expert 0; Sinkhorn's selection spreads them out (the
    # balance is of the fractional plan's mass, so the top-1 counts are close to, not exactly, T/E)
    assert eval_plan.counts.tolist() == [24, 3, 0, 5]
    assert train_plan.counts.tolist() == [8, 7, 9, 8]
    assert eval_plan.stats["max_load"].item() == pytest.approx(24 * 4 / 32)
    assert train_plan.stats["max_load"].item() == pytest.approx(9 * 4 / 32)


# ---------------------------------------------------------------- evaluation: top-k of the activation

@pytest.mark.parametrize("k", [1, 2])
def test_eval_is_topk_of_activation(k):
    router = _router(top_k=k)
    router.eval()
    x = _skewed_x()
    plan = router(x)
    check_plan_invariants(plan, T, E)
    logits = x @ router.gate.weight.t()
    act = torch.sigmoid(logits) if k == 1 else torch.softmax(logits, -1)
    assert torch.equal(_chosen(plan, T, k), act.topk(k, -1).indices.sort(-1).values)
    torch.testing.assert_close(plan.weight, act[plan.token_index, plan.expert_index], **TOL)


def test_scale_multiplies_weights():
    x = _skewed_x()
    a, b = _router()(x), _router(scale=2.5)(x)
    assert torch.equal(a.token_index, b.token_index)
    torch.testing.assert_close(b.weight, 2.5 * a.weight, **TOL)


# ---------------------------------------------------------------- capacity, losses, statistics

@pytest.mark.parametrize("cf,policy", [(1.0, "probs"), (0.5, "position"), (-0.5, "probs")])
@pytest.mark.parametrize("train", [True, False])
def test_capacity(cf, policy, train):
    router = _router(top_k=2, capacity_factor=cf, min_capacity=1, drop_policy=policy)
    router.train(train)
    plan = router(_skewed_x())
    check_plan_invariants(plan, T, E)
    C = math.ceil(abs(cf) * T * 2 / E)
    assert plan.capacity == (C if cf > 0 else None)
    assert (plan.counts <= C).all()
    assert plan.stats["dropped_fraction"].item() == pytest.approx(1 - plan.token_index.numel() / (2 * T))
    if cf < 1:
        assert plan.stats["dropped_fraction"].item() > 0


def test_eval_capacity_factor():
    router = _router(top_k=1, capacity_factor=1.0, eval_capacity_factor=0.0, min_capacity=1)
    assert router(_skewed_x()).capacity == 8
    router.eval()
    plan = router(_skewed_x())
    assert plan.capacity is None and plan.token_index.numel() == T


def test_losses_follow_coefficients():
    assert _router()(_skewed_x()).aux_losses == {}
    router = _router(aux_loss_coef=0.1, z_loss_coef=0.01)
    torch.nn.init.zeros_(router.gate.weight)
    plan = router(_skewed_x())
    assert plan.aux_losses["load_balancing_loss"].item() == pytest.approx(0.1, rel=1e-6)  # uniform probs: loss 1
    assert plan.aux_losses["router_z_loss"].item() == pytest.approx(0.01 * math.log(E) ** 2, rel=1e-6)


def test_stats_schema():
    router = _router()
    plan = router(_skewed_x())
    for key in STAT_KEYS:
        assert key in plan.stats and not plan.stats[key].requires_grad, key
    probs = torch.softmax(_skewed_x() @ router.gate.weight.t(), -1).detach()
    assert plan.stats["router_entropy"].item() == pytest.approx(
        float(-(probs * probs.log()).sum(-1).mean()), rel=1e-5)


# ---------------------------------------------------------------- dispatchers and a training step

@pytest.mark.parametrize("cf", [0.0, 1.0], ids=["dropless", "cf1"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_dispatchers_agree(k, cf, train):
    check_dispatchers_agree(dict(name="sinkhorn", top_k=k, capacity_factor=cf, min_capacity=1,
                                 aux_loss_coef=0.0, z_loss_coef=0.0), train=train)


@pytest.mark.parametrize("k", [1, 2])
def test_one_training_step(k):
    check_one_training_step(dict(name="sinkhorn", top_k=k, aux_loss_coef=0.0, z_loss_coef=0.001))
