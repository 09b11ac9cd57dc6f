"""Split-K and TMA operands of the weight-gradient kernel (moe.kernels.weight_grad; issue 20, items 2 and 3).

Under the interpreter (no GPU): results against the unsplit kernel and a float64 torch reference at tiny shapes
with empty experts, one expert holding most rows and ragged tails; bitwise repeatability; no host
synchronisation; the chunk numbering; the config, the candidates and the table. Compiled for sm_90 without a GPU
(slow): every new variant, the TMA ones checked to contain TMA copies.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

# First: test_grouped_gemm sets TRITON_INTERPRET before triton's first import, and skips this module too
# where triton is missing or CPU tensors cannot run.
from tests.moe.kernels.test_grouped_gemm import CUDA, DEVICE, check, make_params
from tests.moe.kernels.test_grouped_gemm import plan as check_plan
from tests.moe.kernels.test_triton_dispatch import no_host_sync

import triton
import triton.language as tl

import moe.kernels.tile_configs as tc
import moe.kernels.weight_grad as wg
from moe.kernels.gemm_tiles import GemmBlocks, expert_tile
from moe.kernels.tile_configs import WgradBlocks, candidates, split_rows, split_candidates
from moe.kernels.weight_grad import chunk_bound, chunk_offsets, grouped_wgrad

COUNTS = (0, 61, 3, 0, 17)  # empty experts first and in the middle, one with 75% of the rows, ragged tails
T, P, Q = 40, 40, 24  # P (2 tiles), Q (1 tile) end mid-tile
TILE = dict(block_m=32, block_n=32, block_k=16, block_elementwise=1 << 16, num_warps=1, num_stages=1)
UNSPLIT = GemmBlocks(**TILE)
SPLIT = WgradBlocks(**TILE, split_rows=32)  # expert 1: chunks of 32 + 29 rows, each of 2 row blocks
SPLIT_TMA = WgradBlocks(**TILE, split_rows=32, tma=True)
TMA = GemmBlocks(**TILE, tma=True)


def plan(counts=COUNTS, seed=0):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    row_token = torch.randint(0, T, (sum(counts),), generator=g)
    return row_token.to(DEVICE), offsets.to(DEVICE)


def operands(up: bool, dtype, row_token, seed=1):
    """(grouped_wgrad's arguments a, a_index, b1, b2, b_index, scale; the rows a_rows [N, P], b_rows, scale [N] of
    the reference). up: a = x [T, P] gathered, b1, b2 = grad u, grad g [N, Q]; down: a = h [N, P], b1 = grad_y
    [T, Q] gathered, scaled by the combine weight."""
    g = torch.Generator().manual_seed(seed)
    N = row_token.numel()

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)

    if up:
        x, gu, gg = r(T, P), r(N, Q), r(N, Q)
        return (x, row_token, gu, gg, None, None), (x[row_token], [gu, gg], torch.ones(N, device=DEVICE))
    h, gy, s = r(N, P), r(T, Q), torch.rand(N, generator=g).to(DEVICE)
    return (h, None, gy, None, row_token, s), (h, [gy[row_token]], s)


def reference(rows, offsets):
    """float64 dw [E, P, Q] per b, db [E, Q] per b."""
    a_rows, b_rows, scale = rows
    dws, dbs = [], []
    for b in b_rows:
        sb = scale[:, None].double() * b.double()
        cuts = offsets.tolist()
        dws.append(torch.stack([a_rows[lo:hi].double().T @ sb[lo:hi] for lo, hi in zip(cuts, cuts[1:])]))
        dbs.append(torch.stack([sb[lo:hi].sum(0) for lo, hi in zip(cuts, cuts[1:])]))
    return dws + dbs


def rel(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("up", [True, False], ids=["up-glu", "down-scaled"])
def test_split_and_tma_equal_unsplit_and_reference(up, dtype):
    """Every gradient (both weights of the GLU, the bias sums) of split-K, split-K with TMA and TMA alone against
    the unsplit kernel and float64: fp32 elementwise 1e-5, bf16 relative error of each tensor 2e-2 (fp32 runs all
    three, bf16 the split with TMA). The split with TMA twice: bitwise equal."""
    row_token, offsets = plan()
    args, rows = operands(up, dtype, row_token)
    want = reference(rows, offsets)
    base = [t for t in grouped_wgrad(*args, offsets, len(COUNTS), True, UNSPLIT) if t is not None]
    runs = {}
    for blocks in [SPLIT_TMA, SPLIT, TMA] if dtype == torch.float32 else [SPLIT_TMA]:
        got = runs[blocks] = [t for t in grouped_wgrad(*args, offsets, len(COUNTS), True, blocks) if t is not None]
        assert len(got) == len(want) == len(base)
        for g, b, w in zip(got, base, want):
            assert g.dtype == dtype and g.shape == w.shape
            if dtype == torch.float32:
                torch.testing.assert_close(g, b, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
            else:
                assert rel(g, w) < 2e-2 and rel(g, b) < 2e-2
            assert not g[[0, 3]].any()  # empty experts: exact zeros
    again = [t for t in grouped_wgrad(*args, offsets, len(COUNTS), True, SPLIT_TMA) if t is not None]
    assert all(torch.equal(g, a) for g, a in zip(runs[SPLIT_TMA], again))


def test_tma_is_taken_for_plan_order_operands_only():
    """The descriptor path is the one tested above: a = h (down) and b1, b2 = grad u, grad g (up) get descriptors,
    the gathered x / grad_y never do; off without GemmBlocks.tma; 16-byte rows are needed."""
    rows = torch.zeros(10, 24, device=DEVICE)
    assert wg._row_blocks((rows, rows), TMA, 16, 16)[1]
    assert wg._row_blocks((rows,), UNSPLIT, 16, 16) == ((rows,), False)
    odd = torch.zeros(10, 13, device=DEVICE)  # 52-byte rows
    assert wg._row_blocks((rows, odd), TMA, 16, 16) == ((rows, odd), False)  # both or neither
    assert wg._row_blocks((rows[:0],), TMA, 16, 16)[1] is False  # no rows: nothing to describe
    seen = []
    real = wg._row_blocks

    def spy(ts, blocks, r, c):
        seen.append(len(ts))
        return real(ts, blocks, r, c)

    row_token, offsets = plan((5, 0, 3))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wg, "_row_blocks", spy)
        for up in (True, False):
            args, _ = operands(up, torch.float32, row_token)
            grouped_wgrad(*args, offsets, 3, False, TMA)
    assert seen == [2, 1]  # up: (grad u, grad g); down: (h,). Gathered operands are never offered


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # expert 2's own inf x 0 = NaN
@pytest.mark.parametrize("up", [True, False], ids=["up-glu", "down-scaled"])
def test_next_experts_rows_do_not_leak_through_tma(up):
    """A descriptor box of expert 1's last rows reads expert 2's first rows too: with an inf there (in grad u, or
    in h, whose combine weight 0 would give 0 x inf = NaN) expert 1's gradients and bias sums stay the reference."""
    row_token, offsets = plan()
    args, rows = operands(up, torch.float32, row_token)
    want = reference(rows, offsets)
    poisoned = list(args)
    poisoned[2 if up else 0] = args[2 if up else 0].clone()
    poisoned[2 if up else 0][COUNTS[1]] = float("inf")  # plan row 61: expert 2's first
    got = [t for t in grouped_wgrad(*poisoned, offsets, len(COUNTS), True, TMA) if t is not None]
    for g, w in zip(got, want):
        torch.testing.assert_close(g[[1, 4]].double(), w[[1, 4]], rtol=1e-5, atol=1e-5)
    assert not got[0][2].isfinite().all()  # expert 2 itself does see it


