"""Step a_probe (issue 20 item 6): the triton dispatcher against an fp32 reference at awkward sizes, twice.

bf16, T=4099 tokens, d=1000, f=1400 (tails in K and N of every tile: neither is a multiple of 16, 64 or 128),
E=64 experts of which 5 are empty (one next to the heavy expert, one last) and expert 0 holds 30% of the rows
(experiments.gpu_check.synthetic), k=2 and k=8; SwiGLU experts with biases. The reference is the `sorted`
dispatcher in fp32 on the same (bf16-representable) values. Forward and backward (grad of x, of the combine
weight and of every expert parameter), each compared by its error relative to the reference tensor's scale; the
bf16 `sorted` dispatcher's own error is recorded beside it as the yardstick. Then the triton run is repeated and
every output compared bitwise (no atomics anywhere: the results must be identical).

Then the same for each kernel variant (experiments.gpu_check.variants: split-K weight gradients, the persistent
grid with its tile table, TMA descriptors): against the same fp32 reference, twice bitwise, each with its checks
(k{k}_{variant}_accuracy, k{k}_{variant}_bitwise) and its numbers (k{k}_variants: max error, worst output, what the
variant did at this plan, whether it equals the default launch bitwise, seconds).
"""
from __future__ import annotations

import time

import torch

from experiments.gpu_check.step_io import StepRecord, device, parse_args, rel_err, sync
from experiments.gpu_check.synthetic import as_dtype, expert_bank, forward_backward, skewed_plan
from experiments.gpu_check.variants import VARIANTS, base_blocks, describe_variant, triton_with, variant_blocks

FULL = dict(T=4099, d=1000, f=1400, E=64, empty=(1, 17, 33, 48, 63))
DRY = dict(T=29, d=40, f=56, E=6, empty=(1, 5))  # the same structure, small enough for the interpreter
HEAVY_SHARE = 0.30
TOP_K = (2, 8)
TOL_BF16 = 2e-2  # error relative to the reference's scale; the bf16 `sorted` path's own error is recorded too


def twice(dispatch, x, plan, bank, gy) -> tuple[list[dict], list[float]]:
    """Two forward + backward runs of `dispatch` and the seconds of each (the first compiles)."""
    runs, seconds = [], []
    for _ in range(2):
        sync()
        t0 = time.perf_counter()
        runs.append(forward_backward(dispatch, x, plan, bank, gy))
        sync()
        seconds.append(time.perf_counter() - t0)
    return runs, seconds


def differing(runs: list[dict]) -> list[str]:
    return [n for n in runs[0] if not torch.equal(runs[0][n], runs[1][n])]


def probe_one(rec: StepRecord, k: int, size: dict, dev: torch.device, dry_run: bool) -> None:
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
    runs, seconds = twice(triton_dispatch, x, plan, bank, gy)
    rec.put(f"k{k}_seconds", {"first (compiles)": seconds[0], "second": seconds[1]})
    errs = {n: rel_err(runs[0][n], ref[n]) for n in ref}
    rec.put(f"k{k}_rel_err_triton", errs)
    rec.put(f"k{k}_rel_err_sorted_bf16", {n: rel_err(base[n], ref[n]) for n in ref})
    worst = max(errs, key=errs.get)
    rec.check(f"k{k}_accuracy", errs[worst] <= TOL_BF16,
              f"worst {worst} at {errs[worst]:.2e} of the fp32 reference's scale (tolerance {TOL_BF16:.0e}; "
              f"bf16 sorted: {rec.numbers[f'k{k}_rel_err_sorted_bf16'][worst]:.2e})")
    differ = differing(runs)
    rec.check(f"k{k}_bitwise", not differ,
              "two runs identical in every output" if not differ else f"runs differ in {', '.join(differ)}")
    probe_variants(rec, k, (x, plan, bank, gy), ref, runs[0], counts, dev, dry_run)


def probe_variants(rec: StepRecord, k: int, inputs: tuple, ref: dict, default: dict, counts: list[int],
                   dev: torch.device, dry_run: bool) -> None:
    """Each kernel variant against the fp32 reference and twice bitwise; numbers under k{k}_variants."""
    bank = inputs[2]
    found: dict = {}
    for name, blocks in variant_blocks(base_blocks(dry_run), counts).items():
        info = describe_variant(name, blocks, counts, bank, dev)
        found[name] = info
        try:
            runs, seconds = twice(triton_with(blocks), *inputs)
        except Exception as e:  # noqa: BLE001 - one variant's failure must not hide the others' results
            info["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            rec.put(f"k{k}_variants", found)
            rec.check(f"k{k}_{name}_accuracy", False, f"{name} raised {info['error']}")
            continue
        errs = {n: rel_err(runs[0][n], ref[n]) for n in ref}
        worst = max(errs, key=errs.get)
        differ = differing(runs)
        same = all(torch.equal(runs[0][n], default[n]) for n in ref)  # a record: not required of a variant
        info.update(max_rel_err=errs[worst], worst=worst, rel_err=errs, accuracy_ok=errs[worst] <= TOL_BF16,
                    bitwise_ok=not differ, equals_default=same,
                    seconds={"first (compiles)": seconds[0], "second": seconds[1]})
        rec.put(f"k{k}_variants", found)
        rec.check(f"k{k}_{name}_accuracy", info["accuracy_ok"],
                  f"{name}: worst {worst} at {errs[worst]:.2e} of the fp32 reference's scale (tolerance "
                  f"{TOL_BF16:.0e}); {'equal to' if info['equals_default'] else 'differs from'} the default launch")
        rec.check(f"k{k}_{name}_bitwise", not differ,
                  f"{name}: two runs identical in every output" if not differ else
                  f"{name}: runs differ in {', '.join(differ)}")


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
    rec.put("variants", list(VARIANTS))
    for k in TOP_K:
        probe_one(rec, k, size, dev, a.dry_run)
    rec.finish()


if __name__ == "__main__":
    main()
