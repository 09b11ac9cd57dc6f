"""routing.selection.select_topk (k float passes) equals the int64-key topk it replaced, index for index, in both
layouts and blocked; routing.capacity.assign's stable sort of expert ids equals the unique-key argsort it replaced."""
import pytest
import torch

import routing.selection as selection
from routing.capacity import assign
from routing.selection import select_topk, select_topk_by_key

CASES = [(E, k) for E in (8, 64, 256) for k in (1, 2, 8) if k <= E]


def _logits(T, E, seed, levels=None):
    g = torch.Generator().manual_seed(seed)
    if levels is None:
        return torch.randn(T, E, generator=g) * 3
    return torch.randint(0, levels, (T, E), generator=g).float() - levels / 2  # many ties, -0.0 never, 0.0 often


@pytest.mark.parametrize("layout", ["token_major", "expert_major"])
@pytest.mark.parametrize("E,k", CASES)
def test_passes_equal_the_key_on_ties_and_continuous(monkeypatch, E, k, layout):
    monkeypatch.setattr(selection, "EXPERT_MAJOR_BELOW", 10**6 if layout == "expert_major" else 0)
    monkeypatch.setattr(selection, "CHUNK_ELEMENTS", 37 * E)  # blocks of 37 rows: a ragged last block too
    for seed, levels in ((0, None), (1, 3), (2, 2), (3, 1)):  # levels=1: every logit of a row tied
        scores = _logits(101, E, seed, levels)
        got = select_topk(scores, k)
        assert got.dtype == torch.long and got.shape == (101, k)
        assert torch.equal(got, select_topk_by_key(scores, k)), (seed, levels)


@pytest.mark.parametrize("E,k", CASES)
def test_default_dispatch_equals_the_key(E, k):
    scores = _logits(600, E, 4, levels=4)  # E = 256: two blocks of 512 and 88 rows
    assert torch.equal(select_topk(scores, k), select_topk_by_key(scores, k))


@pytest.mark.parametrize("layout", ["token_major", "expert_major"])
def test_special_values_rank_as_floats(monkeypatch, layout):
    monkeypatch.setattr(selection, "EXPERT_MAJOR_BELOW", 10**6 if layout == "expert_major" else 0)
    inf = float("inf")
    rows = torch.tensor([
        [-0.0, 0.0, -1.0, -inf, inf, -3e38, 3e38, -1e-45],
        [-inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf],  # all tied: the lowest indices
        [1e-45, -1e-45, 0.0, -0.0, 2.0, 2.0, -inf, inf],
    ])
    assert torch.equal(select_topk(rows, 8), select_topk_by_key(rows, 8))
    assert select_topk(rows, 8)[0].tolist() == [4, 6, 0, 1, 7, 2, 5, 3]


def test_nan_rows_get_distinct_experts():
    nan = float("nan")
    rows = torch.tensor([[nan] * 8, [0.5, nan, 2.0, nan, -1.0, 0.0, 3.0, nan]])
    idx = select_topk(rows, 8)
    for r in idx.tolist():
        assert sorted(r) == list(range(8))
    assert idx[1, :3].tolist() == [1, 3, 7]  # every NaN ranks as +inf, the lowest index first
    assert idx[1, 3:].tolist() == [6, 2, 0, 5, 4]


def test_bad_k_names_the_setting_and_empty_shapes_as_topk():
    with pytest.raises(ValueError, match="top_k"):
        select_topk(torch.zeros(3, 4), 5)
    for shape, k in (((3, 4), 0), ((0, 4), 2), ((0, 64), 8)):
        got = select_topk(torch.zeros(shape), k)
        assert got.dtype == torch.long and got.shape == torch.zeros(shape).topk(k, dim=-1).indices.shape


def _assign_by_key(expert_idx, weight, num_experts, capacity):
    """assign's rows as computed before issues 16/21 (priority = flat position): one argsort of expert * A + a."""
    T, k = expert_idx.shape
    A = T * k
    flat_expert, flat_weight = expert_idx.t().reshape(A), weight.t().reshape(A)
    order = torch.argsort(flat_expert * A + torch.arange(A))
    counts = torch.bincount(flat_expert, minlength=num_experts)
    if capacity is not None:
        position = torch.arange(A) - (torch.cumsum(counts, 0) - counts)[flat_expert[order]]
        order = order[position < capacity]
        counts = counts.clamp(max=capacity)
    return torch.arange(T).repeat(k)[order], flat_expert[order], flat_weight[order], counts


@pytest.mark.parametrize("E,k", CASES)
@pytest.mark.parametrize("capacity", [None, 3])
def test_sort_by_expert_equals_the_key_sort(E, k, capacity):
    T = 257
    scores = _logits(T, E, 5, levels=3)
    idx = select_topk(scores, k)
    weight = torch.softmax(scores.gather(1, idx), -1)
    got = assign(idx, weight, E, capacity, "position")
    want = _assign_by_key(idx, weight, E, capacity)
    for a, b in zip(got[:4], want):
        assert torch.equal(a, b)
    if capacity is None:  # the dropless policy does not matter: the flat position is the priority
        for a, b in zip(assign(idx, weight, E, None, "probs")[:4], want):
            assert torch.equal(a, b)
