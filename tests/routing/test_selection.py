"""Top-k selection (routing.topk.select_topk): by logits, the lowest index first among ties, on every router and
dispatcher; the fused Triton gating makes the same choices (issue 17)."""
import os

import torch

if not torch.cuda.is_available():  # CPU: the Triton tests run in its interpreter (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from routing import RouterConfig, build_router
from routing.topk import select_topk, topk_gating

ORDERS = [("topk_softmax", False), ("softmax_topk", False), ("softmax_topk", True)]


def _tied(T, E, levels, seed):
    """[T, E] logits drawn from `levels` distinct values: many exact ties per row."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, (T, E), generator=gen).float().sub_(levels / 2).mul_(0.5)


def _stable(logits, k):
    """The reference rule: a stable descending sort keeps the lower index first among equal values."""
    return torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]


# ---------------------------------------------------------------- underflow

@pytest.mark.parametrize("order,renorm", ORDERS)
def test_underflow_selects_by_logit(order, renorm):
    # probs are [1, 0, 0, 0] in fp32: a top-2 of the probs took expert 2 (the tied zeros' first index)
    logits = torch.tensor([[1e4, 0.0, -1e4, 5e3]])
    probs, weight, idx = topk_gating(logits, 2, order, renorm)
    assert idx.tolist() == [[0, 3]]
    assert weight.tolist() == [[1.0, 0.0]]  # exp(-5e3) is 0 in fp32 in both orders
    assert probs.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_underflow_router_plan_routes_to_expert_3():
    router = build_router(4, 4, RouterConfig(top_k=2, order="softmax_topk", aux_loss_coef=0.0, z_loss_coef=0.0))
    logits = torch.tensor([[1e4, 0.0, -1e4, 5e3]])
    plan = router.route(torch.zeros(1, 4), logits, None, 1)
    assert sorted(plan.expert_index.tolist()) == [0, 3]
    assert plan.counts.tolist() == [1, 0, 0, 1]


# ---------------------------------------------------------------- the tie rule

@pytest.mark.parametrize("E,k,levels", [(8, 2, 3), (13, 4, 2), (60, 8, 5), (4, 4, 1)])
def test_ties_lowest_index_first(E, k, levels):
    logits = _tied(64, E, levels, seed=E + k)
    idx = select_topk(logits, k)
    assert torch.equal(idx, _stable(logits, k))
    # torch.topk picks the same values (the same multiset per row), only maybe other tied experts
    top = logits.topk(k, dim=-1).values
    assert torch.equal(logits.gather(1, idx), top)


def test_zero_logits_pick_the_first_k_experts():
    idx = select_topk(torch.zeros(5, 16), 3)
    assert idx.tolist() == [[0, 1, 2]] * 5


def test_signed_zero_and_infinities_rank_as_floats():
    logits = torch.tensor([[-0.0, 0.0, -1.0, float("-inf"), float("inf"), -3e38, 3e38, -1e-45]])
    assert select_topk(logits, 8).tolist() == [[4, 6, 0, 1, 7, 2, 5, 3]]  # -0.0 == 0.0: index order


def test_continuous_logits_unchanged_from_topk():
    # No ties: exactly torch.topk's choices, and the weights bit-identical to the pre-issue-17 arithmetic.
    logits = torch.randn(200, 60, generator=torch.Generator().manual_seed(0)) * 3
    for order, renorm in ORDERS:
        probs, weight, idx = topk_gating(logits, 4, order, renorm)
        if order == "topk_softmax":
            top, ref_idx = logits.topk(4, dim=-1)
            ref_w = torch.softmax(top, dim=-1)
        else:
            ref_w, ref_idx = torch.softmax(logits, -1).topk(4, dim=-1)
            if renorm:
                ref_w = ref_w / ref_w.sum(dim=-1, keepdim=True)
        assert torch.equal(idx, ref_idx)
        assert torch.equal(weight, ref_w)


def test_gradient_equals_the_topk_formula():
    # gather and topk's values backward both scatter into the chosen columns: the same gradient, bit for bit
    base = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    grads = []
    for new in (True, False):
        logits = base.clone().requires_grad_(True)
        if new:
            weight = topk_gating(logits, 2, "softmax_topk", True)[1]
        else:
            weight = torch.softmax(logits, -1).topk(2, dim=-1).values
            weight = weight / weight.sum(dim=-1, keepdim=True)
        (weight[:, 0] * 3 + weight[:, 1]).sum().backward()
        grads.append(logits.grad)
    assert grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1])


ROUTER_CFGS = {
    "topk": dict(top_k=2),
    "sinkhorn-eval": dict(name="sinkhorn", top_k=2),
    "bias_balanced": dict(name="bias_balanced", top_k=2),
    "expert_choice-fallback": dict(name="expert_choice", top_k=1, capacity_factor=1.0),
}


@pytest.mark.parametrize("name", list(ROUTER_CFGS))
def test_routers_select_lowest_index_on_ties(name):
    T, E = 3, 8  # expert choice: 3 tokens give 8 experts less than a slot each, so evaluation takes the fallback
    router = build_router(4, E, RouterConfig(aux_loss_coef=0.0, z_loss_coef=0.0, **ROUTER_CFGS[name])).eval()
    k = 2 if name != "expert_choice-fallback" else 1
    for seed in range(5):
        logits = _tied(T, E, 2, seed=seed)
        plan = router.route(torch.zeros(T, 4), logits, None, T)
        want = _stable(logits, k)
        got = torch.full((T, k), -1)
        seen = [0] * T
        for t, e in sorted(zip(plan.token_index.tolist(), plan.expert_index.tolist())):
            got[t, seen[t]] = e
            seen[t] += 1
        assert torch.equal(got.sort(dim=-1).values, want.sort(dim=-1).values), (name, seed)


def test_expert_choice_ties_take_the_lowest_token():
    router = build_router(4, 2, RouterConfig(name="expert_choice", top_k=1, capacity_factor=1.0,
                                             ec_mode="batch", z_loss_coef=0.0)).train()
    plan = router.route(torch.zeros(8, 4), torch.zeros(8, 2), None, 8)  # all scores 1/2: each expert takes 4
    assert plan.token_index.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert plan.expert_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


# ---------------------------------------------------------------- the fused Triton gating agrees

def _triton():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") != "1" and not torch.cuda.is_available():
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1 set before its import")
    from moe.kernels.gating import fused_topk_gating

    return fused_topk_gating


@pytest.mark.parametrize("order,renorm", ORDERS)
@pytest.mark.parametrize("E,k,levels", [(8, 2, 2), (13, 4, 3), (6, 6, 1)])
def test_fused_gating_equals_selection_on_ties(E, k, levels, order, renorm):
    fused = _triton()
    for seed in range(3):
        logits = _tied(40, E, levels, seed=seed)
        p0, w0, i0 = topk_gating(logits, k, order, renorm)
        p1, w1, i1 = fused(logits, k, order, renorm)
        assert torch.equal(i1, i0)
        torch.testing.assert_close(w1, w0, rtol=0, atol=1e-6)
    p0, w0, i0 = topk_gating(torch.tensor([[1e4, 0.0, -1e4, 5e3]]), 2, order, renorm)
    assert fused(torch.tensor([[1e4, 0.0, -1e4, 5e3]]), 2, order, renorm)[2].tolist() == i0.tolist() == [[0, 3]]


def test_zero_gate_plan_identical_under_sorted_and_triton():
    _triton()
    from moe import ModelConfig, MoEConfig
    from moe.layer import MoELayer

    plans = {}
    for dispatcher in ("sorted", "triton"):
        cfg = ModelConfig(vocab_size=32, n_layer=1, d_model=8, n_head=2, d_ff=12, max_seq_len=16,
                          moe=MoEConfig(layers="all", num_experts=4, dispatcher=dispatcher,
                                        router=RouterConfig(top_k=2)))
        torch.manual_seed(0)
        layer = MoELayer(cfg)
        torch.nn.init.zeros_(layer.router.gate.weight)  # a zero-initialised router: every logit tied
        x = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
        y, plan = layer(x)
        assert layer.resolved_dispatcher(x.device)[0] == dispatcher
        plans[dispatcher] = (y, plan)
    (y_s, ps), (y_t, pt) = plans["sorted"], plans["triton"]
    assert ps.counts.tolist() == pt.counts.tolist() == [10, 10, 0, 0]  # experts 0 and 1 take every token
    assert torch.equal(ps.expert_index, pt.expert_index) and torch.equal(ps.token_index, pt.token_index)
    torch.testing.assert_close(pt.weight, ps.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(y_t, y_s, rtol=1e-5, atol=1e-5)
