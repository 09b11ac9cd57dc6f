"""Token-choice top-k routing: gating orders, plan invariants, aux losses, fp32 router math, jitter."""
import copy
import math

import pytest
import torch

from routing import RouterConfig, RoutingPlan, build_router
from routing.losses import load_balancing_loss, router_z_loss
from routing.topk import TopKRouter, topk_gating

T, D, E = 24, 8, 4


def _router(seed: int = 0, num_experts: int = E, d: int = D, **cfg) -> TopKRouter:
    torch.manual_seed(seed)
    router = build_router(d, num_experts, RouterConfig(**cfg))
    torch.nn.init.normal_(router.gate.weight, 0.0, 1.0)  # spread logits so top-k choices are well separated
    return router


def _x(seed: int = 1, t: int = T, d: int = D) -> torch.Tensor:
    return torch.randn(t, d, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- gating orders against hand-computed values

LOGITS = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.5, -1.0, 0.5, 2.0]])


def test_topk_softmax_hand_values():
    probs, weight, idx = topk_gating(LOGITS, 2, "topk_softmax", renormalize=False)
    assert idx.tolist() == [[2, 1], [3, 0]] or idx.tolist() == [[2, 1], [3, 2]]  # tie between 0 and 2 in row 1
    e = math.e
    # row 0: softmax over the chosen logits (3, 2)
    torch.testing.assert_close(weight[0], torch.tensor([e / (e + 1), 1 / (e + 1)]), rtol=0, atol=1e-6)
    # row 1: softmax over (2, 0.5)
    a = math.exp(1.5)
    torch.testing.assert_close(weight[1], torch.tensor([a / (a + 1), 1 / (a + 1)]), rtol=0, atol=1e-6)
    torch.testing.assert_close(probs, torch.softmax(LOGITS, -1))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_softmax_is_mixtral_formula(k):
    logits = torch.randn(16, 6, generator=torch.Generator().manual_seed(k))
    _, weight, idx = topk_gating(logits, k, "topk_softmax", renormalize=False)
    # Mixtral: routing_weights = softmax(logits).topk(k); routing_weights /= routing_weights.sum()
    p = torch.softmax(logits, -1)
    ref_w, ref_idx = p.topk(k, dim=-1)
    ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(weight, ref_w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weight.sum(-1), torch.ones(16))
    # and it is the softmax over the chosen logits
    torch.testing.assert_close(weight, torch.softmax(logits.gather(1, idx), -1))


