"""The prepared GPU check (issue 18 step 1, issue 20 item 6): one command that fits a 15-minute GPU window.

    python -m experiments.gpu_check [--dry-run] [--out DIR] [--wheels DIR]      (make gpu-check [DRY_RUN=1] [OUT=DIR])

It installs carried wheels (wheels.py), prints the device (device_info.py), then runs the steps of the budget
table (budget.py) in order, each in a subprocess with its own time box (runner.py), and writes one log and one
results.json into the output folder, with each issue 18 target met or missed (targets.py). The steps:
correctness probe (probe.py), the gpu-marked tests, compiled-kernel resources (kernel_info.py), the kernel
benchmark and tile sweep (other engineers' entry points, when present), the layer benchmark (layer_bench.py),
training of a dense model and its MoE twin (train_twins.py), and a large shape with an int32-overflow probe
(large_shape.py). docs/gpu_check.md says how to run it with the device tool and what to record.

Nothing here imports Hydra: the GPU machine has no hydra-core unless its wheel is carried.
"""
