"""moe.dispatch.token_rows, the atomics-free gather and combine of the expert-parallel dispatcher: equal to
index_add_ (bitwise in fp32 on CPU, where index_add_ adds in row order too; within one rounding in bf16, where it
is closer to the exact sum than index_add_'s bf16 accumulation), bitwise repeatable, and its gradients equal
autograd's through the index_add_ formula. The CUDA run checks repeatability where index_add_ is atomic."""
from __future__ import annotations

import pytest
import torch

from moe.dispatch.token_rows import TokenSlots, combine_rows, gather_rows, token_slots


def _plan(T: int, k: int, E: int, seed: int = 0, device: str = "cpu"):
    """token_index [T*k] sorted by expert (as a RoutingPlan's), and the expert of each row."""
    g = torch.Generator().manual_seed(seed)
    expert = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # [T, k] distinct experts
    token = torch.arange(T)[:, None].expand(T, k)
    order = torch.argsort(expert.reshape(-1), stable=True)
    return token.reshape(-1)[order].to(device), expert.reshape(-1)[order].to(device)


def _old_combine(rows, weight, token_index, T):
    """The combine alltoall_dispatch had: weighted index_add_ in the rows' dtype."""
    back = rows * weight.to(rows.dtype)[:, None]
    return rows.new_zeros(T, rows.shape[1]).index_add_(0, token_index, back)


def test_slot_table_known_values():
    # tokens of 6 rows (expert order): token 2 has rows 0, 3, 5; token 0 has row 1; token 1 none; token 3 rows 2, 4
    token_index = torch.tensor([2, 0, 3, 2, 3, 2])
    order = token_slots(token_index, 4)
    assert order.slots.tolist() == [[1, 6, 0, 2], [6, 6, 3, 4], [6, 6, 5, 6]]  # 6 = N: the zero padding row
    assert order.per_token.tolist() == [1, 0, 3, 2]
    padded = order.padded(2, torch.device("cpu"))
    padded[:-1] = torch.arange(6.0)[:, None]
    assert order.sum_rows(padded).tolist() == [[1, 1], [0, 0], [8, 8], [6, 6]]


def test_fp32_bitwise_equal_to_index_add_and_gradients():
    T, k, E, d = 40, 3, 8, 24
    token_index, _ = _plan(T, k, E)
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(T * k, d, generator=g, requires_grad=True)
    weight = torch.rand(T * k, generator=g, requires_grad=True)
    gy = torch.randn(T, d, generator=g)
    ref = _old_combine(rows, weight, token_index, T)
    y = combine_rows(rows, weight, token_slots(token_index, T))
    assert torch.equal(y, ref)  # same per-token order (row order) and fp32 throughout
    ref_grads = torch.autograd.grad(ref, (rows, weight), gy)
    grads = torch.autograd.grad(y, (rows, weight), gy)
    assert torch.equal(grads[0], ref_grads[0])
    torch.testing.assert_close(grads[1], ref_grads[1], rtol=1e-6, atol=1e-6)  # a d-long dot, summed differently


def test_gather_backward_is_the_per_token_sum():
    T, k, E, d = 30, 4, 8, 16
    token_index, _ = _plan(T, k, E, seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, d, generator=g, requires_grad=True)
    grad_rows = torch.randn(T * k, d, generator=g)
    rows = gather_rows(x, token_slots(token_index, T))
    assert torch.equal(rows, x[token_index])
    (gx,) = torch.autograd.grad(rows, x, grad_rows)
    (ref,) = torch.autograd.grad(x[token_index], x, grad_rows)
    assert torch.equal(gx, ref)


