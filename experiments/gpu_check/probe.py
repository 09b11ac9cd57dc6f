"""Step a_probe (issue 20 item 6): the triton dispatcher against an fp32 reference at awkward sizes, twice.

bf16, T=4099 tokens, d=1000, f=1400 (tails in K and N of every tile: neither is a multiple of 16, 64 or 128),
E=64 experts of which 5 are empty (one next to the heavy expert, one last) and expert 0 holds 30% of the rows
(experiments.gpu_check.synthetic), k=2 and k=8; SwiGLU experts with biases. The reference is the `sorted`
dispatcher in fp32 on the same (bf16-representable) values. Forward and backward (grad of x, of the combine
weight and of every expert parameter), each compared by its error relative to the reference tensor's scale; the
bf16 `sorted` dispatcher's own error is recorded beside it as the yardstick. Then the triton run is repeated and
every output compared bitwise (no atomics anywhere: the results must be identical).
"""
from __future__ import annotations

import time

import torch

from experiments.gpu_check.step_io import StepRecord, device, parse_args, rel_err, sync
from experiments.gpu_check.synthetic import as_dtype, expert_bank, forward_backward, skewed_plan

FULL = dict(T=4099, d=1000, f=1400, E=64, empty=(1, 17, 33, 48, 63))
DRY = dict(T=29, d=40, f=56, E=6, empty=(1, 5))  # the same structure, small enough for the interpreter
HEAVY_SHARE = 0.30
TOP_K = (2, 8)
TOL_BF16 = 2e-2  # error relative to the reference's scale; the bf16 `sorted` path's own error is recorded too


def probe_one(rec: StepRecord, k: int, size: dict, dev: torch.device) -> None:
    from moe.dispatch.sorted import sorted_dispatch
    from moe.dispatch.triton import triton_dispatch

    T, d, f, E = size["T"], size["d"], size["f"], size["E"]
    plan = skewed_plan(T, E, k, size["empty"], HEAVY_SHARE, seed=k, device=dev)
    bank = expert_bank(E, d, f, torch.bfloat16, dev, seed=k)
    g = torch.Generator().manual_seed(100 + k)
    x = torch.randn(T, d, generator=g).to(dev, torch.bfloat16)
    gy = torch.randn(T, d, generator=g).to(dev, torch.bfloat16)
    counts = plan.counts.tolist()
    rec.put(f"k{k}_plan", {"rows": T * k, "empty_experts": sum(c == 0 for c in counts),
                           "heavy_share": counts[0] / (T * k), "max_rows": max(counts)})
    ref = forward_backward(sorted_dispatch, x.float(), plan, as_dtype(bank, torch.float32), gy.float())
    base = forward_backward(sorted_dispatch, x, plan, bank, gy)  # bf16 torch: the yardstick
    runs, seconds = [], []
    for _ in range(2):
        sync()
        t0 = time.perf_counter()
        runs.append(forward_backward(triton_dispatch, x, plan, bank, gy))
        sync()
        seconds.append(time.perf_counter() - t0)
    rec.put(f"k{k}_seconds", {"first (compiles)": seconds[0], "second": seconds[1]})
    errs = {n: rel_err(runs[0][n], ref[n]) for n in ref}
    rec.put(f"k{k}_rel_err_triton", errs)
    rec.put(f"k{k}_rel_err_sorted_bf16", {n: rel_err(base[n], ref[n]) for n in ref})
    worst = max(errs, key=errs.get)
    rec.check(f"k{k}_accuracy", errs[worst] <= TOL_BF16,
              f"worst {worst} at {errs[worst]:.2e} of the fp32 reference's scale (tolerance {TOL_BF16:.0e}; "
              f"bf16 sorted: {rec.numbers[f'k{k}_rel_err_sorted_bf16'][worst]:.2e})")
    differ = [n for n in runs[0] if not torch.equal(runs[0][n], runs[1][n])]
    rec.check(f"k{k}_bitwise", not differ,
              "two runs identical in every output" if not differ else f"runs differ in {', '.join(differ)}")


def main(argv=None) -> None:
    a = parse_args(__doc__.splitlines()[0], argv)
    rec = StepRecord(a.json)
    dev = device()
    rec.put("dry_run", a.dry_run)
    from moe.kernels import triton_status

    ok, why = triton_status(dev)
    rec.put("triton", why)
    if not ok:
        rec.skip(why)
        return
    size = DRY if a.dry_run else FULL
    rec.put("size", {k: (list(v) if isinstance(v, tuple) else v) for k, v in size.items()})
    for k in TOP_K:
        probe_one(rec, k, size, dev)
    rec.finish()


if __name__ == "__main__":
    main()
