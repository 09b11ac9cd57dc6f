"""experiments.allocator: which environment each choice sets, and that the bench really re-runs under it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import allocator

LIBS = {"jemalloc": "/lib/libjemalloc.so.2", "tcmalloc": "/lib/libtcmalloc.so.4"}


def test_auto_prefers_jemalloc_then_tcmalloc_then_glibc():
    env, words = allocator.environment("auto", LIBS)
    assert env == {"LD_PRELOAD": LIBS["jemalloc"], "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}
    assert words.startswith("jemalloc")
    env, _ = allocator.environment("auto", {"tcmalloc": LIBS["tcmalloc"]})
    assert env == {"LD_PRELOAD": LIBS["tcmalloc"]}
    env, words = allocator.environment("auto", {})
    assert set(env) == {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} and "glibc" in words
    assert allocator.environment("system", LIBS)[0] == {}


def test_missing_or_unknown_allocator_is_refused():
    with pytest.raises(ValueError, match="libjemalloc2"):
        allocator.environment("jemalloc", {})
    with pytest.raises(ValueError, match="must be one of"):
        allocator.environment("mimalloc", LIBS)


def test_bench_reexecutes_with_the_allocator(tmp_path):
    """`python -m experiments.bench` re-runs itself once with glibc's retaining tunables and reports them."""
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in (allocator.MARK, "LD_PRELOAD")}
    out = subprocess.run(
        [sys.executable, "-m", "experiments.bench", "--shapes", "32:16:24:4:1", "--reps", "1", "--no-peers",
         "--allocator", "glibc-retain"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "allocator: glibc malloc with mmap and trim thresholds" in out.stdout
    assert "#### T=32 d=16 f=24 E=4 top-1" in out.stdout
