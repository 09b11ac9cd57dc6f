"""Capacity and drop policy, eval capacity, and the routing statistics schema."""
import math

import pytest
import torch

from routing import RouterConfig, build_router
from routing.capacity import assign, expert_capacity
from routing.config import MIN_SLOTS_PER_TOKEN
from routing.stats import STAT_KEYS, routing_stats

T, D, E = 24, 8, 4


def _router(seed: int = 0, **cfg):
    torch.manual_seed(seed)
    router = build_router(D, E, RouterConfig(**cfg))
    torch.nn.init.normal_(router.gate.weight, 0.0, 1.0)
    return router


def _x(seed: int = 1, t: int = T) -> torch.Tensor:
    return torch.randn(t, D, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- expert_capacity

@pytest.mark.parametrize("tokens,experts,k,cf,min_cap,expected", [
    (8, 4, 2, 1.0, 0, 4),  # ceil(1.0 * 8 * 2 / 4)
    (8, 4, 2, 1.25, 0, 5),  # ceil(5.0)
    (10, 4, 1, 1.0, 0, 3),  # ceil(2.5)
    (10, 4, 1, 1.1, 0, 3),  # ceil(2.75)
    (16, 4, 2, 0.5, 0, 4),
    (8, 4, 2, -1.0, 0, 4),  # negative: capped, same size rule on |cf|
    (8, 4, 2, -0.5, 0, 2),
    (8, 4, 2, 0.5, 4, 4),  # min_capacity raises a small fixed capacity
    (8, 4, 2, -0.5, 3, 3),  # ... and a small cap
    (64, 4, 2, 1.0, 4, 32),  # min_capacity below the computed value has no effect
    (8, 4, 2, 0.0, 4, None),  # dropless
    (8, 4, 2, 0.0, 0, None),
])
def test_expert_capacity(tokens, experts, k, cf, min_cap, expected):
    assert expert_capacity(tokens, experts, k, cf, min_cap) == expected


# ---------------------------------------------------------------- capacity on router plans

@pytest.mark.parametrize("policy", ["probs", "position"])
# Top-1 with cf 0.25 (at least 75% of the tokens dropped) is refused by RouterConfig, so it is not among them.
@pytest.mark.parametrize("k, cf", [(k, cf) for k in (1, 2) for cf in (1.0, -1.0, 0.5, 0.25)
                                   if abs(cf) * k >= MIN_SLOTS_PER_TOKEN])
def test_capacity_bounds_and_dropped_fraction(policy, cf, k):
    router = _router(top_k=k, capacity_factor=cf, min_capacity=1, drop_policy=policy)
    x = _x()
    plan = router(x)
    C = math.ceil(abs(cf) * T * k / E)
    # a fixed capacity (cf > 0) is recorded for padded layouts; a cap (cf < 0) only bounds the counts
    assert plan.capacity == (C if cf > 0 else None)
    assert (plan.counts <= C).all()
    # what survives is min(load, C) per expert, with the load taken from the raw top-k choices
    load = torch.bincount((x @ router.gate.weight.t()).topk(k, -1).indices.reshape(-1), minlength=E)
    assert torch.equal(plan.counts, load.clamp(max=C))
    N = plan.token_index.numel()
    assert N == int(plan.counts.sum())
    dropped = 1.0 - N / (T * k)
    assert plan.stats["dropped_fraction"].item() == pytest.approx(dropped, abs=1e-6)
    if cf <= 0.5:
        assert dropped > 0  # T*k rows cannot fit in E*C < T*k slots


def _reference_keep(expert_idx, weight, capacity, policy):
    """Plain-Python reference: per expert, order assignments by (choice, token) or (choice, -weight), keep C."""
    Tn, k = expert_idx.shape
    kept = torch.zeros(Tn, k, dtype=torch.bool)
    rows = []
    for e in range(int(expert_idx.max()) + 1):
        cand = [(j, t) for j in range(k) for t in range(Tn) if expert_idx[t, j] == e]
        if policy == "probs":
            cand.sort(key=lambda jt: (jt[0], -float(weight[jt[1], jt[0]]), jt[1]))
        for j, t in cand[:capacity]:
            kept[t, j] = True
            rows.append((t, e))
    return kept, rows


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("capacity", [1, 3, 5])
def test_assign_matches_reference(policy, k, capacity):
    g = torch.Generator().manual_seed(10 * k + capacity)
    logits = torch.randn(12, 5, generator=g)
    top, expert_idx = logits.topk(k, -1)
    weight = torch.softmax(top, -1)
    tok, exp, w, counts, kept = assign(expert_idx, weight, 5, capacity, policy)
    ref_kept, ref_rows = _reference_keep(expert_idx, weight, capacity, policy)
    assert torch.equal(kept, ref_kept)
    assert list(zip(tok.tolist(), exp.tolist())) == ref_rows
    for r, (t, e) in enumerate(ref_rows):
        j = (expert_idx[t] == e).nonzero().item()
        assert w[r] == weight[t, j]
    assert torch.equal(counts, torch.bincount(exp, minlength=5))


def test_position_policy_first_choices_then_earlier_tokens():
    # every token's first choice is expert 0 and second choice expert 1, except tokens 4, 5 whose first is 1
    expert_idx = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1], [1, 0], [1, 0]])
    weight = torch.tensor([[0.6, 0.4]] * 4 + [[0.9, 0.1]] * 2)
    tok, exp, w, counts, kept = assign(expert_idx, weight, 2, capacity=3, drop_policy="position")
    # expert 0 candidates: first choices of tokens 0..3, then second choices of 4, 5 -> keep tokens 0, 1, 2
    # expert 1 candidates: first choices of tokens 4, 5, then second choices of 0..3 -> keep 4, 5, 0
    assert tok.tolist() == [0, 1, 2, 4, 5, 0]
    assert exp.tolist() == [0, 0, 0, 1, 1, 1]
    assert counts.tolist() == [3, 3]
    assert kept.tolist() == [[True, True], [True, False], [True, False], [False, False], [True, False], [True, False]]
    torch.testing.assert_close(w, torch.tensor([0.6, 0.6, 0.6, 0.9, 0.9, 0.4]))


