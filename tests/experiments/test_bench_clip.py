"""experiments.bench_clip: its variants time the same update (so the comparison is fair), the clip active."""
import torch

from experiments.bench_clip import VARIANTS, make_phase
from experiments.bench_step import StepSetup, twin_config


def test_clipping_variants_make_the_same_update():
    torch.set_num_threads(1)
    cfg = twin_config("moe_e8_k2", StepSetup(batch=2, seq_len=16)).replace(n_layer=1, d_model=32, n_head=2, d_ff=48)
    start = [p.detach().clone() for p in make_phase(cfg, "false", "torch", 1e-4)[1].parameters()]
    models = {}
    for name, (fused, how) in VARIANTS.items():
        phase, models[name] = make_phase(cfg, fused, how, 1e-4)
        assert phase() >= 0 and phase() >= 0  # twice: the second from the same gradients again
        assert all(p.grad is None for p in models[name].parameters())
    ref = list(models["torch clip + foreach"].parameters())
    for name in ("torch clip + fused", "folded, foreach", "folded, fused"):
        for a, b in zip(models[name].parameters(), ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # unclipped: Adam's step barely depends on the gradient's scale (eps 1e-8 against gradients of 1e-3 and of
    # ~1e-6 clipped), so the weights differ only a little; they still differ
    moved = [(a - s).abs().max().item() for a, s in zip(ref, start)]
    assert max(moved) > 1e-3
    assert any(not torch.equal(a, b) for a, b in zip(models["folded, fused, within the limit"].parameters(), ref))
