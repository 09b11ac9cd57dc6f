"""The many-small-experts path (issue 21): sorted dispatch at E = 64 and 256, with experts that get no token,
equals the einsum reference in outputs and in every gradient (fp32, 1e-5); the combine weight scales the hidden
rows (f <= d, no down bias) or the output rows, the same function either way."""
import pytest
import torch

from moe.dispatch import einsum_dispatch, sorted_dispatch
from moe.experts import Experts
from routing import RouterConfig, build_router

TOL = dict(rtol=1e-5, atol=1e-5)
D = 16


def _case(E, k, f, glu, bias, T, seed=0):
    torch.manual_seed(seed)
    router = build_router(D, E, RouterConfig(top_k=k, aux_loss_coef=0.01, z_loss_coef=0.001))
    experts = Experts(E, D, f, "silu", glu, bias)
    with torch.no_grad():
        torch.nn.init.normal_(router.gate.weight, 0.0, 1.0)
        for p in experts.parameters():
            torch.nn.init.normal_(p, 0.0, 0.3)
        # the last feature is a constant 1 and pushes the last quarter of the experts far down: never chosen
        router.gate.weight[:, -1] = 0.0
        router.gate.weight[3 * E // 4:, -1] = -100.0
    x = torch.randn(T, D)
    x[:, -1] = 1.0
    return router, experts, x


def _run(dispatch, router, experts, x, g):
    params = list(router.parameters()) + list(experts.parameters())
    for p in params:
        p.grad = None
    x = x.clone().requires_grad_(True)
    plan = router(x)
    y = dispatch(x, plan, experts)
    ((y * g).sum() + sum(plan.aux_losses.values())).backward()
    return y.detach(), plan, [x.grad] + [p.grad for p in params]


@pytest.mark.parametrize("E,k,f,glu,bias", [
    (64, 2, 12, True, False),   # hidden rows scaled (f <= d)
    (64, 2, 12, False, True),   # a down bias: output rows scaled
    (256, 8, 6, True, False),   # the fine-grained twin's shape, scaled down
    (256, 8, 40, True, True),   # f > d: output rows scaled
], ids=["e64-glu", "e64-bias", "e256-glu", "e256-wide-bias"])
def test_sorted_equals_einsum_with_empty_experts(E, k, f, glu, bias):
    router, experts, x = _case(E, k, f, glu, bias, T=48)
    g = torch.randn(x.shape[0], D)
    y_ref, plan, grads_ref = _run(einsum_dispatch, router, experts, x, g)
    empty = int((plan.counts == 0).sum())
    assert empty >= E // 4, f"expected at least {E // 4} experts without tokens, got {empty}"
    y, _, grads = _run(sorted_dispatch, router, experts, x, g)
    torch.testing.assert_close(y, y_ref, **TOL)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **TOL)
    # an expert that received nothing gets an exact zero gradient, never stale memory
    dead = (plan.counts == 0).nonzero().flatten()
    assert experts.w_up.grad[dead].abs().max().item() == 0.0


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_aligned_widths_take_either_impl_and_agree(impl):
    """f = 12 and d = 16 are 16-byte multiples: `auto` may take grouped_mm, forced loop must equal it."""
    router, experts, x = _case(64, 2, 12, True, False, T=40, seed=1)
    g = torch.randn(x.shape[0], D)
    experts.gemm_impl = "auto"
    y_ref, _, grads_ref = _run(einsum_dispatch, router, experts, x, g)
    experts.gemm_impl = impl
    y, _, grads = _run(sorted_dispatch, router, experts, x, g)
    torch.testing.assert_close(y, y_ref, **TOL)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **TOL)


def test_row_scale_on_hidden_equals_scaling_the_output():
    """forward_sorted(row_scale=s) equals s * forward_sorted(): (s h) W = s (h W)."""
    _, experts, _ = _case(8, 2, 6, True, False, T=8)
    counts = torch.tensor([3, 0, 5, 2, 0, 4, 1, 1])
    expert_index = torch.repeat_interleave(torch.arange(8), counts)
    rows = torch.randn(int(counts.sum()), D)
    s = torch.rand(rows.shape[0])
    torch.testing.assert_close(experts.forward_sorted(rows, expert_index, counts, row_scale=s),
                               experts.forward_sorted(rows, expert_index, counts) * s[:, None], **TOL)
