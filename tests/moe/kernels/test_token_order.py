"""The token-major order of a dropless plan without a sort (issue 20: TokenOrder.from_dropless): the same slots and
token offsets as TokenOrder.build's stable sort, so the Triton layer's outputs and gradients are bitwise the same,
chosen by the triton dispatcher from the plan's shapes alone, with no host sync."""
from __future__ import annotations

import pytest
import torch

# First: test_grouped_gemm sets TRITON_INTERPRET before triton's first import, and skips this module too
# where triton is missing or CPU tensors cannot run.
from tests.moe.kernels.test_grouped_gemm import DEVICE

import moe.dispatch.triton as triton_dispatch_module
from moe.kernels.combine import TokenOrder
from moe.kernels.sort import sort_by_expert
from routing.capacity import assign
from tests.moe.kernels.test_triton_dispatch import ROUTERS, _run, _setup, no_host_sync


def dropless_rows(num_tokens: int, top_k: int, num_experts: int, used: list[int], seed: int):
    """A dropless top-k plan's rows (routing.capacity.assign with capacity=None): each token picks top_k distinct
    experts among `used` in a random order (the others stay empty). -> row_token [N], row_expert [N]."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.stack([torch.tensor(used)[torch.randperm(len(used), generator=g)[:top_k]]
                         for _ in range(num_tokens)]) if num_tokens else torch.zeros(0, top_k, dtype=torch.long)
    weight = torch.rand(num_tokens, top_k, generator=g)
    token_index, expert_index, *_ = assign(picks, weight, num_experts, None, "position")
    return token_index.to(DEVICE), expert_index.to(DEVICE), picks


@pytest.mark.parametrize("T,k,E,used", [
    (37, 1, 6, [0, 2, 5]),  # top-1, three empty experts
    (29, 2, 5, [1, 2, 4]),  # top-2, experts 0 and 3 empty
    (23, 8, 12, [0, 1, 3, 4, 5, 7, 8, 10, 11]),  # top-8: the summation order of 8 rows is what must not change
    (16, 8, 8, list(range(8))),  # every expert, k = E
    (0, 2, 4, [0, 1, 2, 3]),  # no tokens
])
def test_from_dropless_equals_build(T, k, E, used):
    for seed in range(3):
        row_token, row_expert, _ = dropless_rows(T, k, E, used, seed)
        want = TokenOrder.build(row_token, T)
        got = TokenOrder.from_dropless(row_token, row_expert, T, k, E)
        assert got.slot.dtype == want.slot.dtype == torch.long
        assert torch.equal(got.slot, want.slot) and torch.equal(got.token_offsets, want.token_offsets)
        # a permutation of 0..N-1 with each token's k slots contiguous and in plan (= expert) order
        assert torch.equal(got.slot.sort().values, torch.arange(T * k, device=DEVICE))
        assert torch.equal(row_token[got.slot.argsort()], torch.arange(T, device=DEVICE).repeat_interleave(k))


def test_from_dropless_on_the_device_sorts_rows():
    """The rows of moe.kernels.sort (the router's device sort, choice-major and stable) give the same order."""
    T, k, E = 41, 3, 7
    picks = torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(t))[:k] for t in range(T)])
    rows = sort_by_expert(picks.to(DEVICE), E, use_triton=True, block_a=16)
    got = TokenOrder.from_dropless(rows.token_index, rows.expert_index, T, k, E)
    want = TokenOrder.build(rows.token_index, T)
    assert torch.equal(got.slot, want.slot) and torch.equal(got.token_offsets, want.token_offsets)


def test_from_dropless_refuses_a_plan_with_drops():
    row_token, row_expert, _ = dropless_rows(10, 2, 4, [0, 1, 2, 3], 0)
    with pytest.raises(ValueError, match=r"exactly top_k=2 rows per token.*TokenOrder.build"):
        TokenOrder.from_dropless(row_token[:-1], row_expert[:-1], 10, 2, 4)


@pytest.mark.parametrize("router_name,sort_free", [("top1", True), ("top2", True), ("top2-cf1", False),
                                                   ("top1-cf-1", False), ("expert_choice", False)])
def test_dispatcher_takes_the_sort_free_order_exactly_when_dropless(monkeypatch, router_name, sort_free):
    """Dropless token-choice plans (kept [T, k] and N == T*k) take from_dropless; plans that dropped rows (capacity)
    and expert choice's (no kept) sort. Either way the order equals build()'s."""
    router, experts, x = _setup(router_name, True, True, False)
    plan = router(x)
    calls = []
    real = TokenOrder.from_dropless
    monkeypatch.setattr(TokenOrder, "from_dropless", staticmethod(lambda *a: calls.append(a) or real(*a)))
    with no_host_sync():
        order = triton_dispatch_module.token_order(plan)
    assert bool(calls) == sort_free
    want = TokenOrder.build(plan.token_index, plan.num_tokens)
    assert torch.equal(order.slot, want.slot) and torch.equal(order.token_offsets, want.token_offsets)


def test_layer_outputs_and_gradients_bitwise_equal_with_the_sorted_order(monkeypatch):
    """A dropless top-3 layer through the triton dispatcher (3 rows per token: the order of a token's sum
    matters) with the sort-free order and with build()'s: y and every gradient bitwise equal."""
    monkeypatch.setitem(ROUTERS, "top3", dict(top_k=3))
    router, experts, x = _setup("top3", True, True, False)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    y_new, grads_new, plan = _run("triton", router, experts, x, g)
    assert plan.kept.shape == (x.shape[0], 3) and plan.token_index.numel() == 3 * x.shape[0]  # dropless
    monkeypatch.setattr(triton_dispatch_module, "token_order",
                        lambda p: TokenOrder.build(p.token_index, p.num_tokens))
    y_old, grads_old, _ = _run("triton", router, experts, x, g)
    assert torch.equal(y_new, y_old)
    assert grads_new.keys() == grads_old.keys()
    for name in grads_new:
        assert torch.equal(grads_new[name], grads_old[name]), name


def test_from_dropless_does_not_sync():
    row_token, row_expert, _ = dropless_rows(12, 2, 5, [0, 1, 3, 4], 1)
    with no_host_sync():
        order = TokenOrder.from_dropless(row_token, row_expert, 12, 2, 5)
    assert torch.equal(order.slot, TokenOrder.build(row_token, 12).slot)
