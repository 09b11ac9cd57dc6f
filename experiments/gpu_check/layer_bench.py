"""Step e_layer_bench: the layer benchmark (experiments.bench) on CUDA in bf16 at T >= 16k, and DeepSpeed's MoE
layer on CUDA beside the triton dispatcher.

experiments.bench times, interleaved in one process, forward + backward of: the dense FFN of the same active
parameters, einsum, sorted (grouped GEMM auto and the per-expert loop), triton, the Mixtral-style loop and the
experts alone on pre-sorted rows; plus torch's grouped GEMM against one dense GEMM of equal FLOPs, and torch's
permute and combine bandwidth against the device's peak. It times DeepSpeed's layer on CPU only, so this step
times it on CUDA itself (where the deepspeed wheel travelled and imports): a one-process gloo group,
DS_ACCELERATOR=cuda, the bench's own construction (bench.deepspeed_moe: dropless, our weights copied in), against
the triton layer, interleaved. The markdown tables go to layer_bench.md in the output folder.
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path

import torch

from experiments.gpu_check.budget import OUT_ENV
from experiments.gpu_check.step_io import StepRecord, parse_args, rel_err

SHAPES = "16k:1024:2048:8:2,16k:4096:14336:8:2"  # issue 20's reference layer, and Mixtral's expert sizes
DRY_SHAPES = "64:16:24:4:2"
REPS, DRY_REPS = 7, 1


def shape_numbers(r) -> dict:
    """One bench.ShapeResult as plain numbers, with the ratios the targets read."""
    rows = {row.impl: {"min_ms": row.min_ms, "median_ms": row.median_ms, "ratio_min": row.ratio_min,
                       "ratio_median_pairs": row.ratio_median_pairs, "max_abs_diff": row.max_abs_diff}
            for row in r.rows}
    g, bw = r.gemm, r.bandwidth
    out = {"T": r.shape.T, "d": r.shape.d, "f": r.shape.f, "E": r.shape.E, "k": r.shape.k, "rows": rows,
           "gemm_gflops": g, "bandwidth_gbs": bw, "peak_gbs": r.peak_gbs, "notes": r.notes}
    if g.get("dense GEMM"):
        out["grouped_gemm_vs_dense"] = max(g["grouped_mm"], g["loop"]) / g["dense GEMM"]
    if r.peak_gbs:
        out["permute_vs_peak"] = bw["permute (gather)"] / r.peak_gbs
        out["combine_vs_peak"] = bw["combine (weighted index_add)"] / r.peak_gbs
    mixtral = rows.get("Mixtral-style loop (transformers)")
    if mixtral and "triton" in rows:
        out["triton_over_mixtral"] = rows["triton"]["median_ms"] / mixtral["median_ms"]
    return out


def deepspeed_vs_triton(spec: str, reps: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                        dispatcher: str = "triton") -> dict:
    """DeepSpeed's MoE layer and our layer (the triton dispatcher; another for a check on CPU) on one shape,
    forward + backward interleaved, after checking that both compute the same function of the same weights."""
    os.environ["DS_ACCELERATOR"] = device  # before deepspeed's import: bench.deepspeed_moe defaults it to cpu
    from experiments import bench

    s = bench.parse_shapes(spec)[0]
    torch.manual_seed(0)
    layer = bench.build_layer(s, dispatcher=dispatcher).to(device, dtype)
    ds, why = bench.deepspeed_moe(layer, s)
    if ds is None:
        return {"status": "skipped", "why": why}
    ds = ds.to(device)
    ds.deepspeed_moe.experts.to(dtype)  # its gate stays fp32, as ours
    g = torch.Generator().manual_seed(1)
    x = torch.randn(s.T, s.d, generator=g).to(device, dtype)
    gy = torch.randn(s.T, s.d, generator=g).to(device, dtype)
    with torch.no_grad():
        diff = rel_err(ds(x[None])[0][0], layer(x)[0])
    fns = {"ours": bench.step_fn(lambda h: layer(h)[0], list(layer.parameters()), x, gy),
           "DeepSpeed MoE": bench.step_fn(lambda h: ds(h[None])[0][0], list(ds.parameters()), x, gy)}
    times = bench.interleaved(fns, reps)
    t, d = times["ours"], times["DeepSpeed MoE"]
    return {"shape": s.name, "dispatcher": dispatcher, "rel_diff_vs_ours": diff,
            "ours_ms": 1e3 * statistics.median(t), "deepspeed_ms": 1e3 * statistics.median(d),
            "triton_over_deepspeed": statistics.median(a / b for a, b in zip(t, d))}


def main(argv=None) -> None:
    a = parse_args(__doc__.splitlines()[0], argv)
    rec = StepRecord(a.json)
    rec.put("dry_run", a.dry_run)
    cuda = torch.cuda.is_available()
    if not cuda and not a.dry_run:
        rec.skip("no CUDA")
        return
    from experiments import bench

    spec, reps = (DRY_SHAPES, DRY_REPS) if a.dry_run else (SHAPES, REPS)
    device, dtype = ("cuda", "bf16") if cuda else ("cpu", "fp32")
    shapes = {}
    md_parts = []
    for s in bench.parse_shapes(spec):  # one at a time, so that a time box keeps the shapes already done
        results, md = bench.run([s], reps=reps, threads=1, peers=not a.dry_run, device=device, dtype=dtype)
        shapes[s.name] = shape_numbers(results[0])
        rec.put("shapes", shapes)
        md_parts.append(md)
    if cuda:
        for s_spec in spec.split(",")[:1]:  # the reference layer only: DeepSpeed's gate is slow to time twice
            try:
                ds = deepspeed_vs_triton(s_spec, reps)
            except Exception as e:  # noqa: BLE001 - a peer that fails to run is reported, not fatal
                ds = {"status": "failed", "why": f"{type(e).__name__}: {e}"}
            print(f"DeepSpeed MoE on CUDA: {ds}", flush=True)
            rec.put("deepspeed", ds)
            name = bench.parse_shapes(s_spec)[0].name
            if "triton_over_deepspeed" in ds and name in shapes:
                shapes[name]["triton_over_deepspeed"] = ds["triton_over_deepspeed"]
                rec.put("shapes", shapes)
    else:
        rec.put("deepspeed", {"status": "skipped", "why": "CPU dry run (DeepSpeed is timed here on CUDA only)"})
    if os.environ.get(OUT_ENV):
        Path(os.environ[OUT_ENV], "layer_bench.md").write_text("\n".join(md_parts))
    rec.finish()


if __name__ == "__main__":
    main()
