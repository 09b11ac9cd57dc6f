"""experiments.bench_floor: the floor's arithmetic (FLOPs at a rate plus optimizer bytes at a bandwidth), the
phases of a step, and that timing a step by phase runs the same step as experiments.bench_step."""
import time

import pytest
import torch

from experiments.bench_floor import (ADAMW_BYTES_PER_PARAM, CLIP_BYTES_PER_PARAM, PHASES, WEIGHT_BYTES_PER_PARAM,
                                     Floor, _cached, floor_of, floor_ratio, gemm_rate,
                                     interleaved_phases, layer_parts, make_phased_step, step_ratios, summarise,
                                     update_bandwidth)
from experiments.bench_step import StepSetup, make_step, twin_config
from moe.flops import count_params, flops_per_token

TINY = dict(n_layer=1, d_model=32, n_head=2, d_ff=48)


def test_floor_is_flops_at_the_rate_plus_optimizer_bytes_at_the_bandwidth():
    setup = StepSetup()
    cfg = twin_config("moe_e64_k2", setup)
    seen = []

    def bandwidth(n):  # 10 GB/s whatever the size; records the sizes asked for
        seen.append(n)
        return 1e10

    f = floor_of(cfg, tokens=2048, seq_len=128, rate=1e11, bandwidth=bandwidth)
    P = count_params(cfg).total
    assert f.params == P and f.flops == flops_per_token(cfg, 128).training * 2048
    assert f.gemm_ms == pytest.approx(1e3 * f.flops / 1e11)
    assert f.opt_ms == pytest.approx(1e3 * (CLIP_BYTES_PER_PARAM + ADAMW_BYTES_PER_PARAM) * P / 1e10)
    assert f.weight_ms == pytest.approx(1e3 * WEIGHT_BYTES_PER_PARAM * P / 1e10)
    assert f.floor_ms == pytest.approx(f.gemm_ms + f.opt_ms)
    assert seen == [P]  # the update's bandwidth at the model's size


def test_floor_ratio_known_values():
    dense = Floor(params=1, flops=1, gemm_ms=100.0, opt_ms=2.0, weight_ms=0.0)
    twin = Floor(params=20, flops=1, gemm_ms=101.0, opt_ms=40.0, weight_ms=0.0)
    both, lenient = floor_ratio(twin, dense, dense_ms=200.0)
    assert both == pytest.approx(141.0 / 102.0)
    assert lenient == pytest.approx((200.0 + 39.0) / 200.0)  # dense as measured plus the twin's extra floor


def test_bandwidth_and_gemm_rate_are_positive_and_checked():
    assert update_bandwidth(1 << 16, reps=2) > 1e8  # any machine moves more than 100 MB/s
    assert gemm_rate(64, 32, 48, reps=2) > 1e7
    with pytest.raises(ValueError, match="1024 parameters"):
        update_bandwidth(100)


def test_cached_bandwidth_rounds_down_to_a_power_of_two_and_measures_once():
    calls = []
    at = _cached(lambda n: calls.append(n) or float(n))
    assert at(3 << 20) == float(2 << 20) and at(2 << 20) == float(2 << 20)
    assert at(100) == float(1 << 20)  # at least 1 MiB
    assert calls == [2 << 20, 1 << 20]


def test_phased_step_is_the_bench_step():
    """Same model, data and optimizer: the losses of three steps agree exactly with bench_step's closure."""
    torch.set_num_threads(1)
    setup = StepSetup(batch=2, seq_len=16)
    cfg = twin_config("moe_e8_k2", setup).replace(**TINY)
    phased, model_a = make_phased_step(cfg, setup)
    plain, model_b = make_step(cfg, setup)
    for _ in range(3):
        times = phased()
        assert set(times) == set(PHASES) and all(t >= 0 for t in times.values())
        plain()
    for (na, a), (nb, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert na == nb and torch.equal(a, b), na


def test_summaries_and_ratios_known_values():
    runs = {"dense": [dict.fromkeys(PHASES, 0.001), dict.fromkeys(PHASES, 0.002)],
            "moe": [dict.fromkeys(PHASES, 0.002), dict.fromkeys(PHASES, 0.003)]}
    s = summarise(runs["moe"])
    assert s["forward"] == pytest.approx((2.0, 2.5)) and s["step"] == pytest.approx((10.0, 12.5))
    r_min, r_med = step_ratios(runs)["moe"]
    assert r_min == pytest.approx(2.0) and r_med == pytest.approx((2.0 + 1.5) / 2)


def test_interleaving_skips_the_warmup_and_rotates():
    order = []
    steps = {n: (lambda n=n: order.append(n) or dict.fromkeys(PHASES, 0.0)) for n in ("a", "b")}
    runs = interleaved_phases(steps, reps=2, warmup=1)
    assert order == ["a", "b", "b", "a", "a", "b"] and all(len(v) == 2 for v in runs.values())


def test_layer_parts_times_each_part_of_each_slot():
    parts = layer_parts(["dense", "moe_e8_k2"], tokens=32, clock=time.thread_time, reps=1)
    assert set(parts) == {"dense", "moe_e8_k2"}
    assert set(parts["dense"]) == {"dense FFN"} and set(parts["moe_e8_k2"]) == {"router", "experts", "MoE layer"}
    assert all(t > 0 for p in parts.values() for t in p.values())
