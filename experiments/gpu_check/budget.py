"""The GPU check's steps, in the order they run, with the time box of each: the budget table.

The GPU window is about 15 minutes with the machine's start-up; the check must leave room to run once more after
a fix, so the boxes add up to at most TOTAL_BUDGET_S (8.5 minutes). A step's box is also cut to what is left of
the total, so the check never overruns however the steps go. `dry` says what `--dry-run` does with a step on a
machine without CUDA: "run" launches it with tiny shapes (the kernels under TRITON_INTERPRET=1), "skip" reports
"skipped: no CUDA" (only CUDA makes sense of it).
"""
from __future__ import annotations

from dataclasses import dataclass

TOTAL_BUDGET_S = 510  # 8.5 minutes for everything, the wheel install included
OUT_ENV = "GPU_CHECK_OUT"  # the steps learn the output folder from it (for files that must come back)


@dataclass(frozen=True)
class Step:
    name: str  # key in results.json and the log's prefix
    title: str  # what it measures, one line
    budget_s: int  # time box on the GPU machine
    module: str  # python -m MODULE --json PATH [--dry-run] [args]
    args: tuple[str, ...] = ()  # extra arguments on the GPU
    dry_args: tuple[str, ...] = ()  # extra arguments in a dry run (tiny shapes)
    dry: str = "run"  # in a dry run without CUDA: "run" (tiny shapes) or "skip" ("skipped: no CUDA")
    dry_budget_s: int = 60  # time box of the dry run's launch
    interpreter: bool = True  # dry run on CPU: under TRITON_INTERPRET=1 (False: compiles for sm_90 without a GPU)
    exports: str = ""  # an environment variable the later steps get, set to the table file this step wrote


BIG = "16384:1024:2048:8:2"  # issue 20's reference layer (T >= 16k)
PROBE_SHAPE = "4099:1000:1400:64:2"  # the probe's layer (issue 20 item 6), for the weight gradients' sweep
HOT = "0.3"  # the probe's skew: one expert with 30% of the rows (the tail split-K is for)
# The boxes are estimates (no GPU has run the check yet): the probe and kernel-info steps now also compile and
# run the split-K, persistent and TMA variants, and the weight gradients get their own sweep; the time came from
# the gpu-marked tests (20 s), the training twins (10 s), the kernel benchmark, the forward sweep and the layer
# benchmark (5 s each) and the 10 s the table had spare.
STEPS: tuple[Step, ...] = (
    Step("device", "device, versions, datasheet peaks, a measured bf16 GEMM and a device copy",
         20, "experiments.gpu_check.device_info"),
    Step("a_probe", "correctness probe: bf16 T=4099 d=1000 f=1400 E=64 (5 empty, one at 30%), k=2 and 8, "
         "against fp32, forward and backward, twice for bitwise equality; again with split-K weight gradients, "
         "the persistent grid and TMA", 85, "experiments.gpu_check.probe", dry_budget_s=300),
    Step("b_gpu_tests", "the gpu-marked tests at real sizes (pytest -m gpu)", 75, "experiments.gpu_check.gpu_tests"),
    Step("c_kernel_info", "registers, spills, shared memory, wgmma and async copies of every compiled kernel, "
         "the split-K, persistent and TMA variants included", 40, "experiments.gpu_check.kernel_info",
         interpreter=False),
    Step("d_kernel_bench", "per-kernel throughput table (experiments.bench_kernels)", 40,
         "experiments.gpu_check.external",
         ("--module", "experiments.bench_kernels", "--", "--shape", BIG, "--dtype", "bf16", "--json", "{table}"),
         ("--module", "experiments.bench_kernels", "--", "--quick", "--json", "{table}"), dry_budget_s=120),
    Step("d_tile_sweep", "tile sweep of the forward grouped GEMMs (moe.kernels.autotune; the persistent and TMA "
         "variants among the candidates); later steps use its table", 50, "experiments.gpu_check.external",
         ("--module", "moe.kernels.autotune", "--table", "tuned_configs.json", "--", "--out", "{table}", "--quick",
          "--shape", BIG, "--kernels", "up_glu,down"),
         ("--module", "moe.kernels.autotune", "--table", "tuned_configs.json", "--", "--out", "{table}", "--quick"),
         dry_budget_s=90, exports="SWITCHYARD_TUNED_CONFIGS"),
    # Tuned at the probe's layer with one expert at 30%: split-K is timed where it should pay. A table of its own,
    # not exported: a choice made at a skewed load would apply at every load of its shape bucket.
    Step("d_wgrad_sweep", "tile sweep of the weight gradients at the probe's skew (--hot 0.3): split-K and TMA "
         "among the candidates", 35, "experiments.gpu_check.external",
         ("--module", "moe.kernels.autotune", "--table", "tuned_wgrad_hot.json", "--", "--out", "{table}", "--quick",
          "--shape", PROBE_SHAPE, "--hot", HOT, "--kernels", "wgrad_up_glu,wgrad_down"),
         ("--module", "moe.kernels.autotune", "--table", "tuned_wgrad_hot.json", "--", "--out", "{table}", "--quick",
          "--hot", HOT, "--kernels", "wgrad_up_glu,wgrad_down"), dry_budget_s=90),
    Step("e_layer_bench", "the layer benchmark on CUDA, bf16, T >= 16k: dense, sorted, triton, Mixtral-style "
         "loop, DeepSpeed MoE, experts only", 55, "experiments.gpu_check.layer_bench"),
    Step("f_train_twins", "50 training steps of a ~100M dense model and its FLOP-matched MoE twin: tokens/s, MFU, "
         "no host sync in a dropless step", 55, "experiments.gpu_check.train_twins"),
    Step("g_large_shape", "a large shape and an int32-overflow probe (N*f > 2^31 elements)", 35,
         "experiments.gpu_check.large_shape"),
)
WHEELS_BUDGET_S = 20  # the carried wheels' install, before the steps
assert WHEELS_BUDGET_S + sum(s.budget_s for s in STEPS) <= TOTAL_BUDGET_S, "the budget table overruns 8.5 minutes"


def step_names() -> list[str]:
    return [s.name for s in STEPS]