def test_probs_policy_keeps_highest_weights_k1():
    expert_idx = torch.zeros(6, 1, dtype=torch.long)
    weight = torch.tensor([[0.3], [0.9], [0.1], [0.7], [0.8], [0.2]])
    tok, exp, w, counts, kept = assign(expert_idx, weight, 1, capacity=3, drop_policy="probs")
    assert tok.tolist() == [1, 4, 3]
    torch.testing.assert_close(w, torch.tensor([0.9, 0.8, 0.7]))
    assert kept[:, 0].tolist() == [False, True, False, True, True, False]
    tok, *_ = assign(expert_idx, weight, 1, capacity=3, drop_policy="position")
    assert tok.tolist() == [0, 1, 2]


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("cf", [0.5, 1.0])
def test_probs_policy_router_keeps_highest_weight_rows_per_expert(k, cf):
    """With top-k-then-softmax a first choice always outweighs a second, so "probs" keeps, in each
    expert, exactly the assignments of highest weight."""
    router = _router(top_k=k, capacity_factor=cf, min_capacity=1, drop_policy="probs")
    x = _x()
    plan = router(x)
    logits = x @ router.gate.weight.t()
    top, idx = logits.topk(k, -1)
    weight = torch.softmax(top, -1)
    for e in range(E):
        all_w = weight[idx == e]
        kept_w = plan.weight[plan.expert_index == e].detach()
        expected = all_w.sort(descending=True).values[: plan.capacity]
        torch.testing.assert_close(kept_w.sort(descending=True).values, expected)


@pytest.mark.parametrize("cf", [0.5, 1.0])
def test_position_policy_router_keeps_earliest(cf):
    router = _router(top_k=1, capacity_factor=cf, min_capacity=1, drop_policy="position")
    x = _x()
    plan = router(x)
    idx = (x @ router.gate.weight.t()).argmax(-1)
    for e in range(E):
        expected = (idx == e).nonzero()[:, 0][: plan.capacity]
        assert plan.token_index[plan.expert_index == e].tolist() == expected.tolist()


def test_weights_of_kept_rows_carry_gradient():
    router = _router(top_k=2, capacity_factor=0.5, min_capacity=1)
    plan = router(_x())
    plan.weight.sum().backward()
    assert router.gate.weight.grad is not None and torch.isfinite(router.gate.weight.grad).all()


# ---------------------------------------------------------------- eval capacity