def test_whole_layer_with_split_and_tma_blocks():
    """WgradBlocks passed as blocks= to the public up and down functions: the row-tiled kernels read its GemmBlocks
    fields, both weight gradients split (int32 offsets; segments 37, 0, 17 in chunks of 32); forward and every
    gradient against the float64 reference (fp32, 1e-5)."""
    segments = (37, 0, 17)
    choices = [[e for e, n in enumerate(segments) if t < n] for t in range(max(segments))]
    row_token, offsets = check_plan(choices, len(segments), torch.int32)
    blocks = WgradBlocks(**{**TILE, "block_elementwise": 256}, split_rows=32, tma=True)
    params = make_params(max(segments), 32, 40, len(segments), True, True, torch.float32)
    passes = []
    real = wg.segment_sum
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wg, "segment_sum", lambda *a: passes.append(1) or real(*a))
        check(params, row_token, offsets, max(segments), "silu", blocks)
    assert len(passes) == 4 + 2  # up (GLU): two weights, two biases; down: weight and bias


@triton.jit
def _chunk_probe(offsets_ptr, out_ptr, E, SPLIT_ROWS: tl.constexpr, E_POW2: tl.constexpr):
    c = tl.program_id(0)
    e, lo, end = expert_tile(c, offsets_ptr, E, SPLIT_ROWS, E_POW2)
    tl.store(out_ptr + 3 * c, e)
    tl.store(out_ptr + 3 * c + 1, lo)
    tl.store(out_ptr + 3 * c + 2, tl.minimum(lo + SPLIT_ROWS, end))


