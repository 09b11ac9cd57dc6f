"""Passes the Triton MoE layer no longer makes twice (issue 20, item 2): each change keeps the results of the path
it replaces (bitwise where nothing is rounded differently, else to the reference's tolerance)."""
from __future__ import annotations


import pytest
import torch

# First: test_grouped_gemm sets TRITON_INTERPRET before triton's first import, and skips this module too
# where triton is missing or CPU tensors cannot run.
from tests.moe.kernels.test_grouped_gemm import DEVICE, D, E, FF, T, default_plan, make_params

from moe.kernels.combine import TokenOrder
from moe.kernels.down_combine import grouped_down_combine
from moe.kernels.up_projection import gather_grouped_up
from tests.moe.kernels.test_triton_dispatch import _run, _setup


def _pair(params, row_token, offsets, row_weight, order):
    """y of up + down and every gradient of a fixed linear loss, with or without a shared TokenOrder."""
    p = params
    h = gather_grouped_up(p["x"], row_token, offsets, p["w_up"], p["w_gate"], p["b_up"], p["b_gate"], "silu",
                          token_order=order)
    y = grouped_down_combine(h, p["w_down"], p["b_down"], offsets, row_weight, row_token, T, token_order=order)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    names = [k for k, v in p.items() if v is not None]
    return [y.detach()] + list(torch.autograd.grad(y, [p[k] for k in names] + [row_weight], g))


def test_shared_token_order_is_built_once_per_layer(monkeypatch):
    """The triton dispatcher builds the token-major order once for forward and backward together (it used to be
    built by the combine's forward and again by the up projection's backward)."""
    router, experts, x = _setup("top2", True, True, False)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    calls = []
    real = TokenOrder.build

    def counting(row_token, num_tokens):
        calls.append(num_tokens)
        return real(row_token, num_tokens)

    monkeypatch.setattr(TokenOrder, "build", staticmethod(counting))
    # top2 is dropless: the dispatcher takes the sort-free constructor (tests/moe/kernels/test_token_order.py)
    dropless = TokenOrder.from_dropless

    def counting_dropless(row_token, row_expert, num_tokens, top_k, num_experts):
        calls.append(num_tokens)
        return dropless(row_token, row_expert, num_tokens, top_k, num_experts)

    monkeypatch.setattr(TokenOrder, "from_dropless", staticmethod(counting_dropless))
    _run("triton", router, experts, x, g)
    assert calls == [x.shape[0]]