@pytest.mark.parametrize("train_cf,eval_cf,train_cap,eval_cap", [
    (1.0, None, 12, 12),  # None: eval uses the training factor
    (1.0, 2.0, 12, 24),
    (1.0, 0.0, 12, None),  # dropless at eval
    (0.0, 0.5, None, 6),
    (0.0, -1.0, None, None),  # capped: drops past 12 but records no fixed capacity
])
def test_eval_capacity_factor_only_in_eval(train_cf, eval_cf, train_cap, eval_cap):
    router = _router(top_k=2, capacity_factor=train_cf, eval_capacity_factor=eval_cf, min_capacity=1)
    x = _x()
    assert router(x).capacity == train_cap
    router.eval()
    plan = router(x)
    assert plan.capacity == eval_cap
    if eval_cf == -1.0:
        assert (plan.counts <= 12).all()
    elif eval_cap is None:
        assert plan.token_index.numel() == T * 2
    router.train()
    assert router(x).capacity == train_cap


# ---------------------------------------------------------------- statistics

def _forced_router(k: int = 1, **cfg):
    """Router whose gate sends token t to expert (t % 4) first and ((t + 1) % 4) second."""
    router = build_router(D, E, RouterConfig(top_k=k, **cfg))
    with torch.no_grad():
        router.gate.weight.zero_()
        for e in range(E):
            router.gate.weight[e, e] = 5.0
            router.gate.weight[e, (e - 1) % E] = 2.0  # token t (feature t%4) also likes expert t+1 second
    return router


def _forced_x(t: int = 16) -> torch.Tensor:
    x = torch.zeros(t, D)
    x[torch.arange(t), torch.arange(t) % E] = 1.0
    return x


@pytest.mark.parametrize("k", [1, 2])
def test_stats_schema_balanced(k):
    plan = _forced_router(k)(_forced_x())
    assert plan.counts.tolist() == [4 * k] * E
    assert set(STAT_KEYS) <= set(plan.stats)
    for key in STAT_KEYS:
        value = plan.stats[key]
        assert isinstance(value, torch.Tensor) and not value.requires_grad, key
        assert torch.isfinite(value).all(), key
    s = plan.stats
    assert s["max_load"].item() == pytest.approx(1.0)
    assert s["dead_experts"].item() == 0
    assert s["dropped_fraction"].item() == 0
    assert s["tokens_per_expert"].tolist() == [4.0 * k] * E
    probs = torch.softmax(_forced_x() @ _forced_router(k).gate.weight.t(), -1)
    assert s["top1_prob"].item() == pytest.approx(probs.max(-1).values.mean().item(), rel=1e-6)
    entropy = -(probs * probs.log()).sum(-1).mean()
    assert s["router_entropy"].item() == pytest.approx(entropy.item(), rel=1e-5)


def test_stats_dead_experts_and_max_load():
    router = _forced_router(1)
    x = _forced_x()
    x[:, 2:] = 0.0
    x[:, 0] = 1.0  # token features only for experts 0 and 1 ...
    x[1::2, 0] = 0.0
    x[1::2, 1] = 1.0
    plan = router(x)
    assert plan.counts.tolist() == [8, 8, 0, 0]
    assert plan.stats["dead_experts"].item() == 2
    assert plan.stats["max_load"].item() == pytest.approx(2.0)  # 8 of 16 against an even 4


def test_routing_stats_direct_values():
    probs = torch.full((4, 4), 0.25)
    counts = torch.tensor([4, 0, 0, 0])
    kept = torch.tensor([[True], [True], [True], [True]])
    s = routing_stats(probs, counts, kept)
    assert s["max_load"].item() == pytest.approx(4.0)
    assert s["dead_experts"].item() == 3
    assert s["router_entropy"].item() == pytest.approx(math.log(4), rel=1e-6)
    assert s["top1_prob"].item() == pytest.approx(0.25)
    kept[0, 0] = False
    assert routing_stats(probs, counts, kept)["dropped_fraction"].item() == pytest.approx(0.25)


def test_stats_counts_after_capacity():
    plan = _forced_router(1, capacity_factor=0.5, min_capacity=1)(_forced_x())  # C = ceil(0.5*16/4) = 2
    assert plan.capacity == 2
    assert plan.stats["tokens_per_expert"].tolist() == [2.0] * E
    assert plan.stats["dropped_fraction"].item() == pytest.approx(0.5)
