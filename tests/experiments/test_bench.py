"""experiments.bench in its --quick mode on tiny shapes: every path runs, times and ratios are positive, and every
MoE implementation's output agreed with einsum (the bench asserts that before timing)."""
from __future__ import annotations

import math

import pytest
import torch

from experiments import bench


def test_parse_shapes():
    assert bench.parse_shapes("8k:512:2048:32:2") == [bench.Shape(8192, 512, 2048, 32, 2)]
    with pytest.raises(ValueError, match="T:d:f:E:k"):
        bench.parse_shapes("8192:512:2048")


def test_quick_run(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "bench.md"
    bench.main(["--quick", "--shapes", "64:32:48:4:1,64:32:48:4:2", "--reps", "2", "--out", str(out)])
    assert torch.get_num_threads() == threads  # restored
    printed = capsys.readouterr().out
    assert "load average" in printed and "allocator" in printed and "MegaBlocks" in printed
    md = out.read_text()
    assert md.count("#### T=64 d=32 f=48") == 2
    # the GEMM and bandwidth lines time torch's building blocks, and say so (ours: experiments.bench_kernels)
    assert md.count("torch's grouped GEMM forward") == 2 and md.count("combine (weighted index_add_)") == 2
    assert "experiments.bench_kernels" in md

    results, _ = bench.run(bench.parse_shapes("64:32:48:4:2"), reps=2, log=lambda s: None)
    rows = results[0].rows
    impls = {r.impl for r in rows}
    assert {"dense FFN (hidden k*f)", "einsum", bench.SORTED, "sorted (per-expert loop)",
            "Mixtral-style loop (transformers)", "experts only, pre-sorted"} <= impls
    for r in rows:
        assert r.min_ms > 0 and r.median_ms >= r.min_ms
        assert r.ratio_min > 0 and r.ratio_median_pairs > 0 and math.isfinite(r.ratio_min)
        if r.max_abs_diff is not None:  # every MoE implementation, checked against einsum before timing
            assert r.max_abs_diff < 1e-4
    assert all(v > 0 for v in results[0].gemm.values())
    assert all(v > 0 for v in results[0].bandwidth.values())


def test_disagreement_is_caught(monkeypatch):
    """A wrong implementation must stop the bench before timing."""
    real = bench.mixtral_loop
    monkeypatch.setattr(bench, "mixtral_loop", lambda layer, x, k: real(layer, x, k) * 1.5)
    with pytest.raises(AssertionError, match="disagrees with einsum"):
        bench.run(bench.parse_shapes("64:32:48:4:2"), reps=1, log=lambda s: None)


def test_bf16_run_and_cuda_refusal():
    results, md = bench.run(bench.parse_shapes("64:32:48:4:2"), reps=1, peers=False, log=lambda s: None, dtype="bf16")
    assert "bf16 on cpu" in md
    assert all(r.max_abs_diff is None or r.max_abs_diff < 3e-2 for r in results[0].rows)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cpu"):
            bench.run(bench.parse_shapes("64:32:48:4:2"), reps=1, peers=False, log=lambda s: None, device="cuda")
