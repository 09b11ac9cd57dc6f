"""Router initialisation (upcycle/router_init.py): removing the mean router input makes the logits depend on the
token (numbers on a synthetic input with a large shared component), keeps each row's drawn norm, and keeps the
exact recipes exact; the app calibrates on its verification text by default."""
from __future__ import annotations

import pytest
import torch

from routing.config import RouterConfig
from tests.upcycle.conftest import TINY, ids_for, make_hf
from upcycle import UpcycleConfig, exactness, read_dense, step0_check, upcycle
from upcycle.router_init import draw_router_rows, router_input_means


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_ri")
    make_hf("llama", path)
    return read_dense(path).build_model()


def _shared_input(T: int = 64, d: int = 32, shared: float = 4.0, spread: float = 0.25, seed: int = 3):
    """[T, d] hidden states like a released model's normed FFN input: one direction common to every token
    (length `shared`) plus a token-dependent part (per-coordinate std `spread`); and the shared direction [d]."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, generator=g)
    m = m / m.norm() * shared
    return m + spread * torch.randn(T, d, generator=g), m


def test_mean_removal_makes_logits_token_dependent():
    """8 rows, 64 tokens with a shared component 4x the norm of their token-dependent part (0.25 * sqrt(32)=1.4):
    plain normal rows give logits whose token-independent part (m.w, the same for all tokens) is most of their
    spread across experts, and top-2 reaches only some experts; the mean-free rows have m.w = 0 to round-off,
    keep the drawn norms, and top-2 reaches all 8 with a far more even load."""
    h, m = _shared_input()
    T, d = h.shape
    normal = draw_router_rows(8, d, 0.02, torch.Generator().manual_seed(0))
    free = draw_router_rows(8, d, 0.02, torch.Generator().manual_seed(0), mean=h.mean(0))
    u = h.mean(0) / h.mean(0).norm()
    assert torch.allclose(free.norm(dim=1), normal.norm(dim=1), rtol=1e-6)  # the std is kept, row by row
    assert float((free @ u).abs().max()) < 1e-7  # nothing left along the mean direction
    # The same draw: a mean-free row is the normal row minus its u-component, rescaled.
    proj = normal - (normal @ u)[:, None] * u[None]
    assert torch.allclose(free, proj * (normal.norm(dim=1) / proj.norm(dim=1))[:, None], atol=1e-9)

    def share_and_loads(w):
        logits = h @ w.T  # [T, E]
        shared = h.mean(0) @ w.T  # [E]: the part every token gets
        share = float(shared.var() / logits.var(0).sum().add(shared.var()))
        loads = torch.bincount(logits.topk(2, dim=1).indices.reshape(-1), minlength=8)
        return share, loads

    share_n, loads_n = share_and_loads(normal)
    share_f, loads_f = share_and_loads(free)
    print(f"\nshared share of logit variance {share_n:.3f} -> {share_f:.2e}; loads {loads_n.tolist()} -> {loads_f.tolist()}")
    assert share_n > 0.3 and share_f < 1e-10
    assert int((loads_n > 0).sum()) <= 6 and int((loads_f > 0).sum()) == 8
    assert float(loads_n.max()) / 16 > 2.5 and float(loads_f.max()) / 16 < 2.0  # 16 = 64 * 2 / 8 per expert


def test_zero_std_and_centred_input():
    g = torch.Generator().manual_seed(0)
    assert torch.count_nonzero(draw_router_rows(4, 8, 0.0, g, mean=torch.ones(8))) == 0
    w = draw_router_rows(4, 8, 0.02, torch.Generator().manual_seed(1), mean=torch.zeros(8))
    assert torch.equal(w, draw_router_rows(4, 8, 0.02, torch.Generator().manual_seed(1)))  # nothing to remove
    with pytest.raises(ValueError, match="mean has 7 entries, the router 8"):
        draw_router_rows(4, 8, 0.02, g, mean=torch.ones(7))


def test_router_input_means_leaves_the_model_as_it_was(llama):
    ids = ids_for(TINY["vocab"], length=16)  # [2, 16]
    before = llama(ids).logits
    means = router_input_means(llama, ids, (1, 3))
    assert sorted(means) == [1, 3] and means[1].shape == (TINY["d"],)
    assert all(len(b.ffn._forward_pre_hooks) == 0 for b in llama.blocks)  # hooks removed
    assert torch.equal(llama(ids).logits, before)
    # Mean over both rows = the average of each row's mean (equal lengths).
    halves = [router_input_means(llama, ids[r:r + 1], (1,))[1] for r in range(2)]
    assert torch.allclose(means[1], (halves[0] + halves[1]) / 2, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[batch, sequence\]"):
        router_input_means(llama, ids[0], (1,))
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        router_input_means(llama, torch.zeros(1, TINY["seq"] + 1, dtype=torch.long), (1,))


@pytest.mark.parametrize("kw", [dict(recipe="copy"), dict(recipe="granular", shards=2, router=RouterConfig(top_k=2)),
                                dict(recipe="shared"), dict(recipe="shared", shared_gate=True, shards=2),
                                dict(recipe="copy", router=RouterConfig(order="softmax_topk", renormalize=True))])
def test_mean_free_router_keeps_exact_recipes_exact(llama, kw):
    ids = ids_for(TINY["vocab"], length=33)
    cfg = UpcycleConfig(**kw)
    assert cfg.router_init == "mean_free"  # the default
    moe = upcycle(llama, cfg, calibration=ids[:, :-1])
    means = router_input_means(llama, ids[:, :-1], moe.cfg.sparse_layers)
    plain = upcycle(llama, cfg)  # no calibration: the paper's normal rows, same seed
    for i in moe.cfg.sparse_layers:
        w, w0 = moe.blocks[i].ffn.router.gate.weight.detach(), plain.blocks[i].ffn.router.gate.weight.detach()
        assert float((w @ (means[i] / means[i].norm())).abs().max()) < 1e-7
        assert torch.allclose(w.norm(dim=1), w0.norm(dim=1), rtol=1e-5) and not torch.allclose(w, w0)
    report = step0_check(llama, moe, ids, cfg.recipe, *exactness(cfg))
    assert report.expected_exact and report.max_abs_diff < 1e-5, report.text()


def test_normal_and_zero_ignore_the_calibration(llama):
    ids = ids_for(TINY["vocab"], length=17)
    for kw in (dict(router_init="normal"), dict(router_init_std=0.0)):
        a = upcycle(llama, UpcycleConfig(**kw), calibration=ids).blocks[1].ffn.router.gate.weight
        b = upcycle(llama, UpcycleConfig(**kw)).blocks[1].ffn.router.gate.weight
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="router_init='pca' is not a known router initialisation"):
        UpcycleConfig(router_init="pca")
