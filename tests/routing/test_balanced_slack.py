"""Balanced top-k with a capacity slack (routing/balanced_topk.py, slack_capacity; routing=balanced_topk with
capacity_factor=c): every token to k distinct experts, every expert AT MOST ceil(c*T*k/E) of the choices, the
assignment maximising the summed scores; optimal against the LP and a brute force, on the floor auction and on
its dummy-row fallback; deterministic; the router's plan and its config check."""
import pytest
import torch

import routing.balanced_topk as bt
from routing import RouterConfig, build_router
from routing.balanced_topk import CHECK_SLACK, DUMMY_SPREAD, balanced_topk_assignment, slack_capacity, topk_capacity
from tests.routing.test_balanced_topk import _brute_force


def _scores(tokens: int, experts: int, seed: int, common: float = 0.0) -> torch.Tensor:
    """Random scores; common > 0 adds one shared row (every token ranks the experts nearly alike)."""
    g = torch.Generator().manual_seed(seed)
    return common * torch.randn(1, experts, generator=g) + torch.randn(tokens, experts, generator=g)


def _total(scores: torch.Tensor, expert: torch.Tensor) -> float:
    return float(scores.double().gather(1, expert).sum())


def _eps(scores: torch.Tensor) -> float:
    return bt.AUCTION_REL_EPS * float(scores.max() - scores.min())


def _lp_optimum(scores: torch.Tensor, k: int, cap: torch.Tensor) -> float:
    """max sum s*x, rows sum to k, columns at most cap, 0 <= x <= 1, by scipy's HiGHS (integral: TU matrix)."""
    opt = pytest.importorskip("scipy.optimize")
    np = pytest.importorskip("numpy")
    T, E = scores.shape
    rows = np.zeros((T, T * E))
    cols = np.zeros((E, T * E))
    for t in range(T):
        rows[t, t * E:(t + 1) * E] = 1.0
    for e in range(E):
        cols[e, e::E] = 1.0
    res = opt.linprog(-scores.double().flatten().numpy(), A_eq=rows, b_eq=[k] * T, A_ub=cols, b_ub=cap.tolist(),
                      bounds=(0.0, 1.0), method="highs")
    assert res.status == 0
    return -res.fun


def _check_feasible(expert: torch.Tensor, k: int, cap: torch.Tensor, scores: torch.Tensor) -> None:
    assert expert.shape == (scores.shape[0], k)
    assert bool((torch.bincount(expert.flatten(), minlength=cap.numel()) <= cap).all())  # capacity respected
    assert bool((expert.sort(1).values.diff(1) > 0).all())  # k distinct experts per token
    assert bool((scores.gather(1, expert).diff(1) <= 0).all())  # best score first


def test_slack_capacity():
    assert slack_capacity(2048, 64, 2, 1.25).tolist() == [80] * 64  # ceil(1.25 * 64), not 81 from rounding
    assert slack_capacity(2048, 256, 2, 1.25).tolist() == [20] * 256
    assert torch.equal(slack_capacity(50, 8, 3, 1.0), topk_capacity(50, 8, 3))  # c = 1: exact shares
    assert torch.equal(slack_capacity(50, 8, 3, 0.0), topk_capacity(50, 8, 3))  # the config's 0: no slack
    assert slack_capacity(4, 4, 3, 2.0).tolist() == [4] * 4  # never more than the T tokens


@pytest.mark.parametrize("tokens,experts,k,c", [(4, 3, 2, 1.5), (5, 4, 2, 1.25), (4, 4, 3, 1.2), (6, 3, 1, 1.5)])
def test_slack_matches_brute_force(tokens, experts, k, c):
    for seed in range(3):
        scores = _scores(tokens, experts, seed, common=2.0)
        cap = slack_capacity(tokens, experts, k, c)
        expert, _ = balanced_topk_assignment(scores, k, cap)
        _check_feasible(expert, k, cap, scores)
        bound = tokens * k * _eps(scores) * (2 + CHECK_SLACK)
        assert _total(scores, expert) == pytest.approx(_brute_force(scores, k, cap, at_most=True), abs=bound + 1e-9)


