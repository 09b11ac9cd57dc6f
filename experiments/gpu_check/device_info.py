"""Step `device`: what the check runs on: device, versions, datasheet peaks, and two quick measurements.

Peaks: dense bf16 and TF32 tensor-core FLOP/s from experiments.peak_flops (NVIDIA's datasheets), the memory
bandwidth from the memory clock and bus width (experiments.bench.peak_bandwidth) and from the datasheet table
below. Measured: one bf16 GEMM (8192^3 on the GPU) and one device-to-device copy, the practical ceilings that
the kernels' TFLOP/s and GB/s are compared against. On CPU only the versions are reported (cuda: false).
"""
from __future__ import annotations

import platform
from typing import Optional

import torch

from experiments.gpu_check.step_io import StepRecord, parse_args, summary_ms, time_ms
from experiments.peak_flops import peak_for_name

# (substring of the device name, datasheet memory bandwidth in GB/s); the first match wins.
DATASHEET_GBS: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0), ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0), ("L40S", 864.0), ("L4", 300.0),
)


def datasheet_gbs(name: str) -> Optional[float]:
    return next((gbs for key, gbs in DATASHEET_GBS if key in name), None)


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError as e:
        out["triton"] = f"not importable ({e})"
    out["has_grouped_mm"] = hasattr(torch.nn.functional, "grouped_mm")  # torch >= 2.9; the loop is the fallback
    return out


def measure(rec: StepRecord, dry_run: bool) -> None:
    n = 1024 if dry_run else 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = summary_ms(time_ms(lambda: a @ b, reps=10, warmup=3))
    rec.put("measured_bf16_tflops", 2 * n ** 3 / (t["min_ms"] * 1e-3) / 1e12)
    src = torch.empty(1 << (24 if dry_run else 29), device="cuda", dtype=torch.bfloat16)  # 1 GiB on the GPU
    dst = torch.empty_like(src)
    t = summary_ms(time_ms(lambda: dst.copy_(src), reps=10, warmup=2))
    rec.put("measured_copy_gbs", 2 * src.numel() * src.element_size() / (t["min_ms"] * 1e-3) / 1e9)  # read + write


def main(argv=None) -> None:
    a = parse_args(__doc__.splitlines()[0], argv)
    rec = StepRecord(a.json)
    for k, v in versions().items():
        rec.put(k, v)
    cuda = torch.cuda.is_available()
    rec.put("cuda", cuda)
    if not cuda:
        rec.put("device", f"cpu ({platform.processor() or platform.machine()})")
        print(f"no CUDA device: torch {torch.__version__}, triton {rec.numbers['triton']}", flush=True)
        return
    from experiments.bench import peak_bandwidth

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    name = torch.cuda.get_device_name(dev)
    rec.put("device", name)
    rec.put("capability", list(torch.cuda.get_device_capability(dev)))
    rec.put("sms", props.multi_processor_count)
    rec.put("memory_gib", props.total_memory / 2 ** 30)
    rec.put("peak_bf16_tflops", (peak_for_name(name, True) or 0) / 1e12 or None)
    rec.put("peak_tf32_tflops", (peak_for_name(name, False) or 0) / 1e12 or None)
    rec.put("peak_gbs_clock", peak_bandwidth(dev))
    rec.put("peak_gbs_datasheet", datasheet_gbs(name))
    measure(rec, a.dry_run)
    for k, v in rec.numbers.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}", flush=True)


if __name__ == "__main__":
    main()
