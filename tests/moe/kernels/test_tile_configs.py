"""Tile configurations of the Triton GEMMs (issue 20, item 1): every candidate tile gives the reference results
forward and backward, the swizzled 1D launch order covers every tile once, pruning and the tuned table.

Under the interpreter (no GPU) the tiles' block sizes are what is exercised; warps and stages only matter to the
compiler (tests/moe/kernels/test_grouped_gemm.py::test_kernels_compile_for_hopper compiles them for sm_90).
"""
from __future__ import annotations

import json

import pytest
import torch

# First: test_grouped_gemm sets TRITON_INTERPRET before triton's first import, and skips this module too
# where triton is missing or CPU tensors cannot run.
from tests.moe.kernels.test_grouped_gemm import CUDA, DEVICE, check, make_params, plan, random_plan

import triton
import triton.language as tl

import moe.kernels.tile_configs as tc
import moe.kernels.up_projection as upk
from moe.kernels.gemm_tiles import GemmBlocks, row_launch, swizzle
from moe.kernels.tile_configs import candidates, shared_bytes, tiles_for

# Every distinct block shape of the candidate lists (warps and stages do not change interpreted results).
TILES = sorted({(b.block_m, b.block_n, b.block_k) for dt in (torch.bfloat16, torch.float32)
                for kernel in tc.KERNELS for b in candidates(kernel, dt)})


def test_candidate_tiles_are_the_planned_ones():
    assert TILES == [(64, 128, 32), (64, 128, 64), (128, 128, 32), (128, 128, 64), (128, 256, 32), (128, 256, 64)]


@pytest.mark.parametrize("even", [False, True], ids=["tails", "even"])
@pytest.mark.parametrize("tile", TILES, ids=lambda t: "x".join(map(str, t)))
def test_every_candidate_tile_matches_reference(tile, even):
    """Forward and every gradient of up + down at each candidate tile. tails: d=40, f=72 end mid-tile (the masked
    paths); even: d=128, f=256 divide every block_k, and f every block_n (EVEN_K and, where n = f, EVEN_N drop the
    column masks; the down GEMM's n = d = 128 stays masked for 256-wide tiles)."""
    bm, bn, bk = tile
    d, f = (128, 256) if even else (40, 72)
    tokens, experts = 12, 4
    row_token, offsets = random_plan(tokens, experts, used=[0, 2, 3], seed=5, device=DEVICE)  # expert 1 empty
    blocks = GemmBlocks(block_m=bm, block_n=bn, block_k=bk, block_elementwise=1 << 16, num_warps=1, num_stages=1)
    check(make_params(tokens, d, f, experts, True, True, torch.float32), row_token, offsets, tokens, "silu", blocks)


def test_swizzle_groups_with_many_tiles():
    """16-row, 16-column tiles: 7 row tiles × 3 column tiles in groups of 3 (the last group short): every kernel's
    results equal the reference (test_grouped_gemm's 16-row test runs one group of 8)."""
    group_m = 3
    segments = (37, 0, 17)
    choices = [[e for e, n in enumerate(segments) if t < n] for t in range(max(segments))]
    row_token, offsets = plan(choices, len(segments), torch.int32)
    blocks = GemmBlocks(block_m=16, block_n=16, block_k=16, block_elementwise=256, num_warps=1, num_stages=1,
                        group_m=group_m)
    params = make_params(max(segments), 32, 40, len(segments), True, True, torch.float32)
    check(params, row_token, offsets, max(segments), "gelu", blocks)


