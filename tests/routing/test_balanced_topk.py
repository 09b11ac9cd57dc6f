"""Balanced top-k assignment (routing/balanced_topk.py) and BASE layers with k > 1 (routing/base_layers.py):
optimal against the LP (whose optimum is integral: the constraint matrix of a bipartite b-matching is totally
unimodular), exactly balanced, k distinct experts per token, deterministic; the router's plan and gates."""
import itertools
import math

import pytest
import torch

from routing import RouterConfig, build_router
from routing.assignment import auction_assignment, balanced_capacity
from routing.balanced_topk import (AUCTION_REL_EPS, CHECK_SLACK, _kth_margin, balanced_topk_assignment, topk_capacity,
                                   warm_prices)
from routing.topk import select_topk


def _scores(tokens: int, experts: int, seed: int, scale: float = 1.0, common: float = 0.0) -> torch.Tensor:
    """Random scores; common > 0 adds one shared row, so that every token ranks the experts nearly alike."""
    g = torch.Generator().manual_seed(seed)
    return common * torch.randn(1, experts, generator=g) + scale * torch.randn(tokens, experts, generator=g)


def _total(scores: torch.Tensor, expert: torch.Tensor) -> float:
    return float(scores.double().gather(1, expert).sum())


def _lp_optimum(scores: torch.Tensor, k: int, cap: torch.Tensor) -> float:
    """max sum s*x, rows sum to k, columns to cap, 0 <= x <= 1, by scipy's HiGHS."""
    opt = pytest.importorskip("scipy.optimize")
    T, E = scores.shape
    rows = [[1.0 if j // E == t else 0.0 for j in range(T * E)] for t in range(T)]
    cols = [[1.0 if j % E == e else 0.0 for j in range(T * E)] for e in range(E)]
    res = opt.linprog(-scores.double().flatten().numpy(), A_eq=rows + cols, b_eq=[k] * T + cap.tolist(),
                      bounds=(0.0, 1.0), method="highs")
    assert res.status == 0
    return -res.fun


def _brute_force(scores: torch.Tensor, k: int, cap: torch.Tensor, at_most: bool = False) -> float:
    """The best total over every choice of k distinct experts per token meeting the capacities exactly (or, at_most,
    not exceeding them; tests/routing/test_balanced_slack.py), tiny cases."""
    T, E = scores.shape
    s = scores.double().tolist()
    sets = list(itertools.combinations(range(E), k))
    best = -math.inf
    for pick in itertools.product(sets, repeat=T):
        counts = [0] * E
        for chosen in pick:
            for e in chosen:
                counts[e] += 1
        if counts == cap.tolist() or (at_most and all(c <= m for c, m in zip(counts, cap.tolist()))):
            best = max(best, sum(s[t][e] for t, chosen in enumerate(pick) for e in chosen))
    return best


def _check_feasible(expert: torch.Tensor, k: int, cap: torch.Tensor, scores: torch.Tensor) -> None:
    assert expert.shape == (scores.shape[0], k) and expert.dtype == torch.long
    assert torch.equal(torch.bincount(expert.flatten(), minlength=cap.numel()), cap)  # every expert exactly cap[e]
    assert bool((expert.sort(1).values.diff(1) > 0).all())  # k distinct experts per token
    chosen = scores.gather(1, expert)
    assert bool((chosen.diff(1) <= 0).all())  # best score first


def _bound(scores: torch.Tensor, k: int) -> float:
    """T * k * eps * (1 + CHECK_SLACK): the auction's distance to the optimum at the default eps."""
    return scores.shape[0] * k * AUCTION_REL_EPS * float(scores.max() - scores.min()) * (1 + CHECK_SLACK)


@pytest.mark.parametrize("tokens,experts,k", [(3, 3, 2), (4, 4, 2), (4, 3, 2), (3, 4, 3), (5, 4, 2)])
def test_matches_brute_force(tokens, experts, k):
    for seed in range(3):
        scores = _scores(tokens, experts, seed, scale=2.0)
        cap = topk_capacity(tokens, experts, k)
        expert, _ = balanced_topk_assignment(scores, k, cap)
        _check_feasible(expert, k, cap, scores)
        assert _total(scores, expert) == pytest.approx(_brute_force(scores, k, cap), abs=_bound(scores, k) + 1e-9)


@pytest.mark.parametrize("tokens,experts,k,common", [
    (48, 8, 2, 0.0),
    (50, 8, 3, 0.0),  # E does not divide T*k
    (64, 16, 2, 30.0),  # every token ranks the experts nearly alike: the unigram phase of docs/routing_defaults.md
    (40, 16, 8, 0.0),  # fine-grained top-8
    (30, 7, 1, 5.0),  # k = 1 is the transportation problem
])
def test_matches_the_lp_optimum(tokens, experts, k, common):
    scores = _scores(tokens, experts, 11, common=common)
    cap = topk_capacity(tokens, experts, k)
    expert, prices = balanced_topk_assignment(scores, k, cap)
    _check_feasible(expert, k, cap, scores)
    optimum = _lp_optimum(scores, k, cap)
    assert optimum - _bound(scores, k) <= _total(scores, expert) <= optimum + 1e-6
    # The duality certificate: under the prices every token's k experts are within eps of its best k.
    value = scores.double() - prices.double()
    gap = float((value.topk(k, 1).values.sum(1) - value.gather(1, expert).sum(1)).sum())
    assert -1e-9 <= gap <= _bound(scores, k) * (1 + 1e-4)


def test_equals_the_transportation_auction_for_top1():
    scores = _scores(512, 64, 3, common=3.0)
    cap = balanced_capacity(512, 64)
    new, _ = balanced_topk_assignment(scores, 1, cap)
    old, _ = auction_assignment(scores, cap)
    assert torch.equal(torch.bincount(new[:, 0], minlength=64), cap)
    assert _total(scores, new) == pytest.approx(_total(scores, old[:, None]), abs=2 * _bound(scores, 1))


def test_deterministic_and_exactly_balanced_at_scale():
    scores = _scores(2048, 64, 5, scale=0.01, common=1.0)
    cap = topk_capacity(2048, 64, 2)
    a, pa = balanced_topk_assignment(scores, 2, cap)
    b, pb = balanced_topk_assignment(scores.clone(), 2, cap)
    assert torch.equal(a, b) and torch.equal(pa, pb)
    _check_feasible(a, 2, cap, scores)
    assert int(cap.min()) == int(cap.max()) == 64


def test_warm_start_prices_nearly_balance_the_greedy_choice():
    """The dual warm start alone: under its prices the greedy top-k is far closer to balanced than under none."""
    scores = _scores(1024, 32, 8, scale=0.05, common=1.0)
    cap = topk_capacity(1024, 32, 2)

    def excess(p: torch.Tensor) -> int:  # choices above capacity, summed over the experts
        counts = torch.bincount(select_topk(scores - p, 2).flatten(), minlength=32)
        return int((counts - cap).clamp(min=0).sum())

    cold, warm = excess(torch.zeros(32)), excess(warm_prices(scores, 2, cap))
    assert cold > 1000 and warm <= 0.01 * 2048  # WARM_GOOD: at most 1% of the choices over capacity


def test_kth_margin_is_the_kth_best_among_the_others():
    v = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    # k = 2: for e in the top 2 (0, 1) the 2nd best of the others is the 3rd overall (2); else the 2nd (3)
    theta, in_topk = _kth_margin(v, 2)
    assert theta.tolist() == [[2.0, 2.0, 3.0, 3.0]] and in_topk.tolist() == [[True, True, False, False]]


def test_degenerate_inputs():
    cap = topk_capacity(6, 3, 2)
    expert, _ = balanced_topk_assignment(torch.zeros(6, 3), 2, cap)  # every assignment is optimal
    _check_feasible(expert, 2, cap, torch.zeros(6, 3))
    expert, _ = balanced_topk_assignment(torch.randn(6, 2), 2, topk_capacity(6, 2, 2))  # k = E: everyone, all
    assert expert.tolist() == [[0, 1]] * 6
    cap = topk_capacity(2, 8, 2)  # T*k < E: experts without a slot get nobody
    expert, prices = balanced_topk_assignment(torch.randn(2, 8), 2, cap)
    assert torch.equal(torch.bincount(expert.flatten(), minlength=8), cap) and math.isinf(float(prices[-1]))
    with pytest.raises(ValueError, match="sum to"):
        balanced_topk_assignment(torch.randn(4, 4), 2, torch.full((4,), 1))
    with pytest.raises(ValueError, match="top_k=5"):
        balanced_topk_assignment(torch.randn(4, 4), 5, torch.full((4,), 5))
    with pytest.raises(FloatingPointError, match="non-finite"):
        balanced_topk_assignment(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), 1, topk_capacity(2, 2, 1))


# ---------------------------------------------------------------- BASE layers with k > 1


def _router(k: int, experts: int = 8, **cfg):
    torch.manual_seed(0)
    router = build_router(16, experts, RouterConfig(name="base", top_k=k, aux_loss_coef=0.0, z_loss_coef=0.0, **cfg))
    torch.nn.init.normal_(router.gate.weight, 0.0, 1.0)
    return router


def test_base_topk_training_plan_is_balanced_and_eval_is_greedy():
    router, x = _router(2), torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
    plan = router(x)
    assert plan.counts.tolist() == [10] * 8 and plan.capacity == 10 and plan.token_index.numel() == 80
    logits = router.logits(x)
    w = torch.sigmoid(logits[plan.token_index, plan.expert_index])
    assert torch.allclose(plan.weight, w)  # BASE's gate, per chosen expert
    pairs = set(zip(plan.token_index.tolist(), plan.expert_index.tolist()))
    assert len(pairs) == 80  # distinct (token, expert) pairs: k distinct experts per token
    router.eval()
    plan = router(x)
    greedy = select_topk(logits, 2)
    assert sorted(zip(plan.token_index.tolist(), plan.expert_index.tolist())) == sorted(
        (t, int(e)) for t in range(40) for e in greedy[t])


def test_base_topk_softmax_gate_sums_to_one_per_token():
    router, x = _router(2, score_fn="softmax"), torch.randn(40, 16)
    plan = router(x)
    per_token = torch.zeros(40).index_add_(0, plan.token_index, plan.weight)
    assert torch.allclose(per_token, torch.ones(40))


def test_base_topk_config_errors():
    with pytest.raises(ValueError, match="base_solver=auction"):
        RouterConfig(name="base", top_k=2, base_solver="sinkhorn")
    with pytest.raises(ValueError, match="score_fn=sigmoid"):
        RouterConfig(name="base", top_k=1, score_fn="softmax")
    with pytest.raises(ValueError, match="top_k=9 exceeds the 8 experts"):
        build_router(16, 8, RouterConfig(name="base", top_k=9))
