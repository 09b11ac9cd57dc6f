"""routing.fused_gate (one autograd node for the greedy top-k router's weights, balancing loss and z-loss) equals
the composed torch ops it replaced: weights bit for bit, losses and gradients to fp32 rounding; the router's plan
and statistics are unchanged; and the router's forward and backward never wait on the host."""
import contextlib

import pytest
import torch

from routing import RouterConfig, build_router
from routing.fused_gate import fused_gate
from routing.losses import balance_choices, expert_fractions, load_balancing_loss
from routing.router import RouterKernels
from routing.selection import select_topk
from routing.stats import routing_stats
from routing.topk import topk_gating

CASES = [(E, k) for E in (8, 64, 256) for k in (1, 2, 8) if k <= E]
LB, Z = 0.1, 0.001


def _logits(T, E, seed, levels=None):
    g = torch.Generator().manual_seed(seed)
    if levels is None:
        return torch.randn(T, E, generator=g) * 2
    return torch.randint(0, levels, (T, E), generator=g).float()


def _composed(logits, k, convention, lb, z):
    """The gate before issues 16/21: torch.softmax, the gathered softmax, load_balancing_loss, logsumexp z-loss."""
    probs = torch.softmax(logits, -1)
    idx = select_topk(logits, k)
    weight = torch.softmax(logits.gather(1, idx), -1)
    losses = []
    if lb > 0:
        losses.append(lb * load_balancing_loss(probs, balance_choices(idx, convention), logits.shape[1]))
    if z > 0:
        losses.append(z * torch.logsumexp(logits, -1).square().mean())
    return weight, losses, probs


def _fused(logits, k, convention, lb, z):
    idx = select_topk(logits, k)
    fractions = expert_fractions(balance_choices(idx, convention), logits.shape[1]) if lb > 0 else None
    out = fused_gate(logits, idx, fractions, lb, z)
    return out.weight, [x for x in (out.load_balancing_loss, out.router_z_loss) if x is not None], out


@pytest.mark.parametrize("E,k", CASES)
@pytest.mark.parametrize("convention", ["all_choices", "first_choice"])
def test_values_and_gradients_equal_the_composed_gate(E, k, convention):
    T = 193
    for seed, levels in ((0, None), (1, 3)):  # continuous, and ties
        base = _logits(T, E, seed, levels)
        g_w = torch.randn(T, k, generator=torch.Generator().manual_seed(seed + 10))
        results = []
        for fn in (_composed, _fused):
            logits = base.clone().requires_grad_(True)
            weight, losses, _ = fn(logits, k, convention, LB, Z)
            ((weight * g_w).sum() + 3.0 * losses[0] + 5.0 * losses[1]).backward()
            results.append((weight.detach(), [x.detach() for x in losses], logits.grad))
        (w0, l0, g0), (w1, l1, g1) = results
        assert torch.equal(w1, w0)  # the combine weights bit for bit
        for a, b in zip(l1, l0):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("lb,z", [(0.0, Z), (LB, 0.0), (0.0, 0.0)])
def test_switched_off_losses_are_left_out_and_give_no_gradient(lb, z):
    base = _logits(64, 16, 2)
    g_w = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    grads = []
    for fn in (_composed, _fused):
        logits = base.clone().requires_grad_(True)
        weight, losses, _ = fn(logits, 2, "all_choices", lb, z)
        assert len(losses) == (lb > 0) + (z > 0)
        ((weight * g_w).sum() + sum(losses)).backward()
        grads.append(logits.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("E,k", [(8, 2), (64, 2), (256, 8)])
def test_statistics_equal_the_probability_formulas(E, k):
    logits = _logits(300, E, 4)
    _, _, out = _fused(logits, k, "all_choices", LB, Z)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(out.probs, probs, rtol=1e-6, atol=1e-7)
    want = routing_stats(probs, torch.ones(E), torch.ones(300, k, dtype=torch.bool))
    got = routing_stats(out.probs, torch.ones(E), torch.ones(300, k, dtype=torch.bool), out.entropy, out.top1_prob)
    torch.testing.assert_close(got["router_entropy"], want["router_entropy"], rtol=1e-6, atol=1e-6)
    assert torch.equal(got["top1_prob"], out.probs.amax(-1).mean())


def _pair(E, k, **kw):
    cfg = RouterConfig(top_k=k, aux_loss_coef=LB, z_loss_coef=Z, **kw)
    torch.manual_seed(0)
    router = build_router(16, E, cfg)
    with torch.no_grad():
        router.gate.weight.normal_(0.0, 0.5)
    return router


@pytest.mark.parametrize("E,k", [(8, 2), (64, 2), (256, 8)])
@pytest.mark.parametrize("capacity_factor", [0.0, 1.25])
def test_router_plan_unchanged(E, k, capacity_factor):
    """The fused path (default) against the composed one (topk_gating passed as the kernel): same plan, same
    gradients of the gate weight and of the input."""
    router = _pair(E, k, capacity_factor=capacity_factor)
    x0 = torch.randn(150, 16, generator=torch.Generator().manual_seed(1))
    plans, grads = [], []
    for kernels in (RouterKernels(), RouterKernels(topk=topk_gating)):
        x = x0.clone().requires_grad_(True)
        router.gate.weight.grad = None
        plan = router(x, kernels=kernels)
        g = torch.randn(plan.weight.shape, generator=torch.Generator().manual_seed(2))
        ((plan.weight * g).sum() + sum(plan.aux_losses.values())).backward()
        plans.append(plan)
        grads.append((router.gate.weight.grad, x.grad))
    a, b = plans
    for name in ("token_index", "expert_index", "counts", "kept"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.weight, b.weight)
    assert a.aux_losses.keys() == b.aux_losses.keys() == {"load_balancing_loss", "router_z_loss"}
    for key in a.aux_losses:
        torch.testing.assert_close(a.aux_losses[key], b.aux_losses[key], rtol=1e-6, atol=1e-9)
    for key in a.stats:
        torch.testing.assert_close(a.stats[key], b.stats[key], rtol=1e-6, atol=1e-6)
    for ga, gb in zip(*grads):  # sums over tokens: cancellation leaves fp32 rounding of the largest terms
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6 * float(gb.abs().max()))


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def trap_host_reads():
    """Tensor.item/tolist/cpu/numpy and int()/float()/bool() of a tensor raise HostSync inside the block."""
    def refuse(name):
        def raise_(self, *args, **kwargs):
            raise HostSync(f"Tensor.{name} inside the router")
        return raise_

    with pytest.MonkeyPatch.context() as mp:
        for name in ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__"):
            mp.setattr(torch.Tensor, name, refuse(name))
        yield


def test_trap_works():
    with trap_host_reads(), pytest.raises(HostSync):
        bool(torch.ones(1) > 0)


@pytest.mark.parametrize("E,k,T", [(8, 2, 64), (64, 2, 64), (256, 8, 1100)])  # T = 1100: three row blocks
def test_router_forward_and_backward_without_host_sync(E, k, T):
    router = _pair(E, k)
    x = torch.randn(T, 16, requires_grad=True)
    with trap_host_reads():
        plan = router(x)
        (plan.weight.sum() + sum(plan.aux_losses.values())).backward()
    assert router.gate.weight.grad is not None and x.grad is not None
    assert int(plan.counts.sum()) == T * k
