"""experiments.bench_step: the twins it times, its ratios, and the split of a profiled step into parts."""
import pytest
import torch

from experiments.bench_step import (OPTIMIZERS, PARTS, StepSetup, interleaved, make_step, make_update, profile_parts,
                                    profile_step, ratios, twin_config)
from moe.flops import flops_per_token


def test_demo_twins_match_dense_flops_and_the_fine_grained_width():
    setup = StepSetup()
    dense = flops_per_token(twin_config("dense", setup), setup.seq_len).training
    for name, width in (("moe_e64_k2", 181), ("moe_e256_k8", 37)):
        cfg = twin_config(name, setup)
        assert cfg.vocab_size == 257 and cfg.expert_hidden == width
        assert flops_per_token(cfg, setup.seq_len).training == pytest.approx(dense, rel=0.01)


def test_ratios_are_min_over_min_and_median_of_pairs():
    out = ratios({"dense": [0.010, 0.012, 0.011], "moe": [0.012, 0.018, 0.011]})
    assert out["dense"] == pytest.approx((10.0, 1.0, 1.0))
    ms, r_min, r_med = out["moe"]
    assert ms == pytest.approx(11.0) and r_min == pytest.approx(1.1) and r_med == pytest.approx(1.2)


def test_profile_split_puts_moe_work_in_its_parts():
    torch.set_num_threads(1)
    setup = StepSetup(batch=2, seq_len=16)
    small = dict(n_layer=1, d_model=32, n_head=2, d_ff=48)
    parts = {}
    for name in ("dense", "moe_e8_k2"):
        step, _ = make_step(twin_config(name, setup).replace(**small), setup)
        step()
        parts[name] = profile_step(step)
    for name, p in parts.items():
        assert set(PARTS) <= set(p) and all(v >= 0 for v in p.values())
        assert p["optimizer"] > 0 and p["attention/dense/other"] > 0
    for part in ("router", "dispatch", "expert GEMMs", "statistics"):
        assert parts["dense"][part] == 0.0, part  # a dense model has none of them
        assert parts["moe_e8_k2"][part] > 0.0, part


def test_profile_parts_takes_the_median_per_part():
    setup = StepSetup(batch=1, seq_len=8)
    step, _ = make_step(twin_config("dense", setup).replace(n_layer=1, d_model=16, n_head=2, d_ff=16), setup)
    parts = profile_parts({"dense": step}, rounds=3)["dense"]
    assert set(parts) == set(PARTS) and parts["dense FFN"] > 0
    with pytest.raises(ValueError, match="--profile-rounds"):
        profile_parts({"dense": step}, rounds=0)


def test_interleaved_reads_the_given_clock():
    """--clock cpu passes time.thread_time; any clock's differences are what come back, warm-up dropped."""
    ticks = iter(range(0, 100, 1))
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=2,
                        clock=lambda: float(next(ticks)))
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert times == {"a": [1.0, 1.0], "b": [1.0, 1.0]}


def test_start_puts_dense_first_and_checks_the_repetitions():
    import argparse

    from experiments.bench_step import start
    args = argparse.Namespace(allocator="system", reps=3, threads=1, twins="moe_e8_k2, moe_e16_k2")
    assert start("experiments.bench_step", [], args) == ["dense", "moe_e8_k2", "moe_e16_k2"]
    with pytest.raises(ValueError, match="--reps=2"):
        start("experiments.bench_step", [], argparse.Namespace(**{**vars(args), "reps": 2}))


def test_the_timed_update_is_the_trainers():
    """--optimizer trainer times what trainer=single runs (the fused kernel, the clip in its update); foreach and
    fused, torch's clip_grad_norm_ before AdamW: three steps of the three agree within fp32 round-off, with the
    clip active (max_norm 0.01 against norms of ~1-4)."""
    torch.set_num_threads(1)
    setup = StepSetup(batch=2, seq_len=16, max_norm=0.01)
    cfg = twin_config("moe_e8_k2", setup).replace(n_layer=1, d_model=32, n_head=2, d_ff=48)
    runs = {kind: make_step(cfg, setup, optimizer_kind=kind) for kind in OPTIMIZERS}
    losses = {kind: [float(step()) for _ in range(3)] for kind, (step, _) in runs.items()}
    trainer_opt = make_update(runs["trainer"][1], "trainer", 1.0)[0]
    assert all(g["fused"] for g in trainer_opt.param_groups)  # what the trainer builds by default
    for kind in ("foreach", "fused"):
        assert losses[kind] == pytest.approx(losses["trainer"], rel=1e-5)
        for a, b in zip(runs[kind][1].parameters(), runs["trainer"][1].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert losses["trainer"][2] < losses["trainer"][0]
    with pytest.raises(ValueError, match=r"optimizer 'sgd': choose one of \('trainer', 'foreach', 'fused'\)"):
        make_update(runs["trainer"][1], "sgd", 1.0)