CASES = [(48, 8, 2, 1.25, 0.0), (50, 8, 3, 1.5, 0.0), (64, 16, 2, 1.25, 30.0), (40, 16, 1, 1.25, 5.0)]


@pytest.mark.parametrize("tokens,experts,k,c,common", CASES)
def test_slack_matches_the_lp_optimum(tokens, experts, k, c, common):
    scores = _scores(tokens, experts, 11, common=common)
    cap = slack_capacity(tokens, experts, k, c)
    expert, prices = balanced_topk_assignment(scores, k, cap)
    _check_feasible(expert, k, cap, scores)
    optimum = _lp_optimum(scores, k, cap)
    assert optimum - tokens * k * _eps(scores) * (2 + CHECK_SLACK) <= _total(scores, expert) <= optimum + 1e-6
    # The slack is used where it pays: at least as good as the exact balance, and strictly better here.
    exact, _ = balanced_topk_assignment(scores, k, topk_capacity(tokens, experts, k))
    assert _total(scores, expert) > _total(scores, exact) + 1e-3
    # Complementary slackness of "at most cap": an expert with room left has price 0 (the dual's floor; within
    # the dummy rows' eps on the fallback, which the alike case takes), a full one at least 0.
    load = torch.bincount(expert.flatten(), minlength=experts)
    assert bool((load < cap).any()) and float(prices[load < cap].abs().max()) <= 2 * (1 + DUMMY_SPREAD) * _eps(scores)
    assert float(prices.min()) >= -2 * (1 + DUMMY_SPREAD) * _eps(scores)


@pytest.mark.parametrize("tokens,experts,k,c,common", CASES[:3])
def test_dummy_row_fallback_is_optimal_too(tokens, experts, k, c, common, monkeypatch):
    monkeypatch.setattr(bt, "DROP_ROUNDS", 0)  # the floor auction gives up at once: the dummy rows solve it
    scores = _scores(tokens, experts, 11, common=common)
    cap = slack_capacity(tokens, experts, k, c)
    expert, _ = balanced_topk_assignment(scores, k, cap)
    _check_feasible(expert, k, cap, scores)
    spare = int(cap.sum()) - tokens * k
    bound = _eps(scores) * ((tokens * k + spare) * (1 + CHECK_SLACK) + spare * DUMMY_SPREAD)
    optimum = _lp_optimum(scores, k, cap)
    assert optimum - bound <= _total(scores, expert) <= optimum + 1e-6


def test_slack_deterministic_and_within_capacity_at_scale():
    scores = _scores(1024, 64, 5, common=3.0)  # a shared row: the popular experts fill to the cap
    cap = slack_capacity(1024, 64, 2, 1.25)
    a, pa = balanced_topk_assignment(scores, 2, cap)
    b, pb = balanced_topk_assignment(scores.clone(), 2, cap)
    assert torch.equal(a, b) and torch.equal(pa, pb)
    _check_feasible(a, 2, cap, scores)
    load = torch.bincount(a.flatten(), minlength=64)
    assert int(load.max()) == 40 and int(load.sum()) == 2048  # max/mean exactly 1.25 where it binds


def _router(capacity_factor: float) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = RouterConfig(name="balanced_topk", top_k=2, aux_loss_coef=0.0, z_loss_coef=0.0,
                       capacity_factor=capacity_factor)
    router = build_router(16, 8, cfg)
    torch.nn.init.normal_(router.gate.weight, 0.0, 1.0)
    return router


def test_router_plan_with_slack():
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(1)) + 2.0  # a shared offset: skewed demand
    exact, slack = _router(0.0)(x), _router(1.5)(x)
    assert exact.counts.tolist() == [10] * 8 and exact.capacity == 10
    assert slack.capacity == 15 and int(slack.counts.max()) <= 15 and int(slack.counts.sum()) == 80
    assert int(slack.counts.max()) > 10  # the skewed experts take more than the exact share


def test_router_refuses_a_slack_below_one():
    with pytest.raises(ValueError, match="capacity_factor=0.5 is the balanced_topk router's capacity slack"):
        _router(0.5)
