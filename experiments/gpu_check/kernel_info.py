"""Step c_kernel_info: what the compiler made of each Triton kernel: registers, spills, shared memory, and
whether the code uses warp-group MMA (wgmma, Hopper's tensor-core instruction) and async copies (cp.async, and
the bulk tensor copies of TMA).

On the GPU it runs the triton dispatcher forward and backward (bf16 and fp32) so that every kernel of
moe.kernels is compiled for the shapes that matter (the other steps' Triton cache makes this fast), then reads
each compiled kernel's metadata: n_regs and n_spills from the loaded binary, shared memory from the metadata,
the instructions from its PTX and TTGIR. A plain 128x128x64 dot kernel at 8 warps is compiled beside them as a
control: if it shows wgmma and ours do not, the kernels (not the toolchain) keep the tensor cores from Hopper's
fast path. The kernel variants (experiments.gpu_check.variants: split-K weight gradients, the persistent grid with
its tile table, TMA descriptors) run too, at the probe's bf16 sizes, so their compiled kernels are read beside the
defaults; each compiled kernel is labelled by what its arguments say: `descriptors` (its TMA descriptor
arguments), `tile_table` (a persistent launch's tile table pointer), `split_rows` (the split-K chunk). A check
asks that every kernel compiled with descriptor arguments holds TMA copies in its PTX (else the descriptors were
lowered to plain loads). A dry run on CPU compiles only the control for sm_90 (no GPU needed) and takes registers
and spills from `ptxas -v`, checking the same reading code.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from experiments.gpu_check.step_io import StepRecord, parse_args


@triton.jit
def control_dot_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c = a @ b for one tile, row-major, sizes multiples of the blocks (a control, not a library kernel)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
        b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty))


def describe(kernel: Any) -> dict:
    """A compiled kernel (triton's CompiledKernel) -> its resources and the instructions that matter on Hopper."""
    md, asm = kernel.metadata, kernel.asm
    ptx, ttgir = asm.get("ptx", ""), asm.get("ttgir", "")
    signature = getattr(getattr(kernel, "src", None), "signature", None) or {}
    pointers = [str(t)[1:] for t in signature.values() if str(t).startswith("*")]
    out = {"name": getattr(md, "name", "?"), "num_warps": md.num_warps, "num_stages": md.num_stages,
           # the first pointer's element type (bf16, fp32, ...), else what the TTGIR's operands say
           "operands": pointers[0] if pointers else ("bf16" if "xbf16" in ttgir else "?"),
           "shared_bytes": getattr(md, "shared", None),
           "dot": "tt.dot" in ttgir or "warp_group_dot" in ttgir,  # a GEMM, whatever its name
           "wgmma": "wgmma.mma_async" in ptx,  # Hopper's warp-group MMA
           "mma_sync": "mma.sync" in ptx,  # the pre-Hopper tensor-core instruction
           "cp_async": bool(re.search(r"cp\.async\.(ca|cg)", ptx)),  # asynchronous global -> shared copies
           "tma": "cp.async.bulk.tensor" in ptx}  # the tensor memory accelerator's bulk copies
    out.update(variant_of(signature, _constexprs(getattr(kernel, "src", None))))
    regs, spills = getattr(kernel, "n_regs", None), getattr(kernel, "n_spills", None)
    if regs is None and torch.cuda.is_available():
        try:
            kernel._init_handles()  # loads the binary: the driver reports registers and spills
            regs, spills = kernel.n_regs, kernel.n_spills
        except Exception:  # noqa: BLE001 - ptxas below is the fallback
            pass
    if regs is None:
        regs, spills, note = ptxas_usage(ptx, getattr(md, "arch", "sm90"))
        out["from"] = note
    else:
        out["from"] = "driver (loaded binary)"
    out.update(registers=regs, spills=spills)
    return out


def _constexprs(src: Any) -> dict:
    """A compiled kernel's constexpr arguments by name (triton 3.x: ASTSource.constexprs keyed by name or by an
    argument-index path; older: .constants)."""
    consts = getattr(src, "constexprs", None) or getattr(src, "constants", None) or {}
    names = list(getattr(getattr(src, "fn", None), "arg_names", []) or [])
    out = {}
    for key, value in dict(consts).items():
        if isinstance(key, tuple) and len(key) == 1 and isinstance(key[0], int) and key[0] < len(names):
            key = names[key[0]]
        out[str(key)] = value
    return out


def variant_of(signature: dict, constexprs: dict) -> dict:
    """Which variant a compiled kernel is, from its arguments: TMA descriptor arguments (their names), a tile
    table pointer (a persistent launch), the split-K chunk (0: none)."""
    table = str(signature.get("tiles_ptr", ""))
    return {"descriptors": sorted(n for n, t in signature.items() if str(t).startswith("tensordesc")),
            "tile_table": table.startswith("*"), "split_rows": int(constexprs.get("SPLIT_ROWS", 0) or 0)}


def ptxas_paths(arch: int) -> list[str]:
    """The ptxas binaries to try, the one Triton itself uses for `arch` first (triton 3.9 picks between its
    bundled `ptxas` and `ptxas-blackwell` by architecture; older releases bundle one)."""
    paths = []
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        paths.append(get_ptxas(arch).path)
    except Exception:  # noqa: BLE001 - older triton: no such helper
        pass
    import triton.backends.nvidia as nv

    bin_dir = os.path.join(os.path.dirname(nv.__file__), "bin")
    paths += [os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas")] + [shutil.which("ptxas") or ""]
    return [p for i, p in enumerate(paths) if p and os.path.exists(p) and p not in paths[:i]]


def ptxas_usage(ptx: str, arch: str) -> tuple[Optional[int], Optional[int], str]:
    """(registers, spill bytes, where from) by `ptxas -v`, for kernels compiled without a GPU to load them on."""
    sm = re.sub(r"\D", "", str(arch)) or "90"
    if not ptx:
        return None, None, "unknown (no PTX)"
    text = "no ptxas found"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        for exe in ptxas_paths(int(sm)):
            done = subprocess.run([exe, f"-arch=sm_{sm}a" if sm == "90" else f"-arch=sm_{sm}", "-v", src,
                                   "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True, timeout=60)
            text = done.stdout + done.stderr
            if done.returncode == 0:  # a ptxas older than the PTX's .version refuses it: try the next
                regs = re.search(r"Used (\d+) registers", text)
                spill = re.search(r"(\d+) bytes spill stores", text)
                return (int(regs.group(1)) if regs else None, int(spill.group(1)) if spill else None,
                        f"{os.path.basename(exe)} -v")
    return None, None, f"unknown (ptxas: {text.strip().splitlines()[-1] if text.strip() else 'no output'})"


def compile_control(block: tuple[int, int, int] = (128, 128, 64), num_warps: int = 8, num_stages: int = 3):
    """The control kernel compiled for sm_90 (works without a GPU: front end, MLIR passes and ptxas only)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    consts = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), block))
    return triton.compile(ASTSource(control_dot_kernel, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def compiled_kernels(prefix: str = "moe.kernels") -> dict[str, list]:
    """Every compiled variant of every Triton kernel in the loaded `prefix` modules: name -> [CompiledKernel].
    JITFunctions keep them per device in `device_caches` (triton 3.x; `cache` in 2.x); autotuners and
    heuristics wrap a JITFunction in `.fn`."""
    found: dict[str, list] = {}
    seen: set[int] = set()  # a kernel imported into another module is the same object: read it once
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith(prefix) or mod is None:
            continue
        for attr, obj in vars(mod).items():
            fn, depth = obj, 0
            while hasattr(fn, "fn") and not hasattr(fn, "device_caches") and depth < 4:
                fn, depth = fn.fn, depth + 1
            caches = getattr(fn, "device_caches", None) or getattr(fn, "cache", None)
            if not isinstance(caches, dict) or not callable(getattr(fn, "run", None)) or id(fn) in seen:
                continue
            seen.add(id(fn))
            home = getattr(getattr(fn, "fn", None), "__module__", mod_name)  # the module that defines it
            kernels = []
            for entry in caches.values():
                table = entry[0] if isinstance(entry, tuple) else entry
                kernels += [k for k in table.values() if hasattr(k, "asm")]
            if kernels:
                found.setdefault(f"{home.split('.')[-1]}.{getattr(fn, '__name__', attr)}", []).extend(kernels)
    return found


# (dtype, T, d, f, E, empty experts): the probe's bf16 layer and test_gpu_sizes' fp32 einsum case, so that the
# kernels come from the shared Triton cache (a variant is compiled per E and per size divisibility) within the box
EXERCISE = ((torch.bfloat16, 4099, 1000, 1400, 64, (1, 17, 33, 48, 63)), (torch.float32, 4096, 1024, 1024, 8, (3, 7)))


def exercise_kernels() -> None:
    """Forward and backward of the triton dispatcher in bf16 and fp32, so that every kernel is compiled, and of
    each kernel variant at the bf16 (probe's) sizes with the probe's blocks (its Triton cache entries)."""
    from experiments.gpu_check.synthetic import expert_bank, forward_backward, skewed_plan
    from experiments.gpu_check.variants import base_blocks, triton_with, variant_blocks
    from moe.dispatch.triton import triton_dispatch
    from moe.kernels.gating import fused_topk_gating
    from moe.kernels.sort import sort_by_expert

    dev = torch.device("cuda")
    for dtype, T, d, f, E, empty in EXERCISE:
        plan = skewed_plan(T, E, 2, empty, 0.3, seed=0, device=dev)
        bank = expert_bank(E, d, f, dtype, dev, seed=0)
        x = torch.randn(T, d, device=dev, dtype=dtype)
        forward_backward(triton_dispatch, x, plan, bank, torch.randn_like(x))
        if dtype == torch.bfloat16:
            for name, blocks in variant_blocks(base_blocks(False), plan.counts.tolist()).items():
                try:  # one variant that fails to compile or run is reported; the others are still read
                    forward_backward(triton_with(blocks), x, plan, bank, torch.randn_like(x))
                except Exception as e:  # noqa: BLE001
                    print(f"variant {name} not exercised: {type(e).__name__}: {e}", flush=True)
    try:  # the router's kernels, through their public functions (a changed signature is reported, not fatal)
        logits = torch.randn(4096, 64, device=dev, requires_grad=True)
        _, w, idx = fused_topk_gating(logits, 2, "softmax_topk", True)
        w.sum().backward()
        sort_by_expert(idx, 64, use_triton=True)
    except Exception as e:  # noqa: BLE001
        print(f"gating / sort kernels not exercised: {type(e).__name__}: {e}", flush=True)
    torch.cuda.synchronize()


def main(argv=None) -> None:
    a = parse_args(__doc__.splitlines()[0], argv)
    rec = StepRecord(a.json)
    rec.put("dry_run", a.dry_run)
    from triton.backends import backends

    if "nvidia" not in backends:
        rec.skip("this triton build has no NVIDIA backend")
        return
    try:
        control = describe(compile_control())
    except Exception as e:  # noqa: BLE001 - another triton's compile API: the library kernels still get read
        control = {"error": f"{type(e).__name__}: {e}", "wgmma": None, "registers": None}
    rec.put("control_dot_128x128x64_8warps", control)
    print(f"control dot kernel: {control}", flush=True)
    if not torch.cuda.is_available():
        rec.check("control_uses_wgmma", control["wgmma"] and (control["registers"] or 0) > 0,
                  f"sm_90 control: wgmma={control['wgmma']}, {control['registers']} registers, "
                  f"{control['spills']} spill bytes, {control['shared_bytes']} B shared ({control['from']})")
        rec.finish()
        return
    exercise_kernels()
    table = {name: [describe(k) for k in ks] for name, ks in sorted(compiled_kernels().items())}
    rec.put("kernels", table)
    for name, variants in table.items():
        for v in variants:
            label = "".join([f" desc:{','.join(v['descriptors'])}" if v["descriptors"] else "",
                             " tile-table" if v["tile_table"] else "",
                             f" split{v['split_rows']}" if v["split_rows"] else ""])
            print(f"{name:40s} warps {v['num_warps']} stages {v['num_stages']} regs {v['registers']} spills "
                  f"{v['spills']} smem {v['shared_bytes']} wgmma {v['wgmma']} cp.async {v['cp_async']} tma {v['tma']}"
                  f"{label}", flush=True)
    # 16-bit GEMM variants: fp32 ones without TF32 run IEEE dots on the FMA units by design (no wgmma there)
    gemms = [v for vs in table.values() for v in vs if v["dot"] and v["operands"] in ("bf16", "fp16")]
    rec.check("gemms_use_wgmma", bool(gemms) and all(v["wgmma"] for v in gemms),
              f"{sum(v['wgmma'] for v in gemms)} of {len(gemms)} bf16 GEMM variants use wgmma "
              f"(control: {control['wgmma']})")
    variants = {"tma": [v for vs in table.values() for v in vs if v["descriptors"]],
                "persistent": [v for vs in table.values() for v in vs if v["tile_table"]],
                "split_k": [v for vs in table.values() for v in vs if v["split_rows"]]}
    rec.put("variant_kernels", {k: len(vs) for k, vs in variants.items()})
    rec.check("tma_variants_use_tma", bool(variants["tma"]) and all(v["tma"] for v in variants["tma"]),
              f"{sum(v['tma'] for v in variants['tma'])} of {len(variants['tma'])} kernels compiled with TMA "
              "descriptor arguments hold cp.async.bulk.tensor (none: the TMA variant fell back to pointer loads)")
    spilling = [n for n, vs in table.items() if any((v["spills"] or 0) > 0 for v in vs)]
    rec.put("kernels_that_spill", spilling)
    rec.finish()


if __name__ == "__main__":
    main()
