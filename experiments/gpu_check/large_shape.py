"""Step g_large_shape (last, since a kernel that addresses out of bounds can leave the GPU unusable): one large
layer, and an int32-overflow probe.

- Large: T=32k, d=4096, f=14336, E=8, k=2 (Mixtral's expert sizes at a long batch), bf16, SwiGLU with biases:
  triton against sorted, forward and backward, time and error relative to the reference's scale.
- Overflow: T=80k, d=1024, f=14336, E=8, k=2, so that the hidden rows [N, f] hold N*f = 2.35e9 > 2^31 elements:
  every offset past 2^31 must be computed in 64 bits. The outputs and input gradients of the tokens whose rows lie
  past element 2^31, and the weight gradients of the last expert (which owns those rows), are compared with
  sorted's; an int32 offset would wrap to other rows (wrong numbers) or out of the buffer (a CUDA fault).
A dry run runs both at tiny sizes under the interpreter (no overflow is reached there: `overflow_reached`).
"""
from __future__ import annotations

import time

import torch

from experiments.gpu_check.step_io import StepRecord, all_finite, device, parse_args, rel_err, sync
from experiments.gpu_check.synthetic import expert_bank, forward_backward, skewed_plan

LARGE = dict(T=32768, d=4096, f=14336, E=8, k=2)
OVERFLOW = dict(T=81920, d=1024, f=14336, E=8, k=2)
DRY_LARGE = dict(T=40, d=32, f=48, E=4, k=2)
DRY_OVERFLOW = dict(T=48, d=16, f=40, E=4, k=2)
TOL_BF16 = 2e-2
# The overflow probe compares bf16 with bf16 (an fp32 reference would need another 50 GB), where the combine
# weight's gradient (a bf16 reduction over d in sorted) is the least accurate; a wrapped offset reads other rows
# and gives errors of order 1.
TOL_OVERFLOW = 5e-2
INT32_LIMIT = 2 ** 31


def layer_inputs(size: dict, dev: torch.device, seed: int):
    T, d, f, E, k = (size[n] for n in ("T", "d", "f", "E", "k"))
    plan = skewed_plan(T, E, k, (), 1.5 / E, seed=seed, device=dev)  # expert 0 at 1.5x its even share
    bank = expert_bank(E, d, f, torch.bfloat16, dev, seed=seed)
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    gy = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    return plan, bank, x, gy


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def large(rec: StepRecord, size: dict, dev: torch.device, warm: bool) -> None:
    from moe.dispatch.sorted import sorted_dispatch
    from moe.dispatch.triton import triton_dispatch

    plan, bank, x, gy = layer_inputs(size, dev, seed=0)
    for dispatch in (triton_dispatch, sorted_dispatch) if warm else ():  # compilation, the allocator's pools
        forward_backward(dispatch, x, plan, bank, gy)
    got, t_triton = timed(lambda: forward_backward(triton_dispatch, x, plan, bank, gy))
    ref, t_sorted = timed(lambda: forward_backward(sorted_dispatch, x, plan, bank, gy))
    errs = {n: rel_err(got[n], ref[n]) for n in ref}
    rec.put("large", {"size": size, "triton_s": t_triton, "sorted_s": t_sorted, "rel_err": errs})
    worst = max(errs, key=errs.get)
    rec.check("large_matches_sorted", errs[worst] <= TOL_BF16 and all(all_finite(t) for t in got.values()),
              f"{size}: worst {worst} {errs[worst]:.2e} of sorted's scale; triton {t_triton:.2f} s, sorted "
              f"{t_sorted:.2f} s (forward + backward, one call each after a warm-up on the GPU)")


def overflow(rec: StepRecord, size: dict, dev: torch.device) -> None:
    from moe.dispatch.sorted import sorted_dispatch
    from moe.dispatch.triton import triton_dispatch

    plan, bank, x, gy = layer_inputs(size, dev, seed=1)
    N, f = plan.token_index.numel(), size["f"]
    # rows from here on lie past element 2^31 of [N, f] (at a dry run's size, which reaches no overflow: the 2nd half)
    first_late_row = -(-INT32_LIMIT // f) if N * f > INT32_LIMIT else N // 2
    late_tokens = plan.token_index[first_late_row:].unique()
    last = size["E"] - 1
    rec.put("overflow_size", {**size, "rows": N, "elements_of_h": N * f, "overflow_reached": N * f > INT32_LIMIT,
                              "first_row_past_2^31": first_late_row, "tokens_checked": int(late_tokens.numel())})

    def pick(out: dict) -> dict:  # keep only what the comparison needs: the rest is tens of GB
        keep = {"y": out["y"][late_tokens], "grad_x": out["grad_x"][late_tokens],
                "grad_w_up_last": out["grad_w_up"][last], "grad_w_down_last": out["grad_w_down"][last],
                "grad_weight_late": out["grad_weight"][first_late_row:]}
        return {n: t.clone() for n, t in keep.items()}

    got = pick(forward_backward(triton_dispatch, x, plan, bank, gy))
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    ref = pick(forward_backward(sorted_dispatch, x, plan, bank, gy))
    errs = {n: rel_err(got[n], ref[n]) for n in ref}
    rec.put("overflow_rel_err", errs)
    worst = max(errs, key=errs.get)
    reached = "past 2^31" if N * f > INT32_LIMIT else "(not past 2^31 at dry-run size)"
    rec.check("int32_overflow", errs[worst] <= TOL_OVERFLOW and all(all_finite(t) for t in got.values()),
              f"N*f = {N * f:.3g} elements {reached}: tokens of rows >= {first_late_row} and the last expert's "
              f"weight gradients, worst {worst} {errs[worst]:.2e} of sorted's scale")


def main(argv=None) -> None:
    a = parse_args(__doc__.splitlines()[0], argv)
    rec = StepRecord(a.json)
    rec.put("dry_run", a.dry_run)
    dev = device()
    from moe.kernels import triton_status

    ok, why = triton_status(dev)
    if not ok or (dev.type != "cuda" and not a.dry_run):
        rec.skip(why if not ok else "no CUDA")
        return
    large(rec, DRY_LARGE if a.dry_run else LARGE, dev, warm=not a.dry_run)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        rec.put("peak_memory_gib_large", torch.cuda.max_memory_allocated() / 2 ** 30)
    overflow(rec, DRY_OVERFLOW if a.dry_run else OVERFLOW, dev)
    if dev.type == "cuda":
        rec.put("peak_memory_gib", torch.cuda.max_memory_allocated() / 2 ** 30)
    rec.finish()


if __name__ == "__main__":
    main()