def test_softmax_topk_hand_values():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    z = math.exp(0) + math.exp(1) + math.exp(2) + math.exp(3)
    p2, p1 = math.exp(3) / z, math.exp(2) / z
    _, w, idx = topk_gating(logits, 2, "softmax_topk", renormalize=False)
    assert idx.tolist() == [[2, 1]]
    torch.testing.assert_close(w, torch.tensor([[p2, p1]]), rtol=0, atol=1e-6)
    assert w.sum().item() < 1.0
    _, w, idx = topk_gating(logits, 2, "softmax_topk", renormalize=True)
    torch.testing.assert_close(w, torch.tensor([[p2 / (p1 + p2), p1 / (p1 + p2)]]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("order,renormalize,sums_to_one", [
    ("topk_softmax", False, True),
    ("softmax_topk", True, True),
    ("softmax_topk", False, False),
])
@pytest.mark.parametrize("k", [1, 2])
def test_weights_sum(order, renormalize, sums_to_one, k):
    router = _router(top_k=k, order=order, renormalize=renormalize)
    x = _x()
    plan = router(x)
    per_token = torch.zeros(T).index_add_(0, plan.token_index, plan.weight.detach())
    if sums_to_one:
        torch.testing.assert_close(per_token, torch.ones(T))
    else:
        probs = torch.softmax(x @ router.gate.weight.t(), -1)
        torch.testing.assert_close(per_token, probs.topk(k, -1).values.sum(-1))
        if k < E:
            assert (per_token < 1).all()


def test_scale_multiplies_weights():
    x = _x()
    a = _router(top_k=2)(x)
    b = _router(top_k=2, scale=2.5)(x)
    assert torch.equal(a.token_index, b.token_index)
    torch.testing.assert_close(b.weight, 2.5 * a.weight)


# ---------------------------------------------------------------- plan invariants

def check_plan_invariants(plan: RoutingPlan, num_tokens: int, num_experts: int):
    N = plan.token_index.numel()
    assert plan.token_index.dtype == torch.long and plan.expert_index.dtype == torch.long
    assert plan.weight.dtype == torch.float32 and plan.counts.dtype == torch.long
    assert plan.expert_index.numel() == N == plan.weight.numel()
    assert plan.num_tokens == num_tokens and plan.num_experts == num_experts
    assert (plan.expert_index[1:] >= plan.expert_index[:-1]).all(), "rows must be sorted by expert"
    assert torch.equal(plan.counts, torch.bincount(plan.expert_index, minlength=num_experts))
    offsets = plan.offsets
    assert offsets[0] == 0 and offsets[-1] == N
    assert torch.equal(offsets, torch.cat([torch.zeros(1, dtype=torch.long), plan.counts.cumsum(0)]))
    pos = plan.position
    for e in range(num_experts):
        seg = slice(offsets[e].item(), offsets[e + 1].item())
        assert (plan.expert_index[seg] == e).all()
        assert torch.equal(pos[seg], torch.arange(plan.counts[e].item()))
    # one token never goes to the same expert twice
    pairs = plan.token_index * num_experts + plan.expert_index
    assert pairs.unique().numel() == N
    assert ((plan.token_index >= 0) & (plan.token_index < num_tokens)).all()


@pytest.mark.parametrize("order", ["topk_softmax", "softmax_topk"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_plan_invariants_dropless(order, k):
    router = _router(top_k=k, order=order, capacity_factor=0.0)
    plan = router(_x())
    check_plan_invariants(plan, T, E)
    assert plan.capacity is None
    assert plan.token_index.numel() == T * k
    assert torch.equal(torch.bincount(plan.token_index, minlength=T), torch.full((T,), k))
    # the plan's rows are exactly each token's top-k experts
    logits = _x() @ router.gate.weight.t()
    top = logits.topk(k, -1).indices
    got = torch.zeros(T, E, dtype=torch.bool)
    got[plan.token_index, plan.expert_index] = True
    ref = torch.zeros(T, E, dtype=torch.bool).scatter_(1, top, True)
    assert torch.equal(got, ref)
    assert plan.stats["dropped_fraction"].item() == 0.0


@pytest.mark.parametrize("cf", [1.0, -1.0, 0.5])
@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("k", [1, 2])
def test_plan_invariants_with_capacity(cf, policy, k):
    plan = _router(top_k=k, capacity_factor=cf, min_capacity=1, drop_policy=policy)(_x())
    check_plan_invariants(plan, T, E)
    C = math.ceil(abs(cf) * T * k / E)
    assert plan.capacity == (C if cf > 0 else None)
    assert (plan.counts <= C).all()
    assert (torch.bincount(plan.token_index, minlength=T) <= k).all()


@pytest.mark.parametrize("k", [1, 2])
def test_rows_within_expert_are_choice_major_then_token_order(k):
    router = _router(top_k=k)
    x = _x()
    plan = router(x)
    idx = (x @ router.gate.weight.t()).topk(k, -1).indices  # [T, k]
    ref_token, ref_expert = [], []
    for e in range(E):
        for j in range(k):
            for t in range(T):
                if idx[t, j] == e:
                    ref_token.append(t)
                    ref_expert.append(e)
    assert plan.token_index.tolist() == ref_token
    assert plan.expert_index.tolist() == ref_expert


# ---------------------------------------------------------------- load balancing and z losses

@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("num_experts", [2, 4, 8])
def test_load_balancing_loss_uniform_is_one(k, num_experts):
    tokens = 4 * num_experts
    probs = torch.full((tokens, num_experts), 1.0 / num_experts)
    t = torch.arange(tokens)
    idx = torch.stack([(t + j) % num_experts for j in range(k)], dim=1)
    assert load_balancing_loss(probs, idx, num_experts).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("num_experts", [2, 4, 8])
def test_load_balancing_loss_collapsed_is_E(num_experts):
    tokens = 12
    probs = torch.zeros(tokens, num_experts)
    probs[:, 0] = 1.0
    idx = torch.zeros(tokens, 1, dtype=torch.long)
    assert load_balancing_loss(probs, idx, num_experts).item() == pytest.approx(float(num_experts), abs=1e-6)


@pytest.mark.parametrize("coef", [0.01, 0.5])
@pytest.mark.parametrize("k", [1, 2])
def test_router_aux_losses_known_values_zero_gate(coef, k):
    """A zero gate gives uniform probabilities: the balance loss is exactly 1 whatever the assignment,
    and the z-loss is (log E)^2."""
    router = _router(top_k=k, aux_loss_coef=coef, z_loss_coef=coef)
    torch.nn.init.zeros_(router.gate.weight)
    plan = router(_x())
    assert plan.aux_losses["load_balancing_loss"].item() == pytest.approx(coef * 1.0, rel=1e-6)
    assert plan.aux_losses["router_z_loss"].item() == pytest.approx(coef * math.log(E) ** 2, rel=1e-6)


def test_router_aux_loss_collapsed():
    coef = 0.1
    router = _router(top_k=1, aux_loss_coef=coef, z_loss_coef=0.0)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0, 0] = 100.0
    x = _x().abs() + 1.0  # feature 0 positive: expert 0 wins every token with probability ~1
    plan = router(x)
    assert plan.counts.tolist() == [T, 0, 0, 0]
    assert plan.aux_losses["load_balancing_loss"].item() == pytest.approx(coef * E, rel=1e-5)
    assert "router_z_loss" not in plan.aux_losses


def test_z_loss_known_values():
    assert router_z_loss(torch.zeros(5, 8)).item() == pytest.approx(math.log(8) ** 2, rel=1e-6)
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    expected = (math.log(4.0) ** 2 + (1.0 + math.log(2.0)) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_aux_losses_are_differentiable_and_off_at_zero_coef():
    router = _router(top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001)
    plan = router(_x())
    total = sum(plan.aux_losses.values())
    total.backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0
    plan = _router(top_k=2, aux_loss_coef=0.0, z_loss_coef=0.0)(_x())
    assert plan.aux_losses == {}


# ---------------------------------------------------------------- fp32 router in a bf16 model

def test_router_stays_fp32_in_bf16_model():
    from moe import ModelConfig, MoEConfig, Transformer

    cfg = ModelConfig(vocab_size=64, n_layer=2, d_model=16, n_head=2, d_ff=32, max_seq_len=16,
                      moe=MoEConfig(layers="all", num_experts=4, router=RouterConfig(top_k=2)))
    torch.manual_seed(0)
    model = Transformer(cfg)
    ref_router = copy.deepcopy(model.blocks[0].ffn.router)
    model.to(torch.bfloat16)
    router = model.blocks[0].ffn.router
    assert router.gate.weight.dtype == torch.float32
    assert model.blocks[0].ffn.experts.w_up.dtype == torch.bfloat16
    assert model.embed.weight.dtype == torch.bfloat16
    torch.testing.assert_close(router.gate.weight, ref_router.gate.weight, rtol=0, atol=0)

    plans = []
    router.register_forward_hook(lambda m, inp, out: plans.append((inp[0], out)))
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    out = model(idx, idx)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    x_bf16, plan = plans[0]
    assert x_bf16.dtype == torch.bfloat16
    assert plan.weight.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in plan.aux_losses.values())
    # identical to an fp32 router fed the same (upcast) activations: no bf16 rounding inside the router
    ref = ref_router(x_bf16.float())
    assert torch.equal(plan.token_index, ref.token_index) and torch.equal(plan.expert_index, ref.expert_index)
    torch.testing.assert_close(plan.weight, ref.weight, rtol=0, atol=0)
    # also under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan2 = router(x_bf16.float())
    assert plan2.weight.dtype == torch.float32
    torch.testing.assert_close(plan2.weight, ref.weight, rtol=0, atol=0)


# ---------------------------------------------------------------- jitter

def test_jitter_only_in_training():
    router = _router(top_k=2, jitter=0.3)
    plain = _router(top_k=2, jitter=0.0)
    x = _x()
    torch.manual_seed(123)
    a = router(x)
    b = router(x)
    assert not torch.equal(a.weight, b.weight), "training-mode jitter must perturb the router input"
    router.eval()
    plain.eval()
    c, d, ref = router(x), router(x), plain(x)
    for p in (c, d):
        assert torch.equal(p.token_index, ref.token_index) and torch.equal(p.expert_index, ref.expert_index)
        assert torch.equal(p.weight, ref.weight)


def test_registry_and_check_experts():
    with pytest.raises(ValueError, match="model.moe.router.top_k"):
        TopKRouter(D, 2, RouterConfig(top_k=3))
    with pytest.raises(ValueError, match="model.moe.router.name"):
        RouterConfig(name="nope")


# ---------------------------------------------------------------- kernels: an explicit argument, nothing installed

def test_kernels_passed_to_forward_are_the_ones_that_run():
    """RouterKernels reach the router per call: a stand-in gating and a stand-in sort (torch's own, counted) give
    the default plan, run once per dropless forward, and leave nothing behind on the router."""
    from routing.capacity import assign
    from routing.router import RouterKernels

    calls = {"topk": 0, "sort": 0}

    def topk(*args):
        calls["topk"] += 1
        return topk_gating(*args)

    def sort(expert_idx, num_experts):  # the contract: order, token_index, expert_index, counts
        calls["sort"] += 1
        T, k = expert_idx.shape
        flat = expert_idx.t().reshape(-1)
        order = torch.argsort(flat * T * k + torch.arange(T * k), stable=True)
        return order, torch.arange(T).repeat(k)[order], flat[order], torch.bincount(flat, minlength=num_experts)

    router = _router(top_k=2)
    x = _x()
    want, got = router(x), router(x, kernels=RouterKernels(topk=topk, sort=sort))
    assert calls == {"topk": 1, "sort": 1}
    for name in ("token_index", "expert_index", "weight", "counts", "kept"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    cfg = router.cfg
    _, weight, idx = topk_gating(router.logits(x), 2, cfg.order, cfg.renormalize)
    rows = assign(idx, weight, E, None, "position")  # routing's own dropless rows
    assert torch.equal(got.token_index, rows[0]) and torch.equal(got.counts, rows[3])
    router(x)  # the next call without kernels runs the torch code again
    assert calls == {"topk": 1, "sort": 1} and not {"topk", "sort", "topk_impl", "sort_impl"} & set(vars(router))