@pytest.mark.parametrize("split", [16, 32, 64])
def test_chunks_tile_each_expert_in_order(split):
    """The kernel's chunk c (expert_tile with S-row tiles) against a Python table: expert after expert, cdiv(n_e, S)
    chunks of S rows (the last one ragged), none for an empty expert; spare chunks up to the shape bound are
    empty; chunk_offsets (the reduction's numbering) agrees."""
    _, offsets = plan()
    bound = chunk_bound(sum(COUNTS), split, len(COUNTS))
    want = [(e, lo, min(lo + split, hi)) for e, (lo, hi) in enumerate(zip(offsets.tolist(), offsets.tolist()[1:]))
            for lo in range(lo, hi, split)]
    out = torch.full((bound, 3), -1, dtype=torch.int64, device=DEVICE)
    _chunk_probe[(bound,)](offsets, out, len(COUNTS), SPLIT_ROWS=split, E_POW2=8)
    got = [tuple(r) for r in out.cpu().tolist()]
    assert len(want) <= bound and got[:len(want)] == want
    assert all(lo >= hi for _, lo, hi in got[len(want):])  # spare: no rows
    first = chunk_offsets(offsets, split).tolist()
    assert first == [sum(1 for e, *_ in want if e < x) for x in range(len(COUNTS) + 1)]


def test_no_rows_and_no_host_sync():
    """Every expert empty (and E = 1 with no rows): zeros; the split with TMA never synchronises with the host."""
    for counts in [(0, 0, 0), (0,)]:
        row_token, offsets = plan(counts)
        args, _ = operands(True, torch.float32, row_token)
        for t in grouped_wgrad(*args, offsets, len(counts), True, SPLIT_TMA):
            assert t.shape[0] == len(counts) and not t.any()
    row_token, offsets = plan()
    for up in (True, False):
        args, _ = operands(up, torch.float32, row_token)
        with no_host_sync():
            grouped_wgrad(*args, offsets, len(COUNTS), True, SPLIT_TMA)


def test_split_config_is_checked_and_off_by_default():
    for bad in (24, -16, "32", 1.5):
        with pytest.raises(ValueError, match="WgradBlocks.split_rows must be"):
            WgradBlocks(**TILE, split_rows=bad)
    assert split_rows(WgradBlocks(**TILE, split_rows=None)) == 0 == split_rows(UNSPLIT) == split_rows(WgradBlocks())
    assert split_rows(SPLIT) == 32
    for dtype in (torch.bfloat16, torch.float32):  # the defaults (no table entry) never split, nor use TMA
        b = tc.default_blocks(dtype)
        assert split_rows(b) == 0 and not b.tma
    tc.load_table.cache_clear()
    assert not any(split_rows(b) for b in tc.load_table(tc.TABLE_PATH).values())


def test_split_candidates_only_for_skewed_loads():
    """S = pow2 at or above the mean rows per expert (>= 4 block_k) and 4 S, kept where the busiest expert spans
    two chunks; on the largest surviving tile, after its TMA variant."""
    even, skewed = [1000] * 8, [5000] + [300] * 7  # mean 1000 -> S = 1024; skewed: mean 887.5 -> S = 1024
    assert split_candidates(even, 64) == []
    assert split_candidates(skewed, 64) == [1024]  # 4 S = 4096: the busiest has 5000 < 8192
    assert split_candidates([100000] + [0] * 15, 64) == [8192, 32768]  # mean 6250: 4 S fits 3 chunks
    assert split_candidates([40, 0, 0], 64) == []  # S >= 256: tiny loads never split
    got = candidates("wgrad_down", torch.bfloat16, expert_rows=[100000] + [0] * 15)
    plain = candidates("wgrad_down", torch.bfloat16)
    assert got[:len(plain)] == plain and plain[-1].tma and not any(split_rows(b) for b in plain)
    largest = plain[-2]
    assert got[len(plain):] == [WgradBlocks(**vars(largest), split_rows=s) for s in (8192, 32768)]
    assert candidates("down", torch.bfloat16, expert_rows=[100000] + [0] * 15) == candidates("down", torch.bfloat16)


