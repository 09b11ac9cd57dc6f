"""The row-tile table of the persistent grid and TMA for the contiguous row blocks (issue 20, item 3): the table
written on the device equals a Python reference, the persistent GEMMs that read it give bitwise the results of
one-tile-per-program launches, descriptors for h / grad u / grad g and grad-h's weights give bitwise the results of
pointer loads, none of it syncs with the host, and every new variant compiles for sm_90."""
from __future__ import annotations

import textwrap

import pytest
import torch

# First: test_grouped_gemm sets TRITON_INTERPRET before triton's first import, and skips this module too
# where triton is missing or CPU tensors cannot run.
from tests.moe.kernels.test_grouped_gemm import DEVICE, check, make_params, plan, random_plan

import moe.kernels.tile_table as tt
from moe.kernels.expert_mlp import grouped_expert_mlp
from moe.kernels.gemm_tiles import GemmBlocks, row_operand, weight_operand
from moe.kernels.sort import sort_by_expert
from moe.kernels.tile_table import tile_bound, tile_table
from tests.moe.kernels.test_triton_dispatch import no_host_sync


def reference_table(counts: list[int], block_m: int) -> list[int]:
    """The table's layout (moe.kernels.tile_table) written out in Python."""
    N, E = sum(counts), len(counts)
    tiles, lo = [], 0
    for e, n in enumerate(counts):
        tiles += [(e, start, lo + n) for start in range(lo, lo + n, block_m)]
        lo += n
    count = len(tiles)
    tiles += [(E - 1, N, N)] * (tile_bound(N, E, block_m) - count)  # empty tiles up to the shape bound
    return [count] + [v for t in tiles for v in t]


def offsets_of(counts, dtype=torch.long):
    return torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("counts", [
    [0, 5, 0, 17, 3],  # empty experts, ragged tails
    [16, 32, 0, 0],  # segments that end on a tile boundary, trailing empty experts
    [0, 0, 0],  # no rows at all
    [1],  # one expert, one row
    [7] * 40,  # 40 experts (E_POW2 = 64): two programs of 256 tiles at BLOCK_M = 1
    [3000, 1, 0, 2],  # thousands of tiles
])
@pytest.mark.parametrize("block_m", [1, 4, 16, 64])
def test_table_equals_reference(counts, block_m):
    want = reference_table(counts, block_m)
    assert tile_table(offsets_of(counts), sum(counts), block_m).tolist() == want
    assert tile_table(offsets_of(counts, torch.int32), sum(counts), block_m).tolist() == want


def test_sort_writes_the_table_after_its_scan():
    T, k, E = 50, 2, 6
    picks = torch.stack([torch.randperm(E - 1, generator=torch.Generator().manual_seed(t))[:k] for t in range(T)])
    rows = sort_by_expert(picks.to(DEVICE), E, use_triton=True, block_a=32, tile_block_m=8)  # expert E-1 empty
    assert rows.tile_table.tolist() == reference_table(rows.counts.tolist(), 8)
    assert sort_by_expert(picks.to(DEVICE), E, use_triton=True).tile_table is None


def test_bad_block_m_is_refused():
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        tile_table(offsets_of([3, 4]), 7, 12)


# ------------------------------------------------------------------------------------------------- the layer

TOKENS, D_MODEL, HIDDEN, EXPERTS = 14, 40, 72, 4  # d, f not multiples of the blocks: K and N tails


def layer(params, row_token, offsets, row_weight, blocks) -> dict:
    """y of grouped_expert_mlp and the gradients of a fixed linear loss in x and row_weight: every row-tiled GEMM
    runs (up, down, grad h with the activation backward, grad x). The weights are constants here, so the weight-
    gradient kernel (which takes no tile table and no row descriptors) is left out of these comparisons."""
    p = {k: v if v is None or k == "x" else v.detach() for k, v in params.items()}
    rw = row_weight.detach().clone().requires_grad_()
    y = grouped_expert_mlp(p["x"], row_token, offsets, rw, p["w_up"], p["w_gate"], p["b_up"], p["b_gate"],
                           p["w_down"], p["b_down"], "silu", blocks=blocks)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    grad_x, grad_rw = torch.autograd.grad(y, [p["x"], rw], g)
    return {"y": y.detach(), "grad_x": grad_x, "grad_row_weight": grad_rw}


def assert_bitwise(got: dict, want: dict, what: str):
    assert got.keys() == want.keys()
    for name in want:
        diff = (got[name].double() - want[name].double()).abs().max().item() if got[name].numel() else 0.0
        assert torch.equal(got[name], want[name]), f"{what}: {name} differs (max abs {diff:.3g})"


