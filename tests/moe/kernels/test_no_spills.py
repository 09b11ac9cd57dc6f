"""Issue 20: no register spills in the kernels' default tiles on sm_90.

Every tiled kernel (moe.kernels.tile_configs.KERNELS) is compiled for sm_90 without a GPU at the tiles it runs
with when the tuned table has no entry (tile_configs.default_blocks), in bf16 and in fp32 (TF32), as the JIT
would specialise it for a real layer (tests/moe/kernels/sm90_builds.py, shape "aligned": widths multiples of 16,
contiguous strides 1), and ptxas's spill stores must be 0 bytes: a spill on Hopper is local-memory traffic in the
K loop. The register counts are ptxas's; what they cost in time is unmeasured here. Only the defaults (20 builds,
two workers, about a minute on two free cores): the candidates are audited by experiments/spill_audit.py.
"""
from __future__ import annotations

import textwrap

import pytest

from tests.moe.kernels.hopper_compile import run_compile_workers

SCRIPT = textwrap.dedent("""
    import torch
    from moe.kernels.tile_configs import KERNELS, default_blocks
    from tests.moe.kernels.sm90_builds import usage

    spilled = []
    for dtype in (torch.bfloat16, torch.float32):
        for kernel in KERNELS:
            if not claim():  # another worker compiles this one
                continue
            b = default_blocks(dtype)  # the GPU defaults: this process does not interpret
            r = usage(kernel, dtype, b)
            print(kernel, dtype, b.block_m, b.block_n, b.block_k, b.num_warps, b.num_stages, r, flush=True)
            assert r["registers"] is not None, (kernel, dtype, r)  # ptxas ran and was read
            if r["spills"]:
                spilled.append((kernel, str(dtype), r["registers"], r["spills"]))
    assert not spilled, f"default tiles that spill on sm_90 (kernel, dtype, registers, spill bytes): {spilled}"
    print(claimed_summary())
""")


@pytest.mark.slow
def test_default_tiles_do_not_spill_on_hopper(tmp_path):
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton build has no NVIDIA backend")
    assert run_compile_workers(SCRIPT, tmp_path, timeout_s=900) == 20  # 10 kernels x 2 dtypes, each compiled once


# (kernel, dtype, tiles (M, N, K, warps, stages), spill bytes ptxas reported in the audit: docs/benchmarks.md)
AUDITED = [("up_glu", "bfloat16", (128, 128, 64, 8, 3), 76), ("up_glu", "bfloat16", (64, 128, 64, 8, 3), 0),
           ("grad_h_act", "bfloat16", (64, 128, 64, 4, 3), 860), ("grad_h_act", "bfloat16", (64, 128, 64, 8, 3), 0),
           ("up", "bfloat16", (128, 256, 64, 8, 3), 1172), ("up", "bfloat16", (128, 128, 64, 8, 4), 0),
           ("down", "float32", (64, 128, 32, 4, 3), 12), ("down", "float32", (128, 128, 32, 8, 4), 0),
           ("wgrad_down", "bfloat16", (128, 256, 64, 8, 3), 0), ("wgrad_up_glu", "bfloat16", (128, 128, 64, 8, 4), 0)]


@pytest.mark.parametrize("kernel,dtype,tiles,spilled", AUDITED)
def test_register_estimate_prunes_what_spilled(kernel, dtype, tiles, spilled):
    import torch

    from moe.kernels.gemm_tiles import GemmBlocks
    from moe.kernels.tile_configs import REGISTER_BUDGET, register_estimate

    m, n, k, warps, stages = tiles
    est = register_estimate(kernel, GemmBlocks(m, n, k, num_warps=warps, num_stages=stages), getattr(torch, dtype))
    assert (est > REGISTER_BUDGET) == (spilled > 0), (est, spilled)


def test_register_estimate_known_values():
    import torch

    from moe.kernels.gemm_tiles import GemmBlocks
    from moe.kernels.tile_configs import register_estimate

    big = GemmBlocks(128, 128, 64, num_warps=8)
    # up_glu: 2.5 live tiles x 128*128/256 + (128*64 + 2*64*128) bf16 operands / 2 per register / 256 threads
    assert register_estimate("up_glu", big, torch.bfloat16) == 160 + 48 == 208
    assert register_estimate("wgrad_down", big, torch.bfloat16) == 64  # one tile, no operand term
    # the default: 1.5 x 64*128/256 + (64*64 + 64*128) / 2 / 256
    assert register_estimate("down", GemmBlocks(), torch.bfloat16) == 48 + 24 == 72
