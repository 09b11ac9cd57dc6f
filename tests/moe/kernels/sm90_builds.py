"""Every tiled kernel of moe.kernels as an sm_90 build, compiled without a GPU, with its registers and spills.

Used by the spill audit (experiments/spill_audit.py, issue 20: registers, spill bytes and shared memory of every
kernel at its default and candidate tiles) and by the zero-spill test of the defaults
(tests/moe/kernels/test_no_spills.py). Run only in a process where triton is NOT interpreted.

`build_args(kernel, dtype, blocks, variant)` gives what triton.compile needs for one kernel (the names of
moe.kernels.tile_configs.KERNELS) at one GemmBlocks: the function, the argument types, the constexprs and the
launch options; `variant` is "" (pointer loads, one program per tile), "persistent" (row-tiled: a tile table
pointer), "tma" (weights / plan-order operands through descriptors) or "split" (weight gradients: split-K at
256 rows). `shape` says what the JIT would have specialised (it compiles a kernel per divisibility of the
arguments): "aligned", a real layer (d = 1024, f = 2048: widths and row strides multiples of 16, EVEN_K = EVEN_N,
contiguous strides 1, tensors 16-byte aligned); "tails", the probe's d = 1000, f = 1400 (the masks on, no width
or row stride a multiple of 16: no vectorised or asynchronous copies of the rows); "generic", every integer a
plain i32 (the older compile tests' builds, no specialisation at all). `usage(...)` compiles it and reads registers and spill stores with `ptxas -v`
(experiments.gpu_check.kernel_info.ptxas_usage, the reading the GPU check's dry run uses).
"""
from __future__ import annotations

from typing import Any

import torch

SPLIT_ROWS = 256  # the split-K chunk of the "split" variant (the probe's first split candidate at k=2)


def _types(dt: str, *names: str) -> dict:
    return {n: dt for n in names}


def _desc(dtype: torch.dtype, box: list[int], shape: tuple[int, ...]) -> str:
    """The type string of a TMA descriptor with this box, as the launcher makes it."""
    from triton.runtime.jit import mangle_type
    from triton.tools.tensor_descriptor import TensorDescriptor

    return mangle_type(TensorDescriptor.from_tensor(torch.empty(*shape, dtype=dtype), box))


def build_args(kernel: str, dtype: torch.dtype, blocks: Any, variant: str = "", even: bool = False
               ) -> tuple[Any, dict, dict, dict]:
    """(jit function, argument types, constexprs, options) of `kernel` at `blocks` (module docstring); even: the
    EVEN_K / EVEN_N specialisation of the row-tiled kernels (widths multiples of the tiles)."""
    import moe.kernels.down_combine as down
    import moe.kernels.up_projection as upk
    import moe.kernels.weight_grad as wg

    dt = "*bf16" if dtype == torch.bfloat16 else "*fp32"
    prec = "tf32"  # fp32 operands as TF32 (torch's default allow_tf32 on Ampere+ is off, but tf32 is the fast path)
    b = blocks
    opts = dict(num_warps=b.num_warps, num_stages=b.num_stages)
    tma, persistent = variant == "tma", variant == "persistent"
    if variant not in ("", "tma", "persistent", "split"):
        raise ValueError(f"variant must be '', 'tma', 'persistent' or 'split', got {variant!r}")
    if kernel.startswith("wgrad"):
        if persistent:
            raise ValueError("the weight gradients have no persistent variant")
        up, glu = kernel != "wgrad_down", kernel == "wgrad_up_glu"
        split = SPLIT_ROWS if variant == "split" else 0
        types = {**_types(dt, "a_ptr", "b1_ptr", "b2_ptr"),
                 **_types("*i64", "a_index_ptr", "b_index_ptr", "offsets_ptr"),
                 **_types("*fp32" if split else dt, "dw1_ptr", "dw2_ptr", "db1_ptr", "db2_ptr"),
                 **_types("*fp32", "scale_ptr")}
        if tma:  # the plan-order operands: the pre-activation gradients (up), h (down)
            if up:
                types.update(_types(_desc(dtype, [b.block_k, b.block_n], (512, 256)), "b1_ptr", "b2_ptr"))
            else:
                types.update(_types(_desc(dtype, [b.block_k, b.block_m], (512, 256)), "a_ptr"))
        consts = dict(A_GATHER=up, B_GATHER=not up, HAS_SCALE=not up, TWO=glu, HAS_BIAS=True, PRECISION=prec,
                      INTERPRETED=False, BLOCK_P=b.block_m, BLOCK_Q=b.block_n, BLOCK_R=b.block_k)
        if split or tma:
            fn = wg._chunked_wgrad_kernel
            consts.update(A_DESC=tma and not up, B_DESC=tma and up, SPLIT_ROWS=split, E_POW2=8)
        else:
            fn = wg._grouped_wgrad_kernel
        return fn, types, consts, opts
    if variant == "split":
        raise ValueError(f"{kernel} has no split-K variant (the weight gradients only)")
    tiles = dict(PRECISION=prec, INTERPRETED=False, GROUP_M=b.group_m, EVEN_K=even, EVEN_N=even,
                 BLOCK_M=b.block_m, BLOCK_N=b.block_n, BLOCK_K=b.block_k, E_POW2=8)
    table = {"tiles_ptr": "*i64"} if persistent else {"tiles_ptr": "constexpr"}
    consts_table = {} if persistent else {"tiles_ptr": None}

    def wdesc(trans: bool) -> str:
        box = [1, b.block_n, b.block_k] if trans else [1, b.block_k, b.block_n]
        return _desc(dtype, box, (8, 256, 256))

    if kernel in ("up", "up_glu"):
        glu = kernel == "up_glu"
        types = {**_types(dt, "x_ptr", "wu_ptr", "wg_ptr", "bu_ptr", "bg_ptr", "h_ptr", "pu_ptr", "pg_ptr"),
                 **_types("*i64", "row_token_ptr", "offsets_ptr"), **table,
                 **(_types(wdesc(False), "wu_ptr", "wg_ptr") if tma else {})}
        consts = dict(GLU=glu, HAS_BU=True, HAS_BG=glu, ACT="gelu", SAVE_PRE=True, W_DESC=tma, **tiles,
                      **consts_table)
        return upk._gather_up_kernel, types, consts, opts
    if kernel in ("down", "grad_x", "grad_x_glu"):
        trans, two = kernel != "down", kernel == "grad_x_glu"
        types = {**_types(dt, "a1_ptr", "a2_ptr", "w1_ptr", "w2_ptr", "bias_ptr", "out_ptr"),
                 **_types("*i32", "offsets_ptr"), **_types("*i64", "slot_ptr"), **_types("*fp32", "scale_ptr"),
                 **table, **(_types(wdesc(trans), "w1_ptr", "w2_ptr") if tma else {})}
        consts = dict(TWO=two, HAS_BIAS=not trans, HAS_SCALE=not trans, W_DESC=tma, W_TRANS=trans, **tiles,
                      **consts_table)
        return down.rows_to_slots_kernel, types, consts, opts
    if kernel in ("grad_h", "grad_h_act"):
        types = {**_types(dt, "gy_ptr", "w_ptr", "b_ptr", "h_ptr", "pg_ptr", "gh_ptr", "gg_ptr"),
                 **_types("*i64", "row_token_ptr", "offsets_ptr"), **_types("*fp32", "rw_ptr", "part_ptr"), **table,
                 **(_types(wdesc(True), "w_ptr") if tma else {})}  # w_down read transposed; grad_y is gathered
        consts = dict(HAS_BIAS=True, FUSE_ACT=kernel == "grad_h_act", GLU=True, ACT="silu", **tiles,
                      **consts_table)
        return down._down_grad_h_kernel, types, consts, opts
    raise ValueError(f"unknown kernel {kernel!r}")