def layer_case(dtype):
    row_token, offsets = random_plan(TOKENS, EXPERTS, used=[0, 1, 3], seed=3, device=DEVICE)  # expert 2 empty
    params = make_params(TOKENS, D_MODEL, HIDDEN, EXPERTS, True, True, dtype)
    row_weight = torch.rand(row_token.numel(), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    return params, row_token, offsets, row_weight


# 2 column tiles of f, 1 of d, 2 or 3 K chunks (tails in both); 8-row tiles: several per expert
SMALL = dict(block_m=8, block_n=64, block_k=32, block_elementwise=1 << 16, num_warps=1, num_stages=1, group_m=2)


@pytest.fixture(scope="module")
def plain_layer():
    """A bf16 layer call with one tile per program and pointer loads: what every variant must equal bitwise."""
    case = layer_case(torch.bfloat16)
    return case, layer(*case, GemmBlocks(**SMALL))


def test_persistent_with_the_table_equals_one_tile_per_program(monkeypatch, plain_layer):
    """Persistent launches (3 programs under the interpreter, each looping over several tiles to the table's count)
    against one program per tile searching the offsets: forward and backward bitwise equal. The four row-tiled
    GEMMs of the layer call share one table (one BLOCK_M)."""
    built = []
    real = tt.tile_table
    monkeypatch.setattr(tt, "tile_table", lambda *a: built.append(a[2]) or real(*a))
    case, plain = plain_layer
    assert_bitwise(layer(*case, GemmBlocks(**SMALL, persistent=True)), plain, "persistent")
    assert built == [SMALL["block_m"]]


def test_tma_row_blocks_and_grad_h_weights_equal_pointer_loads(plain_layer):
    """GemmBlocks(tma=True): h (down), grad u / grad g (grad x) and w_down in grad h come through descriptors (a
    row tile may read the next expert's rows, never stored); forward and backward bitwise equal to pointer
    loads."""
    case, plain = plain_layer
    params, row_token = case[0], case[1]
    tma = GemmBlocks(**SMALL, tma=True)
    h_like = torch.empty(row_token.numel(), HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    assert row_operand(h_like, tma) is not h_like  # the descriptor path is the one tested
    assert weight_operand(params["w_down"].detach(), tma, True)[1]
    assert_bitwise(layer(*case, tma), plain, "tma")


def test_persistent_tma_layer_does_not_sync_and_equals_the_plain_one(plain_layer):
    case, plain = plain_layer
    with no_host_sync():
        out = layer(*case, GemmBlocks(**SMALL, tma=True, persistent=True))
    assert_bitwise(out, plain, "tma + persistent")


def test_tma_and_table_match_the_float64_reference():
    """The two functions on their own (gather_grouped_up, grouped_down_combine: each builds its table) against the
    float64 reference, with segments that end inside a row tile."""
    segments = (21, 0, 9)
    choices = [[e for e, n in enumerate(segments) if t < n] for t in range(max(segments))]
    row_token, offsets = plan(choices, len(segments), torch.int32)
    params = make_params(max(segments), D_MODEL, HIDDEN, len(segments), True, True, torch.float32)
    blocks = GemmBlocks(**{**SMALL, "block_m": 16, "block_n": 128, "block_k": 64}, tma=True, persistent=True)
    check(params, row_token, offsets, max(segments), "silu", blocks)


def test_row_operand_falls_back_to_pointer_loads():
    on = GemmBlocks(tma=True)
    rows = torch.zeros(8, 16, device=DEVICE)
    assert row_operand(rows, GemmBlocks()) is rows  # off by default
    odd = torch.zeros(8, 13, device=DEVICE)  # rows of 52 bytes: not 16-byte aligned
    assert row_operand(odd, on) is odd
    strided = torch.zeros(16, 8, device=DEVICE).t()
    assert row_operand(strided, on) is strided  # not contiguous


# -------------------------------------------------------------------------------- compiled for a GPU, without one

# Compiles the new variants for sm_90 (as test_grouped_gemm.py::test_kernels_compile_for_hopper does for the
# others): each row-tiled kernel with a tile table and TMA descriptors for every contiguous operand (weights, h,
# grad u / grad g), fp32 at the default tiles with every mask, bf16 at the largest candidate tiles without, each
# checked to contain TMA copies; the table kernel for int32 and int64 offsets.
COMPILE_SCRIPT = textwrap.dedent("""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type
    from triton.tools.tensor_descriptor import TensorDescriptor
    import moe.kernels.down_combine as down
    import moe.kernels.tile_table as tt
    import moe.kernels.up_projection as upk
    from moe.kernels.tile_configs import candidates

    def build(fn, types, consts, tma=True, **opts):
        if not claim():  # another worker compiles this one (tests/moe/kernels/hopper_compile.py)
            return
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}  # ints: i32
        k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32), options=opts)
        assert ("tma" in k.asm["ttgir"]) == tma, (fn.__name__, consts)  # the descriptors became TMA copies

    def desc(dtype, box, dims):  # a TMA descriptor's type for `box` tiles of a tensor of `dims` dimensions
        return mangle_type(TensorDescriptor.from_tensor(torch.empty(*[256] * dims, dtype=dtype), box))

    for dt, dtype, prec in (("*bf16", torch.bfloat16, "tf32"), ("*fp32", torch.float32, "ieee")):
        p = lambda *names, t=dt: {n: t for n in names}
        for kernel in ("up_glu", "down", "grad_x_glu", "grad_h_act"):
            plain = [b for b in candidates(kernel, dtype) if not (b.persistent or b.tma)]
            largest = max(plain, key=lambda b: (b.block_m * b.block_n, b.num_stages))  # the largest that fits
            # fp32: the default tiles with every mask; bf16: the largest tiles without masks (half the compiles)
            for b, even in ((plain[0], False),) if dtype == torch.float32 else ((largest, True),):
                c = dict(PRECISION=prec, INTERPRETED=False, GROUP_M=b.group_m, EVEN_K=even, EVEN_N=even,
                         BLOCK_M=b.block_m, BLOCK_N=b.block_n, BLOCK_K=b.block_k, E_POW2=8)
                opts = dict(num_warps=b.num_warps, num_stages=b.num_stages)
                table = p("tiles_ptr", t="*i64")
                w = desc(dtype, [1, b.block_k, b.block_n], 3)
                w_t = desc(dtype, [1, b.block_n, b.block_k], 3)
                rows = desc(dtype, [b.block_m, b.block_k], 2)
                if kernel == "up_glu":  # the table; weights by descriptor (x is gathered: pointer loads)
                    build(upk._gather_up_kernel, {**p("x_ptr", "bu_ptr", "bg_ptr", "h_ptr", "pu_ptr", "pg_ptr"),
                          **p("row_token_ptr", "offsets_ptr", t="*i64"), **p("wu_ptr", "wg_ptr", t=w), **table},
                          dict(GLU=True, HAS_BU=True, HAS_BG=True, ACT="gelu", SAVE_PRE=True, W_DESC=True, **c),
                          **opts)
                elif kernel == "grad_h_act":  # the table; w_down's transposed tiles by descriptor
                    build(down._down_grad_h_kernel, {**p("gy_ptr", "b_ptr", "h_ptr", "pg_ptr", "gh_ptr", "gg_ptr"),
                          **p("row_token_ptr", "offsets_ptr", t="*i64"), **p("rw_ptr", "part_ptr", t="*fp32"),
                          "w_ptr": w_t, **table}, dict(HAS_BIAS=True, FUSE_ACT=True, GLU=True, ACT="silu", **c),
                          **opts)
                else:  # down (h rows), grad x (grad u, grad g rows, transposed weights): everything by descriptor
                    trans = kernel == "grad_x_glu"
                    build(down.rows_to_slots_kernel, {**p("bias_ptr", "out_ptr"), **p("offsets_ptr", t="*i32"),
                          **p("slot_ptr", "tiles_ptr", t="*i64"), **p("scale_ptr", t="*fp32"),
                          **p("a1_ptr", "a2_ptr", t=rows), **p("w1_ptr", "w2_ptr", t=w_t if trans else w)},
                          dict(TWO=trans, HAS_BIAS=True, HAS_SCALE=True, W_DESC=True, W_TRANS=trans, **c), **opts)
    for offsets in ("*i32", "*i64"):
        build(tt._tile_table_kernel, {"offsets_ptr": offsets, "table_ptr": "*i64"},
              dict(BLOCK_M=128, E_POW2=64, BLOCK_T=256), tma=False, num_warps=4)
    print(claimed_summary())
""")


@pytest.mark.slow
def test_new_variants_compile_for_hopper(tmp_path):
    from triton.backends import backends

    from tests.moe.kernels.hopper_compile import run_compile_workers

    if "nvidia" not in backends:
        pytest.skip("this triton build has no NVIDIA backend")
    assert run_compile_workers(COMPILE_SCRIPT, tmp_path) == 10  # 4 kernels x 2 dtypes, the table kernel x 2
