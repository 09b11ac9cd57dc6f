"""experiments.bench_kernels --quick: the command line as the GPU check runs it (a subprocess in which hydra cannot
be imported), every kernel row present in order, every number finite and positive, the ratios consistent with the
times, and the refusal of a full run under the interpreter."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from experiments import bench_kernels
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_quick_json_without_hydra(tmp_path):
    blocker = tmp_path / "blocker" / "hydra"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('bench_kernels must run without hydra')\n")
    out = tmp_path / "kernels.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), str(REPO_ROOT)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "experiments.bench_kernels", "--quick", "--json", str(out)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| kernel | ms | dense ms | copy ms |" in proc.stdout and "plumbing only" in proc.stdout
    result = json.loads(out.read_text())
    assert result["shape"] == {"T": 32, "d": 16, "f": 16, "E": 4, "k": 2} and result["interpreted"]
    rows = result["rows"]
    assert [r["kernel"] for r in rows] == list(bench_kernels.ROWS)
    N, d, f = 64, 16, 16
    flops = {r["kernel"]: r["flops"] for r in rows}
    up, down = 2 * N * d * f * 2, 2 * N * f * d  # GLU: up and gate
    assert flops["up forward, inference"] == flops["up forward, training"] == flops["grad-x GEMM"] == up
    assert flops["weight grad up"] == up
    assert flops["down GEMM"] == flops["down + combine"] == flops["grad-h"] == flops["weight grad down"] == down
    assert flops["grad-h + activation backward"] == down
    assert flops["expert MLP, forward + backward"] == 3 * (up + down)  # forward, grad of the input, of the weights
    no_flops = ("activation backward", "segment sum", "token order")
    for r in rows:
        for key in ("ms", "copy_ms", "bytes", "gbs", "pct_copy"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["kernel"], key, r[key])
        assert math.isclose(r["pct_copy"], 100 * r["copy_ms"] / r["ms"], rel_tol=1e-9)
        assert math.isclose(r["gbs"], r["bytes"] / r["ms"] / 1e6, rel_tol=1e-9)
        if r["kernel"] in no_flops:  # no dense reference
            assert r["flops"] == 0 and r["dense_ms"] is None and r["pct_dense"] is None
        else:
            assert r["dense_ms"] > 0 and math.isfinite(r["tflops"]) and r["tflops"] > 0
            assert math.isclose(r["pct_dense"], 100 * r["dense_ms"] / r["ms"], rel_tol=1e-9)
        assert r["pct_peak_flops"] is None and r["pct_peak_bw"] is None  # no peaks on CPU


def test_full_run_refused_under_the_interpreter():
    if bench_kernels.torch.cuda.is_available():
        pytest.skip("a CUDA device runs the full table")
    with pytest.raises(ValueError, match="--quick"):
        bench_kernels.run("64:32:48:4:2", quick=False, log=lambda s: None)
    with pytest.raises(ValueError, match="k=5 must be between 1 and E=4"):
        bench_kernels.make_problem(8, 16, 16, 4, 5, bench_kernels.torch.float32, bench_kernels.torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not bench_kernels.torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_table_has_peaks_and_sane_shares():
    result = bench_kernels.run("4096:512:1024:8:2", "bf16", reps=2, log=lambda s: None)
    for r in result["rows"]:
        assert r["pct_copy"] > 0, r
        if r["pct_peak_bw"] is not None:
            assert 0 < r["pct_peak_bw"] < 100, r
        if r["tflops"] is not None and result["peak_tflops"] is not None:
            assert 0 < r["pct_peak_flops"] < 100, r  # above the datasheet peak would mean a wrong FLOP count
