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


# ---------------------------------------------------------------- the fused gated path (moe.grouped_glu)

def _bank(E, f, activation, d=D, bias=False, seed=3):
    torch.manual_seed(seed)
    experts = Experts(E, d, f, activation, True, bias)
    with torch.no_grad():
        for p in experts.parameters():
            torch.nn.init.normal_(p, 0.0, 0.3)
    counts = torch.zeros(E, dtype=torch.long)
    counts[: E // 2] = torch.randint(1, 6, (E // 2,))  # the second half of the experts gets no row
    counts = counts[torch.randperm(E)]
    expert_index = torch.repeat_interleave(torch.arange(E), counts)
    rows = torch.randn(int(counts.sum()), d, requires_grad=True)
    scale = torch.rand(rows.shape[0], requires_grad=True)
    return experts, rows, expert_index, counts, scale


def _sorted_grads(experts, rows, expert_index, counts, scale, impl, g):
    experts.gemm_impl = impl
    for t in [rows, scale, *experts.parameters()]:
        if t is not None:
            t.grad = None
    y = experts.forward_sorted(rows, expert_index, counts, row_scale=scale)
    y.backward(g)
    return y.detach(), [rows.grad, None if scale is None else scale.grad] + [p.grad for p in experts.parameters()]


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("f,scaled", [(7, True), (13, False), (24, True)], ids=["f7-scaled", "f13", "f24>d-scaled"])
def test_fused_glu_equals_loop_with_empty_experts(activation, f, scaled):
    """Unaligned (7, 13) and aligned-but-wider-than-d (24 > 16: the weight scales the output rows) widths; the
    fused path's outputs and every gradient equal the per-expert loop's, empty experts get exact zeros."""
    experts, rows, expert_index, counts, scale = _bank(16, f, activation)
    scale = scale if scaled else None
    g = torch.randn(rows.shape[0], D)
    y_ref, ref = _sorted_grads(experts, rows, expert_index, counts, scale, "loop", g)
    y, got = _sorted_grads(experts, rows, expert_index, counts, scale, "fused", g)
    torch.testing.assert_close(y, y_ref, **TOL)
    for a, b in zip(got, ref):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, **TOL)
    dead = (counts == 0).nonzero().flatten()
    for name in ("w_gate", "w_up", "w_down"):
        assert getattr(experts, name).grad[dead].abs().max().item() == 0.0, name


def test_fused_glu_hidden_rows_are_aligned_for_grouped_mm():
    """The hidden rows come back as a padded view (row stride 8 for f = 7 in fp32: 32 bytes), which the down
    projection's grouped_mm takes without a copy."""
    from moe.grouped_glu import aligned_width, grouped_glu
    from moe.segment_matmul import _grouped_mm_ok

    experts, rows, _, counts, scale = _bank(8, 7, "silu")
    h = grouped_glu(rows, experts.w_gate, experts.w_up, counts, "silu", scale)
    assert h.shape == (rows.shape[0], 7) and h.stride() == (8, 1)
    assert aligned_width(7, torch.float32) == 8 and aligned_width(7, torch.bfloat16) == 8
    assert aligned_width(37, torch.float32) == 40 and aligned_width(181, torch.float32) == 184
    assert _grouped_mm_ok(h, experts.w_down)


def test_auto_takes_the_fused_path_only_for_small_segments():
    """prefer_fused_glu's cut at the demo twins' shapes (T = 2,048, d = 128): E = 256, k = 8, f = 37 fused; E = 64,
    f = 181 and E = 8, f = 191 not (measured slower there); auto follows it."""
    from moe.grouped_glu import prefer_fused_glu

    assert prefer_fused_glu(2048 * 8, 256, 37)
    assert not prefer_fused_glu(2048 * 2, 64, 181)
    assert not prefer_fused_glu(2048 * 2, 8, 191)
    experts, rows, expert_index, counts, scale = _bank(16, 7, "silu")
    y = experts.forward_sorted(rows, expert_index, counts, row_scale=scale)
    names = set()
    stack = [y.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None:
            names.add(type(fn).__name__)
            stack.extend(next_fn for next_fn, _ in fn.next_functions)
    assert "_GroupedGLUBackward" in names


def test_fused_requires_a_gated_bank_without_bias():
    experts, rows, expert_index, counts, _ = _bank(4, 8, "silu", bias=True)
    experts.gemm_impl = "fused"
    with pytest.raises(ValueError, match="gemm_impl='fused' needs gated experts without biases"):
        experts.forward_sorted(rows, expert_index, counts)


def test_fused_glu_bf16_close_to_loop():
    experts, rows, expert_index, counts, scale = _bank(8, 12, "silu")
    experts = experts.to(torch.bfloat16)
    rows16 = rows.detach().bfloat16()
    outs = []
    for impl in ("loop", "fused"):
        experts.gemm_impl = impl
        outs.append(experts.forward_sorted(rows16, expert_index, counts, row_scale=scale.detach()).float())
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)
