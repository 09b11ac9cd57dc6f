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