def test_bf16_sum_in_fp32_is_within_one_rounding():
    T, k, E, d = 64, 4, 16, 32
    token_index, _ = _plan(T, k, E, seed=4)
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(T * k, d, generator=g).bfloat16()
    weight = torch.rand(T * k, generator=g)
    exact = _old_combine(rows.double(), weight.double(), token_index, T)  # fp64: exact to far below bf16
    y = combine_rows(rows, weight, token_slots(token_index, T))
    old = _old_combine(rows, weight, token_index, T)
    assert y.dtype == torch.bfloat16
    ulp = exact.abs().clamp_min(1e-3) * 2.0 ** -7  # one bf16 ulp (8 significant bits) of the exact value
    assert ((y.double() - exact).abs() <= ulp).all()  # the fp32 sum rounded once
    err_new, err_old = (y.double() - exact).abs().mean(), (old.double() - exact).abs().mean()
    assert err_new < err_old  # index_add_ rounds every product and every partial sum to bf16


def test_repeatable_bitwise_with_empty_tokens_and_no_rows():
    token_index = torch.tensor([5, 5, 0, 5, 2, 0])  # tokens 1, 3, 4 have no rows; token 5 has three
    g = torch.Generator().manual_seed(6)
    rows, weight = torch.randn(6, 8, generator=g), torch.rand(6, generator=g)
    ys = [combine_rows(rows, weight, token_slots(token_index, 6)) for _ in range(2)]
    assert torch.equal(ys[0], ys[1])
    assert ys[0][[1, 3, 4]].abs().sum() == 0
    empty = token_slots(torch.zeros(0, dtype=torch.long), 3)
    assert empty.slots.shape == (0, 3)
    assert torch.equal(combine_rows(torch.zeros(0, 8), torch.zeros(0), empty), torch.zeros(3, 8))


def test_no_atomic_op_forward_or_backward():
    """What makes CUDA runs repeatable, checked here: no aten op that accumulates with atomics on CUDA runs in
    the slot table, the gather, the combine or their backward (recorded under a dispatch mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.overloadpacket.__name__  # e.g. "index_put_" for aten.index_put_.default
            accumulate = "index_put" in name and (kwargs.get("accumulate") or (len(args) > 3 and args[3]))
            self.ops.append((name, bool(accumulate)))
            return func(*args, **kwargs)

    token_index, _ = _plan(20, 3, 8, seed=9)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(20, 8, generator=g, requires_grad=True)
    rows = torch.randn(60, 8, generator=g, requires_grad=True)
    weight = torch.rand(60, generator=g, requires_grad=True)
    with Record() as rec:
        order = token_slots(token_index, 20)
        y = combine_rows(rows, weight, order)
        r = gather_rows(x, order)
        torch.autograd.backward([y, r], [torch.ones_like(y), torch.ones_like(r)])
    names = {name for name, _ in rec.ops}
    atomic = {"index_add", "index_add_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_",
              "bincount", "index_reduce", "index_reduce_", "_index_put_impl_"}
    assert not names & atomic, names & atomic
    assert not any(acc for _, acc in rec.ops)  # no accumulating index_put either
    assert "index_select" in names and "sort" in names  # it did record the dispatch


def test_shape_mismatch_is_named():
    order = token_slots(torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="one entry per plan row"):
        combine_rows(torch.zeros(3, 4), torch.zeros(3), order)
    with pytest.raises(RuntimeError, match="set_max_rows"):
        TokenSlots.build(torch.tensor([0, 1]), 2).sum_rows(torch.zeros(3, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (index_add_ is atomic only there)")
def test_cuda_bitwise_repeatable_forward_and_backward():
    T, k, E, d = 4096, 8, 64, 512
    token_index, _ = _plan(T, k, E, seed=7, device="cuda")
    g = torch.Generator().manual_seed(8)
    rows = torch.randn(T * k, d, generator=g).bfloat16().cuda().requires_grad_(True)
    weight = torch.rand(T * k, generator=g).cuda().requires_grad_(True)
    x = torch.randn(T, d, generator=g).bfloat16().cuda().requires_grad_(True)
    gy = torch.randn(T, d, generator=g).bfloat16().cuda()
    grad_rows = torch.randn(T * k, d, generator=g).bfloat16().cuda()
    runs = []
    for _ in range(3):
        order = token_slots(token_index, T)
        y = combine_rows(rows, weight, order)
        runs.append((y, *torch.autograd.grad(y, (rows, weight), gy),
                     *torch.autograd.grad(gather_rows(x, order), x, grad_rows)))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)
