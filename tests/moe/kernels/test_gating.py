"""Fused top-k gating (moe.kernels.gating) equals routing.topk.topk_gating: indices, weights, probs, gradients."""
import os

import torch

if not torch.cuda.is_available():  # CPU: run the kernels in Triton's interpreter (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

from moe.kernels.gating import fused_topk_gating, topk_gating_forward  # noqa: E402
from routing import RouterConfig, build_router  # noqa: E402
from routing.router import RouterKernels  # noqa: E402
from routing.topk import topk_gating  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODES = [("topk_softmax", False), ("softmax_topk", False), ("softmax_topk", True)]
MODE_IDS = ["topk_softmax", "softmax_topk", "softmax_topk-renorm"]


def _logits(T, E, seed=0):
    # Continuous random logits: no ties, so torch.topk's choice is unambiguous on every device.
    return torch.randn(T, E, generator=torch.Generator().manual_seed(seed)).mul_(2.0).to(DEVICE)


def _both(logits, k, order, renorm, seed=1):
    """Forward and backward of a loss reading weights and probs, for torch's gating and the fused one."""
    gen = torch.Generator().manual_seed(seed)
    T, E = logits.shape
    gw, gp = torch.randn(T, k, generator=gen).to(DEVICE), torch.randn(T, E, generator=gen).to(DEVICE)
    out = []
    for fn in (topk_gating, fused_topk_gating):
        x = logits.detach().clone().requires_grad_(True)
        probs, weight, idx = fn(x, k, order, renorm)
        ((weight * gw).sum() + (probs * gp).sum()).backward()
        out.append((probs.detach(), weight.detach(), idx, x.grad))
    return out


@pytest.mark.parametrize("order,renorm", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("E", [8, 13, 60])
def test_equals_torch(E, k, order, renorm):
    (p0, w0, i0, g0), (p1, w1, i1, g1) = _both(_logits(37, E, seed=E * 10 + k), k, order, renorm)
    assert i1.dtype == torch.long and i1.shape == (37, k)
    assert torch.equal(i1, i0)
    torch.testing.assert_close(p1, p0, rtol=0, atol=1e-6)
    torch.testing.assert_close(w1, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("order,renorm", MODES, ids=MODE_IDS)
def test_several_programs_and_many_experts(order, renorm):
    # E = 300 pads to 512 columns; block_t=8 splits 45 rows over 6 programs, the last one partly masked.
    logits = _logits(45, 300, seed=3)
    p, w, i = topk_gating_forward(logits, 4, order, renorm, block_t=8)
    p0, w0, i0 = topk_gating(logits, 4, order, renorm)
    assert torch.equal(i, i0)
    torch.testing.assert_close(p, p0, rtol=0, atol=1e-6)
    torch.testing.assert_close(w, w0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("order,renorm", MODES, ids=MODE_IDS)
def test_ties_pick_the_lowest_expert(order, renorm):
    # A zero-initialised gate: every logit equal. The documented rule is the order of a stable descending sort.
    logits = torch.zeros(5, 10, device=DEVICE)
    logits[1, 7] = logits[1, 3] = 1.0  # a tie for the best, below it a tie of eight
    probs, w, idx = fused_topk_gating(logits, 3, order, renorm)
    ref = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :3]
    assert torch.equal(idx, ref)
    assert idx[0].tolist() == [0, 1, 2] and idx[1].tolist() == [3, 7, 0]
    # whatever torch.topk picks among the tied experts, the weights agree (they depend on the values only)
    _, w0, _ = topk_gating(logits, 3, order, renorm)
    torch.testing.assert_close(w, w0, rtol=0, atol=1e-6)


def test_bad_arguments_say_what_to_change():
    with pytest.raises(ValueError, match="top_k"):
        fused_topk_gating(torch.zeros(2, 4, device=DEVICE), 5, "topk_softmax", False)
    with pytest.raises(ValueError, match="order"):
        fused_topk_gating(torch.zeros(2, 4, device=DEVICE), 2, "sideways", False)


def test_no_rows():
    probs, w, idx = fused_topk_gating(torch.zeros(0, 6, device=DEVICE), 2, "softmax_topk", True)
    assert probs.shape == (0, 6) and w.shape == (0, 2) and idx.shape == (0, 2)


@pytest.mark.parametrize("order,renorm", MODES, ids=MODE_IDS)
def test_router_with_fused_gating_gives_the_same_plan(order, renorm):
    # What MoELayer passes on triton: RouterKernels(topk=...). Aux losses and gate gradients must be unchanged too.
    cfg = RouterConfig(top_k=2, order=order, renormalize=renorm, capacity_factor=1.0, min_capacity=1)
    torch.manual_seed(0)
    router = build_router(8, 6, cfg).to(DEVICE)
    x = torch.randn(24, 8, device=DEVICE)
    results = []
    for impl in (None, fused_topk_gating):
        router.zero_grad(set_to_none=True)
        plan = router(x, kernels=RouterKernels(topk=impl))
        (plan.weight.square().sum() + sum(plan.aux_losses.values())).backward()
        results.append((plan, router.gate.weight.grad.clone()))
    (a, ga), (b, gb) = results
    assert torch.equal(a.token_index, b.token_index) and torch.equal(a.expert_index, b.expert_index)
    assert torch.equal(a.counts, b.counts) and torch.equal(a.kept, b.kept)
    torch.testing.assert_close(b.weight, a.weight, rtol=0, atol=1e-6)
    for name in a.aux_losses:
        torch.testing.assert_close(b.aux_losses[name], a.aux_losses[name], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gb, ga, rtol=0, atol=1e-5)