def test_shared_order_gives_bitwise_the_same_results():
    row_token, offsets = default_plan()
    params = make_params(T, D, FF, E, True, True, torch.float32)
    row_weight = torch.rand(row_token.numel(), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    row_weight.requires_grad_()
    built = _pair(params, row_token, offsets, row_weight, None)
    shared = _pair(params, row_token, offsets, row_weight, TokenOrder.build(row_token, T))
    for a, b in zip(built, shared):
        assert torch.equal(a, b)


@pytest.mark.parametrize("up", [False, True], ids=["down-scaled", "up-glu"])
def test_weight_grad_several_p_tiles(up):
    """grouped_wgrad against per-expert torch products with 3 P tiles × 2 Q tiles: the combine weight scales the
    A side (down), the gate shares the gathered x tile (up), and the bias sums (computed by the first P tile's
    programs only) are each expert's column sums."""
    from moe.kernels.gemm_tiles import GemmBlocks
    from moe.kernels.weight_grad import grouped_wgrad

    g = torch.Generator().manual_seed(7)
    row_token, offsets = default_plan()
    N, P, Q = row_token.numel(), 40, 24
    blocks = GemmBlocks(block_m=16, block_n=16, block_k=16, num_warps=1, num_stages=1)
    s = torch.rand(N, generator=g).to(DEVICE)
    if up:  # a = x [T, P] gathered by row_token, b1, b2 = grad u, grad g [N, Q]
        a, b1, b2 = torch.randn(T, P, generator=g), torch.randn(N, Q, generator=g), torch.randn(N, Q, generator=g)
        a, b1, b2 = a.to(DEVICE), b1.to(DEVICE), b2.to(DEVICE)
        got = grouped_wgrad(a, row_token, b1, b2, None, None, offsets, E, True, blocks)
        a_rows, b_rows, scale = a[row_token], [b1, b2], torch.ones(N, device=DEVICE)
    else:  # a = h [N, P], b1 = grad_y [T, Q] gathered by row_token, scaled by s
        a, b1 = torch.randn(N, P, generator=g).to(DEVICE), torch.randn(T, Q, generator=g).to(DEVICE)
        got = grouped_wgrad(a, None, b1, None, row_token, s, offsets, E, True, blocks)
        a_rows, b_rows, scale = a, [b1[row_token]], s
    for i, b in enumerate(b_rows):
        for e in range(E):
            lo, hi = int(offsets[e]), int(offsets[e + 1])
            sb = scale[lo:hi, None].double() * b[lo:hi].double()
            torch.testing.assert_close(got[i][e].double(), a_rows[lo:hi].double().T @ sb, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[2 + i][e].double(), sb.sum(0), rtol=1e-5, atol=1e-5)


def test_down_rows_in_the_activation_dtype_summed_in_fp32():
    """bf16 token-major rows (half the traffic of fp32 rows): each row is rounded once, the k-way sum runs in fp32
    and y is rounded once more, so |y - exact| <= 2 u sum_r |z_r| elementwise (u = 2^-8, bf16's unit roundoff)."""
    from moe.kernels.combine import TokenOrder
    from moe.kernels.down_combine import launch_down

    row_token, offsets = default_plan()
    p = make_params(T, D, FF, E, True, True, torch.bfloat16)
    N = row_token.numel()
    h = torch.randn(N, FF, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.bfloat16)
    rw = torch.rand(N, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    order = TokenOrder.build(row_token, T)
    w, b = p["w_down"].detach(), p["b_down"].detach()
    assert launch_down(h, w, b, offsets, rw, order.slot).dtype == torch.bfloat16
    assert launch_down(h.float(), w.float(), b.float(), offsets, rw, order.slot).dtype == torch.float32
    y = grouped_down_combine(h, w, b, offsets, rw, row_token, T).double()
    z = torch.cat([h[offsets[e]:offsets[e + 1]].double() @ w[e].double() + b[e].double() for e in range(E)])
    z = z * rw.double()[:, None]  # [N, d] exact contributions
    exact = torch.zeros(T, D, dtype=torch.float64, device=DEVICE).index_add(0, row_token, z)
    bound = torch.zeros_like(exact).index_add(0, row_token, z.abs()) * 2 * 2.0 ** -8
    assert ((y - exact).abs() <= bound + 1e-12).all()
    assert (y - exact).abs().max() > 0  # bf16 really rounds here: the bound is what is being checked


def _mlp(params, row_token, offsets, row_weight, activation, merged: bool, blocks=None):
    """y and the gradients of a fixed linear loss: the merged function (kernel) or the chained torch reference."""
    from moe.kernels.expert_mlp import grouped_expert_mlp
    from tests.moe.kernels.test_grouped_gemm import ref_combine, ref_up

    p = params
    names = [k for k, v in p.items() if v is not None]
    rw = row_weight.detach().clone().requires_grad_()
    if merged:
        y = grouped_expert_mlp(p["x"], row_token, offsets, rw, p["w_up"], p["w_gate"], p["b_up"], p["b_gate"],
                               p["w_down"], p["b_down"], activation, blocks=blocks)
    else:
        h = ref_up(p["x"], row_token, offsets, p["w_up"], p["w_gate"], p["b_up"], p["b_gate"], activation)
        y = ref_combine(h, p["w_down"], p["b_down"], offsets, rw, row_token, T)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    grads = torch.autograd.grad(y, [p[k] for k in names] + [rw], g)
    return dict(y=y.detach(), **{f"grad_{k}": v for k, v in zip(names + ["row_weight"], grads)})


@pytest.mark.parametrize("activation,glu,bias,dtype", [
    ("silu", True, True, torch.float32),
    ("gelu_tanh", False, True, torch.float32),
    ("relu", False, False, torch.float32),
    ("gelu", True, False, torch.bfloat16),
])
def test_merged_expert_mlp_matches_reference(activation, glu, bias, dtype):
    """grouped_expert_mlp (one order, the activation backward fused into the grad-h epilogue) against the chained
    torch reference in float64: fp32 elementwise 1e-5, bf16 (fp32 master weights) relative error 2e-2."""
    row_token, offsets = default_plan()
    params = make_params(T, D, FF, E, glu, bias, dtype, torch.float32)
    rw = torch.rand(row_token.numel(), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got = _mlp(params, row_token, offsets, rw, activation, merged=True)
    p64 = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in params.items()}
    want = _mlp(p64, row_token, offsets, rw.double(), activation, merged=False)
    assert got.keys() == want.keys()
    for name, w in want.items():
        gt = got[name].double()
        if dtype == torch.float32:
            torch.testing.assert_close(gt, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        else:
            err = ((gt - w).norm() / w.norm().clamp_min(1e-6)).item()
            assert err < 2e-2, f"{name}: relative error {err:.3g}"


def test_fused_activation_backward_equals_the_separate_pass():
    """launch_grad_h_act == launch_grad_h then launch_act_backward (fp32: the same products in the same order, grad
    h kept in registers instead of stored), on 16-wide tiles: several f tiles, so grad row_weight sums partials."""
    from moe.kernels.down_combine import launch_grad_h, launch_grad_h_act
    from moe.kernels.gemm_tiles import GemmBlocks
    from moe.kernels.up_projection import launch_act_backward, launch_up

    row_token, offsets = default_plan()
    p = {k: (v.detach() if v is not None else None) for k, v in make_params(T, D, 40, E, True, True,
                                                                           torch.float32).items()}
    blocks = GemmBlocks(block_m=16, block_n=16, block_k=16, num_warps=1, num_stages=1)
    h, u, g = launch_up(p["x"], row_token, offsets, p["w_up"], p["w_gate"], p["b_up"], p["b_gate"], "gelu", True,
                        blocks)
    gy = torch.randn(T, D, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    rw = torch.rand(row_token.numel(), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    fused = launch_grad_h_act(gy, row_token, offsets, p["w_down"], p["b_down"], u, g, rw, "gelu", blocks)
    grad_h, grad_rw = launch_grad_h(gy, row_token, offsets, p["w_down"], p["b_down"], h, rw, blocks)
    separate = launch_act_backward(grad_h, u, g, "gelu", blocks) + (grad_rw,)
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_expert_rows_store_straight_to_their_own_place():
    """grouped_expert_rows (the expert-parallel local step: a permutation, weight 1) equals the combine it replaces
    (grouped_down_combine with one row per "token" and weight 1, as moe.dispatch.alltoall's _triton_local runs it:
    a sort and a per-token sum), and builds no TokenOrder."""
    from moe.kernels.expert_mlp import grouped_expert_rows

    M, E_l = 14, 3
    g = torch.Generator().manual_seed(9)
    p = make_params(M, D, FF, E_l, True, True, torch.float32)
    expert_of_row = torch.randint(0, E_l, (M,), generator=g).to(DEVICE)
    expert_of_row[:3] = torch.tensor([0, 2, 0])  # expert 1 may stay empty; 0 and 2 are used
    order = torch.argsort(expert_of_row, stable=True)
    counts = torch.bincount(expert_of_row, minlength=E_l)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    weights = [p[k] for k in ("w_up", "w_gate", "b_up", "b_gate", "w_down", "b_down")]
    gy = torch.randn(M, D, generator=g).to(DEVICE)
    built = []
    real = TokenOrder.build

    def counting(row_token, num_tokens):
        built.append(num_tokens)
        return real(row_token, num_tokens)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TokenOrder, "build", staticmethod(counting))
        out = grouped_expert_rows(p["x"], order, offsets, *weights, "silu")
        new = [out.detach()] + list(torch.autograd.grad(out, [p["x"]] + weights, gy))
    assert built == []
    h = gather_grouped_up(p["x"], order, offsets, *weights[:4], "silu")
    ones = torch.ones(M, device=DEVICE)
    old_out = grouped_down_combine(h, weights[4], weights[5], offsets, ones, order, M)
    old = [old_out.detach()] + list(torch.autograd.grad(old_out, [p["x"]] + weights, gy))
    assert torch.equal(new[0], old[0])  # fp32: the same products, one row per position, no sum to reorder
    for a, b in zip(new[1:], old[1:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # and it is what the experts compute, row by row
    x = p["x"].detach()
    for r in range(M):
        e, i = int(expert_of_row[order[r]]), int(order[r])
        u = x[i] @ p["w_up"][e] + p["b_up"][e]
        gate = x[i] @ p["w_gate"][e] + p["b_gate"][e]
        want = (torch.nn.functional.silu(gate) * u) @ p["w_down"][e] + p["b_down"][e]
        torch.testing.assert_close(new[0][i], want.detach(), rtol=1e-5, atol=1e-5)