# The integer arguments a launch passes as 1 (the contiguous dimension's stride), per kernel function: the JIT
# turns an int equal to 1 into a constexpr, so the compiled code indexes that dimension without a multiply and
# can vectorise its loads. rows_to_slots_kernel: stride_wn for the down GEMM, stride_wk for grad x (the weights
# read transposed).
UNIT_STRIDES = {"_gather_up_kernel": ("stride_xd", "stride_wf"), "_down_grad_h_kernel": ("stride_wd",),
                "rows_to_slots_down": ("stride_wn",), "rows_to_slots_grad_x": ("stride_wk",)}
# Integer arguments not divisible by 16 at a real shape (E = 8 experts; tile counts depend on the loads).
NOT_ALIGNED = ("E", "M_TILES", "TILES")


def specialise(fn: Any, kernel: str, types: dict, consts: dict, shape: str) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as the JIT would make them (module docstring's `shape`): the contiguous
    strides 1 and the tensors 16-byte aligned, and for "aligned" every other width and row stride a multiple of 16.
    Without this a build is compiled for arbitrary strides and alignments: another kernel than the GPU runs."""
    name = fn.__name__
    if name == "rows_to_slots_kernel":
        name += "_down" if kernel == "down" else "_grad_x"
    consts = {**consts, **{n: 1 for n in UNIT_STRIDES.get(name, ())}}
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}  # other ints: i32
    ints = ("i32", "i64") if shape == "aligned" else ()
    aligned = [i for i, n in enumerate(fn.arg_names) if sig[n] != "constexpr" and n not in NOT_ALIGNED
               and (sig[n].startswith("*") or sig[n] in ints)]
    return sig, consts, {(i,): [["tt.divisibility", 16]] for i in aligned}


SHAPES = ("aligned", "tails", "generic")


def compile_sm90(kernel: str, dtype: torch.dtype, blocks: Any, variant: str = "", shape: str = "aligned") -> Any:
    """The CompiledKernel of build_args(...) for sm_90 (front end, MLIR passes and ptxas; no GPU needed), at
    `shape` (module docstring)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    fn, types, consts, opts = build_args(kernel, dtype, blocks, variant, even=shape == "aligned")
    if shape != "generic":
        sig, consts, attrs = specialise(fn, kernel, types, consts, shape)
    else:
        sig, attrs = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}, {}
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options=opts)


def usage(kernel: str, dtype: torch.dtype, blocks: Any, variant: str = "", shape: str = "aligned") -> dict:
    """{"registers", "spills" (bytes of spill stores), "shared_bytes"} of one build, read by ptxas -v."""
    from experiments.gpu_check.kernel_info import ptxas_usage

    k = compile_sm90(kernel, dtype, blocks, variant, shape)
    regs, spills, how = ptxas_usage(k.asm.get("ptx", ""), "sm90")
    return {"registers": regs, "spills": spills, "shared_bytes": getattr(k.metadata, "shared", None), "from": how}
