"""Issue 18's targets (and issue 20's checks) read off the steps' numbers: met, missed, or unmeasured.

Each target names the step its number comes from and how the number was taken. A target whose step did not run
(skipped, timed out before the number, a dry run on CPU) is "unmeasured", never guessed. Step numbers are those
the step modules write (experiments.gpu_check.layer_bench, train_twins, probe, kernel_info, large_shape).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from experiments.gpu_check.variants import VARIANTS

BIG_T = 16384  # the layer targets hold at T >= 16k tokens


def _target(name: str, target: str, value: Optional[float], ok: Optional[bool], source: str, how: str) -> dict:
    status = "unmeasured" if value is None or ok is None else ("met" if ok else "missed")
    return {"name": name, "target": target, "value": value, "status": status, "from": source, "how": how}


def _numbers(steps: dict, name: str) -> dict:
    s = steps.get(name) or {}
    return s.get("numbers") or {} if s.get("status") in ("ok", "failed", "timeout") else {}


def _big_shapes(layer: dict) -> list[dict]:
    return [s for s in (layer.get("shapes") or {}).values() if s.get("T", 0) >= BIG_T]


def _worst(shapes: list[dict], get: Callable[[dict], Optional[float]], worst: Callable) -> Optional[float]:
    vals = [v for v in (get(s) for s in shapes) if v is not None]
    return worst(vals) if vals else None


def _row(shape: dict, impl: str, key: str = "ratio_median_pairs") -> Optional[float]:
    return ((shape.get("rows") or {}).get(impl) or {}).get(key)


DRY = "dry run (tiny shapes, the interpreter): plumbing, not a measurement"


def _check(steps: dict, step: str, check: str, name: str, target: str) -> dict:
    if _numbers(steps, step).get("dry_run"):
        return _target(name, target, None, None, step, DRY)
    c = (_numbers(steps, step).get("checks") or {}).get(check)
    if c is None:
        return _target(name, target, None, None, step, "not reached")
    return _target(name, target, 1.0 if c["ok"] else 0.0, c["ok"], step, c["detail"])


def _checks(steps: dict, step: str, checks: list[str], name: str, target: str) -> dict:
    """A target met when every one of `checks` passed (value: the share that passed); unmeasured until all ran."""
    if _numbers(steps, step).get("dry_run"):
        return _target(name, target, None, None, step, DRY)
    found = _numbers(steps, step).get("checks") or {}
    missing = [c for c in checks if c not in found]
    if missing:
        return _target(name, target, None, None, step, f"not reached: {', '.join(missing)}")
    failed = [c for c in checks if not found[c]["ok"]]
    return _target(name, target, 1 - len(failed) / len(checks), not failed, step,
                   f"missed: {', '.join(failed)}" if failed else f"all of {', '.join(checks)}")


def evaluate(steps: dict[str, dict[str, Any]]) -> list[dict]:
    """steps: name -> the runner's record of that step -> the list of targets for results.json."""
    layer = _numbers(steps, "e_layer_bench")
    big = _big_shapes(layer) if not layer.get("dry_run") else []
    out = []
    v = _worst(big, lambda s: _row(s, "triton"), max)
    out.append(_target("triton_vs_dense", "triton <= 1.15x dense FFN time at T >= 16k", v,
                       None if v is None else v <= 1.15, "e_layer_bench",
                       "median over repetitions of triton / dense FFN (forward + backward), worst shape"))
    v = _worst(big, lambda s: s.get("grouped_gemm_vs_dense"), min)
    out.append(_target("grouped_gemm_vs_dense", "grouped GEMM >= 85% of dense GEMM TFLOP/s", v,
                       None if v is None else v >= 0.85, "e_layer_bench",
                       "bench.py's forward up-projection GEMM (torch grouped_mm or the loop, the faster) over one "
                       "dense GEMM of equal FLOPs, worst shape; our kernels' own rows are d_kernel_bench's table"))
    table = _numbers(steps, "d_kernel_bench").get("table") or {}
    shares = [r["pct_dense"] / 100 for r in table.get("rows", []) if r.get("pct_dense")]
    v = min(shares) if shares and not table.get("interpreted", True) else None
    out.append(_target("kernel_gemms_vs_dense", "each of our grouped GEMM kernels >= 85% of torch.mm of equal FLOPs",
                       v, None if v is None else v >= 0.85, "d_kernel_bench",
                       "experiments.bench_kernels' '% of dense' (torch.mm on pre-gathered rows / our kernel), the "
                       "worst kernel"))
    for key, label in (("permute", "permute (gather)"), ("combine", "combine (weighted index_add)")):
        v = _worst(big, lambda s, k=key: s.get(f"{k}_vs_peak"), min)
        out.append(_target(f"{key}_bandwidth", f"{key} >= 70% of the device's peak memory bandwidth", v,
                           None if v is None else v >= 0.70, "e_layer_bench",
                           f"bench.py's {label} GB/s over the peak from the memory clock and bus width, worst shape"))
    for peer, impl in (("deepspeed", "DeepSpeed's MoE layer"), ("mixtral", "the Mixtral-style loop")):
        v = _worst(big, lambda s, p=peer: s.get(f"triton_over_{p}"), max)
        out.append(_target(f"triton_vs_{peer}", f"triton faster than {impl}", v, None if v is None else v < 1.0,
                           "e_layer_bench", f"triton time / {impl}'s (forward + backward, medians), worst shape"))
    train = _numbers(steps, "f_train_twins")
    v = None if train.get("dry_run") else train.get("moe_vs_dense_tokens_per_s")
    out.append(_target("twin_tokens_per_s", "MoE twin tokens/s >= 0.85x dense in training", v,
                       None if v is None else v >= 0.85, "f_train_twins",
                       "tokens/s of the twin over the dense model's, bf16 autocast, dispatcher=auto"))
    out.append(_check(steps, "f_train_twins", "no_host_sync", "dropless_step_no_sync",
                      "a dropless MoE training step makes no host synchronisation"))
    for check in ("k2_accuracy", "k8_accuracy", "k2_bitwise", "k8_bitwise"):
        out.append(_check(steps, "a_probe", check, f"probe_{check}",
                          "probe within bf16 tolerance of fp32" if "accuracy" in check else "probe bitwise repeatable"))
    for variant in VARIANTS:  # experiments.gpu_check.variants, each run by the probe at k=2 and 8
        out.append(_checks(steps, "a_probe", [f"k{k}_{variant}_{c}" for k in (2, 8) for c in ("accuracy", "bitwise")],
                           f"probe_{variant}", f"probe with {variant.replace('_', '-')} within bf16 tolerance of "
                           "fp32 and bitwise repeatable, k=2 and 8"))
    out.append(_check(steps, "c_kernel_info", "gemms_use_wgmma", "gemms_use_wgmma",
                      "the grouped GEMMs compile to warp-group MMA (wgmma) on Hopper"))
    out.append(_check(steps, "c_kernel_info", "tma_variants_use_tma", "tma_variants_use_tma",
                      "kernels given TMA descriptors compile to TMA bulk copies on Hopper"))
    out.append(_check(steps, "g_large_shape", "int32_overflow", "int32_overflow",
                      "rows past 2^31 elements of [N, f] are right (int64 addressing)"))
    return out
