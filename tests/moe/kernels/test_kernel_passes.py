"""Passes the Triton MoE layer no longer makes twice (issue 20, item 2): each change keeps the results of the path
it replaces (bitwise where nothing is rounded differently, else to the reference's tolerance)."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

pytest.importorskip("triton", reason="the Triton kernels need the triton extra (pip install switchyard-moe[triton])")

from moe.kernels.combine import TokenOrder  # noqa: E402
from moe.kernels.down_combine import grouped_down_combine  # noqa: E402
from moe.kernels.up_projection import gather_grouped_up  # noqa: E402
from tests.moe.kernels.test_grouped_gemm import (CUDA, DEVICE, INTERPRETED, D, E, FF, T,  # noqa: E402
                                                 default_plan, make_params)
from tests.moe.kernels.test_triton_dispatch import _run, _setup  # noqa: E402

if not CUDA and not INTERPRETED:
    pytest.skip("CPU runs need the Triton interpreter: TRITON_INTERPRET=1 before moe.kernels is first imported",
                allow_module_level=True)


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