@triton.jit
def _swizzle_probe(out_ptr, M_TILES, N_TILES, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = swizzle(pid, M_TILES, N_TILES, GROUP_M)
    tl.store(out_ptr + 2 * pid, pid_m)
    tl.store(out_ptr + 2 * pid + 1, pid_n)


@pytest.mark.parametrize("m_tiles,n_tiles,group_m", [(7, 3, 3), (8, 5, 8), (5, 4, 1), (2, 6, 8)])
def test_swizzle_is_a_permutation_in_groups(m_tiles, n_tiles, group_m):
    out = torch.full((m_tiles * n_tiles, 2), -1, dtype=torch.int32, device=DEVICE)
    _swizzle_probe[(m_tiles * n_tiles,)](out, m_tiles, n_tiles, GROUP_M=group_m)
    pairs = [tuple(p) for p in out.cpu().tolist()]
    assert sorted(pairs) == [(m, n) for m in range(m_tiles) for n in range(n_tiles)]  # each tile exactly once
    for pid, (m, n) in enumerate(pairs):
        group = pid // (group_m * n_tiles)
        assert group * group_m <= m < (group + 1) * group_m  # a group's programs stay on its row tiles
        rows_in_group = min(group_m, m_tiles - group * group_m)
        assert (m - group * group_m) == (pid % (group_m * n_tiles)) % rows_in_group  # row tiles vary fastest


def test_pruning_by_shared_memory_and_registers():
    """bf16 numbers: a GLU up stage holds one x tile and two weight tiles; the GLU grad-x stage two of each."""
    big = GemmBlocks(128, 256, 64, num_warps=8, num_stages=3)
    assert shared_bytes("up_glu", big, torch.bfloat16) == 3 * (128 * 64 + 2 * 64 * 256) * 2 == 245760  # > 227 KB
    assert shared_bytes("down", big, torch.bfloat16) == 3 * (128 * 64 + 64 * 256) * 2 == 147456
    assert tc.accumulator_registers("up_glu", big) == 256 and tc.accumulator_registers("down", big) == 128
    # register_estimate (fitted to the sm_90 compiles, issue 20): 128x256 stays only where it compiled spill-free
    assert big not in candidates("up_glu", torch.bfloat16) and big not in candidates("down", torch.bfloat16)
    assert big in candidates("wgrad_down", torch.bfloat16)
    four = GemmBlocks(128, 128, 64, num_warps=8, num_stages=4)
    assert shared_bytes("grad_x_glu", four, torch.bfloat16) == 262144
    assert four not in candidates("grad_x_glu", torch.bfloat16) and four in candidates("down", torch.bfloat16)
    assert four not in candidates("up_glu", torch.bfloat16)  # two 128x128 accumulators spill on sm_90
    for kernel in tc.KERNELS:  # the defaults always stay, first
        assert candidates(kernel, torch.bfloat16)[0] == tc.GPU_BLOCKS
        assert candidates(kernel, torch.float32)[0] == tc.GPU_BLOCKS_FP32
    # the largest survivor again, persistent and (weights read by descriptors) with TMA; weight gradients only with
    # TMA (their plan-order operands; split-K candidates need the loads: tests/moe/kernels/test_split_k.py)
    *_, largest, persistent, tma = candidates("down", torch.bfloat16)
    assert persistent == GemmBlocks(128, 128, 64, num_warps=8, num_stages=4, persistent=True) == \
        GemmBlocks(**{**vars(largest), "persistent": True})
    assert tma == GemmBlocks(128, 128, 64, num_warps=8, num_stages=4, tma=True)
    *_, persistent_h, tma_h = candidates("grad_h", torch.bfloat16)  # grad-h reads its weights by descriptor too
    assert persistent_h.persistent and not persistent_h.tma and tma_h.tma and not tma_h.persistent
    *_, largest, tma = candidates("wgrad_down", torch.bfloat16)
    assert tma == GemmBlocks(**{**vars(largest), "tma": True}) and not largest.tma
    assert not any(b.persistent for b in candidates("wgrad_down", torch.bfloat16))


def write_table(path, entries):
    path.write_text(json.dumps({"format": 1, "entries": entries}))
    tc.load_table.cache_clear()
    return path


def entry(kernel="down", rows=64, k=32, n=48, **blocks):
    return dict(device="interpreter" if not CUDA else torch.cuda.get_device_name(), kernel=kernel,
                dtype="float32", rows=rows, k=k, n=n, blocks=blocks or dict(block_m=16, block_n=32, block_k=16))


def test_table_lookup_exact_nearest_and_default(tmp_path, monkeypatch):
    like = torch.empty(1, device=DEVICE)
    path = write_table(tmp_path / "t.json", [entry(rows=64), entry(rows=4096, block_m=32, block_n=64, block_k=32)])
    monkeypatch.setenv(tc.TABLE_ENV, str(path))
    exact = tiles_for("down", None, like, 50, 32, 48)  # bucket 64
    assert (exact.block_m, exact.block_n, exact.block_k) == (16, 32, 16)
    assert exact.block_elementwise == tc.default_blocks(torch.float32).block_elementwise  # not in the entry
    near = tiles_for("down", None, like, 3000, 32, 48)  # bucket 4096 nearer than 64
    assert (near.block_m, near.block_n, near.block_k) == (32, 64, 32)
    assert tiles_for("down", None, like, 50, 32, 49) == tc.default_blocks(torch.float32)  # other n: defaults
    assert tiles_for("grad_h", None, like, 50, 32, 48) == tc.default_blocks(torch.float32)  # other kernel
    mine = GemmBlocks(block_m=8)
    assert tiles_for("down", mine, like, 50, 32, 48) is mine  # the caller's blocks win
    monkeypatch.setenv(tc.TABLE_ENV, str(tmp_path / "absent.json"))
    assert tiles_for("down", None, like, 50, 32, 48) == tc.default_blocks(torch.float32)


def test_kernels_use_the_table(tmp_path, monkeypatch):
    """With an entry for the up kernel's bucket and no blocks=, the launch gets the entry's tiles (and is right)."""
    tokens, d, f, experts = 16, 32, 40, 5
    row_token, offsets = random_plan(tokens, experts, used=[1, 2, 4], seed=0, device=DEVICE)
    N = row_token.numel()
    path = write_table(tmp_path / "t.json", [entry("up_glu", N, d, f, block_m=16, block_n=16, block_k=16, group_m=2)])
    monkeypatch.setenv(tc.TABLE_ENV, str(path))
    seen = []

    def spy(x, blocks, *args):
        seen.append(blocks)
        return real(x, blocks, *args)

    real = upk.row_launch
    monkeypatch.setattr(upk, "row_launch", spy)
    check(make_params(tokens, d, f, experts, True, True, torch.float32), row_token, offsets, tokens, "silu")
    assert (seen[0].block_m, seen[0].block_n, seen[0].group_m) == (16, 16, 2)  # the up kernel: the entry
    assert seen[1] == tc.default_blocks(torch.float32)  # grad x: no entry, defaults


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    ('{"format": 2, "entries": []}', "format"),
    ('{"format": 1, "entries": [{"device": "x"}]}', r"entry 0: missing field\(s\)"),
    ('{"format": 1, "entries": [{"device": "x", "kernel": "upp", "dtype": "float32", "rows": 1, "k": 1, "n": 1, '
     '"blocks": {}}]}', "unknown kernel 'upp'"),
    ('{"format": 1, "entries": [{"device": "x", "kernel": "up", "dtype": "float32", "rows": 1, "k": 1, "n": 1, '
     '"blocks": {"block_q": 4}}]}', "entry 0: 'blocks' must be"),
    ('{"format": 1, "entries": [{"device": "x", "kernel": "up", "dtype": "float32", "rows": 1, "k": 1, "n": 1, '
     '"blocks": {"block_m": 48}}]}', "block_m must be a power of two"),
    ('{"format": 1, "entries": [{"device": "x", "kernel": "up", "dtype": "f32", "rows": 1, "k": 1, "n": 1, '
     '"blocks": {}}]}', "'dtype' must name a torch dtype"),
])
def test_bad_table_is_refused_naming_the_file(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    tc.load_table.cache_clear()
    with pytest.raises(ValueError, match=match) as info:
        tc.load_table(path)
    assert str(path) in str(info.value)


def test_repository_table_is_valid():
    tc.load_table.cache_clear()
    tc.load_table(tc.TABLE_PATH)  # raises on a malformed entry


@pytest.mark.parametrize("glu", [True, False])
def test_persistent_grid_matches_reference(glu):
    """GemmBlocks(persistent=True): 3 programs under the interpreter, each looping over several of the 7 × 3 tiles
    of every row-tiled kernel (up, down, grad h, grad x), forward and backward equal to the reference."""
    segments = (37, 0, 17)
    choices = [[e for e, n in enumerate(segments) if t < n] for t in range(max(segments))]
    row_token, offsets = plan(choices, len(segments), torch.int32)
    blocks = GemmBlocks(block_m=16, block_n=16, block_k=16, block_elementwise=256, num_warps=1, num_stages=1,
                        group_m=2, persistent=True)
    grid, launch = row_launch(torch.empty(1, device=DEVICE), blocks, 54, 3, 32, 40)
    assert grid == (3,) and launch["TILES"] == (4 + 2) * 3  # cdiv(54, 16) + E - 1 row tiles, 3 column tiles
    params = make_params(max(segments), 32, 40, len(segments), glu, True, torch.float32)
    check(params, row_token, offsets, max(segments), "silu", blocks)


@pytest.mark.parametrize("d,f", [(40, 72), (64, 128)], ids=["tails", "even"])
def test_tma_weight_descriptors_match_reference(d, f):
    """GemmBlocks(tma=True): the up, down and grad-x GEMMs read their weights through tensor descriptors (zero
    padding past K and NOUT instead of masks; grad x reads w_up's [1, n, k] blocks transposed)."""
    from moe.kernels.gemm_tiles import weight_operand

    tokens, experts = 12, 4
    row_token, offsets = random_plan(tokens, experts, used=[0, 2, 3], seed=5, device=DEVICE)
    blocks = GemmBlocks(block_m=16, block_n=32, block_k=16, block_elementwise=1 << 16, num_warps=1, num_stages=1,
                        tma=True)
    params = make_params(tokens, d, f, experts, True, True, torch.float32)
    assert weight_operand(params["w_up"].detach(), blocks, False)[1]  # the descriptor path is the one tested
    check(params, row_token, offsets, tokens, "silu", blocks)


def test_tma_falls_back_to_pointer_loads():
    from moe.kernels.gemm_tiles import weight_operand

    on = GemmBlocks(tma=True)
    aligned = torch.zeros(2, 8, 16, device=DEVICE)
    assert weight_operand(aligned, GemmBlocks(), False) == (aligned, False)  # off by default
    assert weight_operand(aligned, on, False)[1] and weight_operand(aligned, on, True)[1]
    odd = torch.zeros(2, 8, 13, device=DEVICE)  # rows of 52 bytes: not 16-byte aligned
    assert weight_operand(odd, on, False) == (odd, False)
    strided = aligned.transpose(1, 2)
    assert weight_operand(strided, on, False) == (strided, False)  # not contiguous
