"""The Triton grouped GEMMs (moe.kernels.up_projection, down_combine, weight_grad) against a plain torch reference, forward and backward.

Without CUDA they run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported), whose cost grows with the number of program instances: tiny shapes, blocks as large as the
dimensions. With CUDA the same small tests run compiled on the GPU, and the gpu-marked tests add real sizes.
"""
from __future__ import annotations

import os
import textwrap

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

pytest.importorskip("triton", reason="the Triton kernels need the triton extra (pip install switchyard-moe[triton])")

from moe.kernels.combine import INTERPRETED  # noqa: E402
from moe.kernels.down_combine import grouped_down_combine  # noqa: E402
from moe.kernels.gemm_tiles import GemmBlocks  # noqa: E402
from moe.kernels.up_projection import gather_grouped_up  # noqa: E402
from tests.moe.kernels.hopper_compile import run_compile_workers  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not INTERPRETED:
    pytest.skip("CPU runs need the Triton interpreter: TRITON_INTERPRET=1 before moe.kernels is first imported",
                allow_module_level=True)
ACT = {"gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "relu": F.relu, "silu": F.silu}


# ----------------------------------------------------------------------------------------------- plans and reference


def make_plan(token_experts: list[list[int]], num_experts: int, device: str = "cpu"):
    """Rows sorted by expert (stable in token order), as a router's plan: row_token [N], offsets [E+1]."""
    pairs = sorted((e, t) for t, es in enumerate(token_experts) for e in es)
    row_token = torch.tensor([t for _, t in pairs], dtype=torch.long, device=device)
    experts = torch.tensor([e for e, _ in pairs], dtype=torch.long, device=device)
    counts = torch.bincount(experts, minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return row_token, offsets


def random_plan(num_tokens: int, num_experts: int, used: list[int], seed: int, max_k: int = 2, device="cpu"):
    """Each token takes 0..max_k distinct experts among `used` (the others stay empty)."""
    g = torch.Generator().manual_seed(seed)
    choices = []
    for t in range(num_tokens):
        k = int(torch.randint(0, max_k + 1, (1,), generator=g)) if t > 2 else t  # tokens 0,1,2: 0,1,2 rows
        perm = torch.randperm(len(used), generator=g)[:k]
        choices.append([used[i] for i in perm.tolist()])
    return make_plan(choices, num_experts, device)


def ref_up(x, row_token, offsets, w_up, w_gate, b_up, b_gate, activation):
    xs, outs, act = x[row_token], [], ACT[activation]
    for e in range(w_up.shape[0]):
        rows = xs[offsets[e]:offsets[e + 1]]
        u = rows @ w_up[e] + (b_up[e] if b_up is not None else 0)
        if w_gate is None:
            outs.append(act(u))
        else:
            outs.append(act(rows @ w_gate[e] + (b_gate[e] if b_gate is not None else 0)) * u)
    return torch.cat(outs)


def ref_combine(h, w_down, b_down, offsets, row_weight, row_token, num_tokens):
    outs = []
    for e in range(w_down.shape[0]):
        z = h[offsets[e]:offsets[e + 1]] @ w_down[e]
        outs.append(z + b_down[e] if b_down is not None else z)
    z = torch.cat(outs) * row_weight.to(h.dtype)[:, None]
    return h.new_zeros(num_tokens, w_down.shape[2]).index_add(0, row_token, z)


def make_params(T, d, f, E, glu, bias, dtype, weight_dtype=None, seed=0):
    """Activations x in `dtype`; weights and biases in `weight_dtype` (fp32 masters under autocast)."""
    g = torch.Generator().manual_seed(seed)
    wd = weight_dtype or dtype

    def r(*shape, scale=1.0, dt=wd):
        return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dt).requires_grad_()

    return dict(x=r(T, d, dt=dtype), w_up=r(E, d, f, scale=d ** -0.5),
                w_gate=r(E, d, f, scale=d ** -0.5) if glu else None,
                b_up=r(E, f, scale=0.5) if bias else None, b_gate=r(E, f, scale=0.5) if bias and glu else None,
                w_down=r(E, f, d, scale=f ** -0.5), b_down=r(E, d, scale=0.5) if bias else None)


UP_KEYS = ("x", "w_up", "w_gate", "b_up", "b_gate")
DOWN_KEYS = ("w_down", "b_down")


def run_pair(params, row_token, offsets, row_weight, T, activation, kernel: bool, blocks=None):
    """gather_grouped_up then grouped_down_combine (or the reference): outputs and every gradient of a fixed
    random linear loss on h and on y. The combine gets its own leaf copy of h so that grad h is checked too."""
    p = params
    up_args = (p["x"], row_token, offsets, p["w_up"], p["w_gate"], p["b_up"], p["b_gate"], activation)
    h = gather_grouped_up(*up_args, blocks=blocks) if kernel else ref_up(*up_args)
    h_leaf = h.detach().clone().requires_grad_()
    rw = row_weight.detach().clone().requires_grad_()
    down_args = (h_leaf, p["w_down"], p["b_down"], offsets, rw, row_token, T)
    y = grouped_down_combine(*down_args, blocks=blocks) if kernel else ref_combine(*down_args)
    g = torch.Generator().manual_seed(1)
    gh = torch.randn(h.shape, generator=g).to(h)
    gy = torch.randn(y.shape, generator=g).to(y)
    up_names = [k for k in UP_KEYS if p[k] is not None]
    down_names = [k for k in DOWN_KEYS if p[k] is not None]
    grads_up = torch.autograd.grad(h, [p[k] for k in up_names], gh)
    grads_down = torch.autograd.grad(y, [h_leaf, rw] + [p[k] for k in down_names], gy)
    out = {"h": h.detach(), "y": y.detach(), "grad_h": grads_down[0], "grad_row_weight": grads_down[1]}
    out.update({f"grad_{k}": v for k, v in zip(up_names, grads_up)})
    out.update({f"grad_{k}": v for k, v in zip(down_names, grads_down[2:])})
    return out


def check(params, row_token, offsets, T, activation, blocks=None, rel_tol=None):
    """Kernel against the reference computed in float64 (same device) from the same inputs. fp32: elementwise 1e-5;
    bf16: relative error of each whole tensor under 2e-2 (the kernel rounds weights and outputs to bf16)."""
    dtype = params["x"].dtype
    N = row_token.numel()
    row_weight = torch.rand(N, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got = run_pair(params, row_token, offsets, row_weight, T, activation, kernel=True, blocks=blocks)
    p64 = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in params.items()}
    want = run_pair(p64, row_token, offsets, row_weight.double(), T, activation, kernel=False)
    assert got.keys() == want.keys()
    for name, w in want.items():
        gt = got[name]
        assert gt.shape == w.shape, name
        key = name[len("grad_"):] if name.startswith("grad_") else None
        # Outputs and grad h in the activation dtype; parameter grads in the parameter's own (master) dtype.
        expect = torch.float32 if name == "grad_row_weight" else params[key].dtype if key in params else dtype
        assert gt.dtype == expect, f"{name}: {gt.dtype} != {expect}"
        gt = gt.double()
        if dtype == torch.float32 and rel_tol is None:
            torch.testing.assert_close(gt, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        else:
            err = ((gt - w).norm() / w.norm().clamp_min(1e-6)).item()
            assert err < (rel_tol or 2e-2), f"{name}: relative error {err:.3g}"
    return got


def plan(token_experts, num_experts, offsets_dtype=torch.long):
    row_token, offsets = make_plan(token_experts, num_experts, DEVICE)
    return row_token, offsets.to(offsets_dtype)


# --------------------------------------------------------------------------------------------------------- tests

T, D, FF, E = 16, 32, 32, 5  # experts 0 and 3 stay empty in the default plan


def default_plan(offsets_dtype=torch.long):
    """Tokens 0, 1, 2 carry 0, 1, 2 rows; the rest 0..2; experts 0 and 3 get no rows; segments uneven."""
    row_token, offsets = random_plan(T, E, used=[1, 2, 4], seed=0, device=DEVICE)
    assert (offsets[1:] == offsets[:-1]).sum() >= 2 and row_token.numel() > 0
    return row_token, offsets.to(offsets_dtype)


@pytest.mark.parametrize("activation,glu,bias", [
    ("silu", True, True),  # SwiGLU with biases
    ("gelu", True, False),  # GEGLU
    ("gelu_tanh", False, True),
    ("relu", False, False),
    ("gelu", False, True),
    ("silu", False, False),
])
def test_matches_reference_fp32(activation, glu, bias):
    row_token, offsets = default_plan()
    check(make_params(T, D, FF, E, glu, bias, torch.float32), row_token, offsets, T, activation)


@pytest.mark.parametrize("activation,glu,bias", [("silu", True, True), ("gelu_tanh", False, False)])
def test_matches_reference_bf16_with_fp32_master_weights(activation, glu, bias):
    """Autocast layout: bf16 activations, fp32 weights cast inside the call; weight grads come back in fp32."""
    row_token, offsets = default_plan()
    check(make_params(T, D, FF, E, glu, bias, torch.bfloat16, torch.float32), row_token, offsets, T, activation)


def test_matches_reference_bf16_weights():
    row_token, offsets = default_plan(torch.int32)
    check(make_params(T, D, FF, E, True, True, torch.bfloat16), row_token, offsets, T, "gelu")


@pytest.mark.parametrize("segments", [(37, 0, 17), (17, 17, 17)])
def test_small_blocks_many_tiles_per_expert(segments):
    """16-row tiles: experts span several tiles and end mid-tile (17, 17, 17 needs exactly the grid's bound of
    cdiv(N, 16) + E - 1 row tiles), f=40 ends mid column tile, K loops run several chunks, and grad row_weight
    sums several f tiles' partial dot products. Tokens carry 1 or 2 rows."""
    d, f = 32, 40
    tokens = max(segments)
    choices = [[e for e, n in enumerate(segments) if t < n] for t in range(tokens)]
    row_token, offsets = plan(choices, len(segments), torch.int32)
    assert torch.equal(offsets.diff().cpu(), torch.tensor(segments, dtype=torch.int32))
    blocks = GemmBlocks(block_m=16, block_n=16, block_k=16, block_elementwise=256, num_warps=1, num_stages=1)
    params = make_params(tokens, d, f, len(segments), True, True, torch.float32)
    check(params, row_token, offsets, tokens, "silu", blocks)


def test_one_expert_holds_all_rows():
    choices = [[2] if t % 3 else [] for t in range(T)]  # k=1, some tokens dropped, experts 0, 1, 3 empty
    row_token, offsets = plan(choices, 4)
    check(make_params(T, D, FF, 4, True, False, torch.float32), row_token, offsets, T, "silu")


@pytest.mark.parametrize("glu", [True, False])
def test_no_rows(glu):
    """N = 0 (every token dropped): empty h, zero y, zero gradients."""
    row_token, offsets = plan([[] for _ in range(T)], E)
    got = check(make_params(T, D, FF, E, glu, True, torch.float32), row_token, offsets, T, "gelu")
    assert got["h"].shape == (0, FF) and not got["y"].any() and not got["grad_x"].any()
    assert not got["grad_w_up"].any() and not got["grad_b_down"].any()


def test_deterministic():
    """Two runs are bitwise equal: every token-level sum runs in a fixed order, no atomics."""
    row_token, offsets = random_plan(T, E, used=[0, 1, 2, 3, 4], seed=3, device=DEVICE)
    params = make_params(T, D, FF, E, True, True, torch.float32)
    row_weight = torch.rand(row_token.numel(), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    first = run_pair(params, row_token, offsets, row_weight, T, "silu", kernel=True)
    second = run_pair(params, row_token, offsets, row_weight, T, "silu", kernel=True)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_unknown_activation_raises():
    row_token, offsets = default_plan()
    p = make_params(T, D, FF, E, False, False, torch.float32)
    with pytest.raises(ValueError, match="activation"):
        gather_grouped_up(p["x"], row_token, offsets, p["w_up"], None, None, None, "tanh")


# -------------------------------------------------------------------------------- compiled for a GPU, without one

# Compiles every kernel for sm_90 (Triton front end, MLIR passes, ptxas) in a process where triton is not
# interpreted: the interpreter accepts code the compiler rejects (types, masks, constexpr use), and CI has no GPU.
# Two such processes share the work (a minute of compilation on one core): tests/moe/kernels/hopper_compile.py.
COMPILE_SCRIPT = textwrap.dedent("""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import moe.kernels.combine as c
    import moe.kernels.down_combine as down
    import moe.kernels.up_projection as upk
    import moe.kernels.weight_grad as wg
    from moe.kernels.tile_configs import candidates
    from triton.runtime.jit import mangle_type
    from triton.tools.tensor_descriptor import TensorDescriptor

    def build(fn, types, consts, **opts):
        if not claim():  # another worker compiles this one
            return
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}  # ints: i32
        triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32), options=opts)

    def row_tiles(kernel, dtype, prec):
        # The default tiles with every mask (EVEN_K = EVEN_N = False); for 16-bit also the largest candidate that
        # fits (8 warps, 128x128 at 4 stages or 128x256 at 3) without them (both True), its weights through TMA
        # descriptors (up, down, grad x).
        tiles = candidates(kernel, dtype)
        for b, even in [(tiles[0], False)] + ([(tiles[-1], True)] if dtype != torch.float32 else []):
            yield (dict(PRECISION=prec, INTERPRETED=False, GROUP_M=b.group_m, EVEN_K=even, EVEN_N=even,
                        BLOCK_M=b.block_m, BLOCK_N=b.block_n, BLOCK_K=b.block_k, E_POW2=8),
                   dict(num_warps=b.num_warps, num_stages=b.num_stages))

    for dt, dtype, prec in (("*bf16", torch.bfloat16, "tf32"), ("*fp32", torch.float32, "ieee")):
        p = lambda *names, t=dt: {n: t for n in names}
        def desc(tiles, trans=False):  # the weights' TMA descriptor type at these tiles (16-bit: the large tiles)
            k, n = tiles["BLOCK_K"], tiles["BLOCK_N"]
            shape = [1, n, k] if trans else [1, k, n]
            return mangle_type(TensorDescriptor.from_tensor(torch.empty(8, 256, 256, dtype=dtype), shape))

        for tiles, opts in row_tiles("up_glu", dtype, prec):
            tma = tiles["EVEN_K"]
            build(upk._gather_up_kernel, {**p("x_ptr", "wu_ptr", "wg_ptr", "bu_ptr", "bg_ptr", "h_ptr", "pu_ptr",
                  "pg_ptr"), **p("row_token_ptr", "offsets_ptr", t="*i64"),
                  **(p("wu_ptr", "wg_ptr", t=desc(tiles)) if tma else {})},
                  dict(GLU=True, HAS_BU=True, HAS_BG=True, ACT="gelu", SAVE_PRE=True, W_DESC=tma, **tiles), **opts)
        for kernel in ("down", "grad_x_glu"):
            for tiles, opts in row_tiles(kernel, dtype, prec):
                tma, trans = tiles["EVEN_K"], kernel == "grad_x_glu"
                build(down.rows_to_slots_kernel, {**p("a1_ptr", "a2_ptr", "w1_ptr", "w2_ptr", "bias_ptr", "out_ptr"),
                      **p("offsets_ptr", t="*i32"), **p("slot_ptr", t="*i64"), **p("scale_ptr", t="*fp32"),
                      **(p("w1_ptr", "w2_ptr", t=desc(tiles, trans)) if tma else {})},
                      dict(TWO=trans, HAS_BIAS=True, HAS_SCALE=True, W_DESC=tma, W_TRANS=trans, **tiles), **opts)
        for kernel in ("grad_h", "grad_h_act"):  # the second with the activation backward in its epilogue
            for tiles, opts in row_tiles(kernel, dtype, prec):
                build(down._down_grad_h_kernel, {**p("gy_ptr", "w_ptr", "b_ptr", "h_ptr", "pg_ptr", "gh_ptr", "gg_ptr"),
                      **p("row_token_ptr", "offsets_ptr", t="*i64"), **p("rw_ptr", "part_ptr", t="*fp32")},
                      dict(HAS_BIAS=True, FUSE_ACT=kernel == "grad_h_act", GLU=True, ACT="silu", **tiles), **opts)
        for up in (True, False):
            b = candidates("wgrad_up_glu" if up else "wgrad_down", dtype)[-1]  # the largest tiles that fit
            build(wg._grouped_wgrad_kernel, {**p("a_ptr", "b1_ptr", "b2_ptr", "dw1_ptr", "dw2_ptr"),
                  **p("db1_ptr", "db2_ptr"), **p("a_index_ptr", "b_index_ptr", "offsets_ptr", t="*i64"),
                  **p("scale_ptr", t="*fp32")},
                  dict(A_GATHER=up, B_GATHER=not up, HAS_SCALE=not up, TWO=up, HAS_BIAS=True, PRECISION=prec,
                       INTERPRETED=False, BLOCK_P=b.block_m, BLOCK_Q=b.block_n, BLOCK_R=b.block_k),
                  num_warps=b.num_warps, num_stages=b.num_stages)
        for act in ("gelu", "gelu_tanh", "relu", "silu"):
            build(upk._act_backward_kernel, {**p("gh_ptr", "pu_ptr", "pg_ptr", "gu_ptr", "gg_ptr"), "numel": "i64"},
                  dict(GLU=act != "relu", ACT=act, INTERPRETED=False, BLOCK=1024), num_warps=4)
        build(c._segment_sum_kernel, {**p("out_ptr", "rows_ptr"), **p("token_offsets_ptr", t="*i64")},
              dict(INTERPRETED=False, BLOCK_D=1024), num_warps=4)
    print(claimed_summary())
""")


@pytest.mark.slow
def test_kernels_compile_for_hopper(tmp_path):
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton build has no NVIDIA backend")
    run_compile_workers(COMPILE_SCRIPT, tmp_path)  # 29 builds here (17 bf16, 12 fp32), each compiled once


# ------------------------------------------------------------------------------------------ real sizes on a GPU


def topk_plan(num_tokens, num_experts, k, seed):
    """A top-k token-choice plan from random logits, skewed so that expert loads are uneven."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g) + torch.linspace(0, 2, num_experts)
    experts = logits.topk(k, dim=-1).indices  # [T, k]
    expert_flat = experts.reshape(-1)
    order = torch.sort(expert_flat, stable=True).indices
    row_token = (torch.arange(num_tokens * k) // k)[order]
    counts = torch.bincount(expert_flat, minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return row_token.to(DEVICE), offsets.to(DEVICE)


@pytest.mark.parametrize("activation,glu,bias", [("silu", True, False), ("gelu", False, True)])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_real_size_bf16(activation, glu, bias):
    tokens, d, f, experts, k = 4096, 1024, 2048, 8, 2
    row_token, offsets = topk_plan(tokens, experts, k, seed=0)
    params = make_params(tokens, d, f, experts, glu, bias, torch.bfloat16, torch.float32)
    check(params, row_token, offsets, tokens, activation)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_real_size_fp32_and_deterministic_without_host_sync():
    tokens, d, f, experts, k = 4096, 1024, 2048, 8, 2
    row_token, offsets = topk_plan(tokens, experts, k, seed=1)
    params = make_params(tokens, d, f, experts, True, True, torch.float32)
    row_weight = torch.rand(row_token.numel(), device=DEVICE, requires_grad=True)
    gh = torch.randn(row_token.numel(), f, device=DEVICE)
    gy = torch.randn(tokens, d, device=DEVICE)
    names = ["x", "w_up", "w_gate", "b_up", "b_gate", "w_down", "b_down"]
    runs = []
    for _ in range(2):
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation inside the calls raises
        try:
            h = gather_grouped_up(params["x"], row_token, offsets, params["w_up"], params["w_gate"],
                                  params["b_up"], params["b_gate"], "silu")
            y = grouped_down_combine(h, params["w_down"], params["b_down"], offsets, row_weight, row_token, tokens)
            grads = torch.autograd.grad([h, y], [params[n] for n in names] + [row_weight], [gh, gy])
        finally:
            torch.cuda.set_sync_debug_mode(0)
        runs.append(dict(zip(["h", "y"] + names + ["row_weight"], [h, y, *grads])))
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name
    check(params, row_token, offsets, tokens, "silu", rel_tol=1e-4)  # large sums: relative error of the tensor