def test_table_entry_with_split_rows(tmp_path, monkeypatch):
    """A weight-gradient entry may carry split_rows: the launch without blocks= then splits (the second pass runs)
    and still equals the reference; split_rows in another kernel's entry is refused, naming the file."""
    row_token, offsets = plan()
    device = "interpreter" if not CUDA else torch.cuda.get_device_name()
    entry = dict(device=device, kernel="wgrad_down", dtype="float32", rows=sum(COUNTS), k=P, n=Q,
                 blocks=dict(block_m=16, block_n=16, block_k=16, split_rows=32))
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": 1, "entries": [entry]}))
    monkeypatch.setenv(tc.TABLE_ENV, str(path))
    tc.load_table.cache_clear()
    args, rows = operands(False, torch.float32, row_token)
    assert tc.tiles_for("wgrad_down", None, args[0], sum(COUNTS), P, Q) == WgradBlocks(
        **{**vars(tc.default_blocks(torch.float32)), "block_m": 16, "block_n": 16, "block_k": 16}, split_rows=32)
    passes = []
    real = wg.segment_sum
    monkeypatch.setattr(wg, "segment_sum", lambda *a: passes.append(a[1]) or real(*a))
    got = grouped_wgrad(*args, offsets, len(COUNTS), True, None)
    assert len(passes) == 2  # dw and db reduced over chunks
    for g, w in zip([got[0], got[2]], reference(rows, offsets)):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
    entry.update(kernel="down")
    path.write_text(json.dumps({"format": 1, "entries": [entry]}))
    tc.load_table.cache_clear()
    with pytest.raises(ValueError, match="'blocks' must be an object with fields among") as info:
        tc.load_table(path)
    assert str(path) in str(info.value)
    tc.load_table.cache_clear()


# -------------------------------------------------------------------------------- compiled for a GPU, without one

# As test_grouped_gemm's compile test: the sm_90 compiler (front end, MLIR passes, ptxas) in a process where triton
# is not interpreted. Every new variant, for bf16 and fp32, at the largest candidate tiles; the TMA variants'
# TTGIR must hold TMA copies (the descriptor path was not dropped for pointer loads).
COMPILE_SCRIPT = textwrap.dedent("""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type
    from triton.tools.tensor_descriptor import TensorDescriptor
    import moe.kernels.weight_grad as wg
    from moe.kernels.tile_configs import candidates

    def build(fn, types, consts, **opts):
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}  # ints: i32
        return triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32), options=opts)

    for dt, dtype, prec in (("*bf16", torch.bfloat16, "tf32"), ("*fp32", torch.float32, "ieee")):
        p = lambda *names, t=dt: {n: t for n in names}
        def desc(rows, cols):  # the TMA descriptor type of [N, width] rows as the launcher makes it
            return mangle_type(TensorDescriptor.from_tensor(torch.empty(512, 256, dtype=dtype), [rows, cols]))
        for up in (True, False):
            b = candidates("wgrad_up_glu" if up else "wgrad_down", dtype)[-2]  # the largest tiles that fit
            for split, tma in ((256, False), (0, True), (256, True)):
                types = {**p("a_ptr", "b1_ptr", "b2_ptr"), **p("a_index_ptr", "b_index_ptr", "offsets_ptr", t="*i64"),
                         **p("dw1_ptr", "dw2_ptr", "db1_ptr", "db2_ptr", t="*fp32" if split else dt),
                         **p("scale_ptr", t="*fp32")}
                if tma:
                    types.update(p("b1_ptr", "b2_ptr", t=desc(b.block_k, b.block_n)) if up else
                                 p("a_ptr", t=desc(b.block_k, b.block_m)))
                k = build(wg._chunked_wgrad_kernel, types,
                          dict(A_GATHER=up, B_GATHER=not up, HAS_SCALE=not up, TWO=up, HAS_BIAS=True,
                               A_DESC=tma and not up, B_DESC=tma and up, SPLIT_ROWS=split, E_POW2=8, PRECISION=prec,
                               INTERPRETED=False, BLOCK_P=b.block_m, BLOCK_Q=b.block_n, BLOCK_R=b.block_k),
                          num_warps=b.num_warps, num_stages=b.num_stages)
                assert ("tma" in k.asm["ttgir"]) == tma, (dt, up, split, tma)
                print("ok", dt, "up" if up else "down", "split", split, "tma", tma, flush=True)
    print("compiled")
""")


@pytest.mark.slow
def test_split_and_tma_variants_compile_for_hopper(tmp_path):
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, and never into the home directory
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
    assert done.stdout.count("ok ") == 12
