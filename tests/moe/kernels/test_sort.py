"""Device-side sort by expert (moe.kernels.sort) gives routing.capacity.assign's dropless rows exactly."""
import os

import torch

if not torch.cuda.is_available():  # CPU: run the kernels in Triton's interpreter (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

from moe.kernels.sort import sort_by_expert, sort_impl  # noqa: E402
from routing import RouterConfig, build_router  # noqa: E402
from routing.router import RouterKernels  # noqa: E402
from routing.capacity import assign  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _choices(T, k, E, skew, seed):
    """[T, k] distinct experts per token. skew: the last two experts get nothing, and two thirds of the tokens put
    expert 1 first (a hot expert, uneven segments)."""
    gen = torch.Generator().manual_seed(seed)
    pool = E - 2 if skew else E
    rows = []
    for t in range(T):
        perm = torch.randperm(pool, generator=gen)
        if skew and t < 2 * T // 3:
            perm = torch.cat([perm[perm == 1], perm[perm != 1]])
        rows.append(perm[:k])
    return (torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.long)).to(DEVICE)


def _check(idx, E, **kw):
    got = sort_by_expert(idx, E, **kw)
    T, k = idx.shape
    tok, exp, w, counts, kept = assign(idx, torch.rand(T, k, device=idx.device), E, None, "position")
    assert torch.equal(got.token_index, tok)
    assert torch.equal(got.expert_index, exp)
    assert torch.equal(got.counts, counts)
    assert torch.equal(got.offsets, torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
    flat = idx.t().reshape(-1)
    assert torch.equal(flat[got.order], exp) and torch.equal(got.order % max(T, 1), tok)
    return got


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("skew", [False, True], ids=["random", "skewed"])
@pytest.mark.parametrize("T,k,E", [(37, 1, 5), (50, 2, 8), (29, 4, 13), (64, 2, 300), (1, 1, 1), (7, 2, 2)])
def test_equals_assign(T, k, E, skew, use_triton):
    got = _check(_choices(T, k, E, skew and E > 3, seed=T + k + E), E, use_triton=use_triton)
    if skew and E > 3:
        assert got.counts[-2:].sum() == 0, "the skewed case must have empty experts"


@pytest.mark.parametrize("skew", [False, True], ids=["random", "skewed"])
@pytest.mark.parametrize("T,k,E,block_a", [(100, 2, 8, 16), (57, 4, 37, 32), (300, 2, 5, 16)])
def test_several_blocks(T, k, E, block_a, skew):
    # 16-row blocks: histogram and scatter run many programs, and the scan loops over blocks of blocks.
    _check(_choices(T, k, E, skew, seed=T), E, use_triton=True, block_a=block_a)


def test_no_tokens():
    got = sort_by_expert(torch.zeros(0, 2, dtype=torch.long, device=DEVICE), 4)
    assert got.order.numel() == 0 and got.counts.tolist() == [0] * 4 and got.offsets.tolist() == [0] * 5


def test_strided_input():
    # a non-contiguous [T, k] view (a column slice) is read through its strides
    wide = _choices(40, 3, 9, False, seed=4)
    _check(wide[:, :2], 9, use_triton=True)
    _check(wide.t().contiguous().t(), 9, use_triton=True)


@pytest.mark.parametrize("k", [1, 2])
def test_router_with_device_sort_gives_the_same_plan(k):
    # What MoELayer passes on triton for the dropless path: RouterKernels(sort=...).
    torch.manual_seed(0)
    router = build_router(8, 6, RouterConfig(top_k=k, capacity_factor=0.0)).to(DEVICE)
    x = torch.randn(30, 8, device=DEVICE)
    plans = []
    for impl in (None, sort_impl):
        router.zero_grad(set_to_none=True)
        plan = router(x, kernels=RouterKernels(sort=impl))
        plan.weight.square().sum().backward()
        plans.append((plan, router.gate.weight.grad.clone()))
    (a, ga), (b, gb) = plans
    for name in ("token_index", "expert_index", "weight", "counts", "kept"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(ga, gb)
    for name in a.stats:
        assert torch.equal(a.stats[name], b.stats[name]), name
