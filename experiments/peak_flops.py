"""Peak dense FLOP/s of the accelerators a run may land on, for model FLOPs utilisation (MFU).

MFU = achieved model FLOP/s (moe.flops training FLOPs per token x tokens/s) / the device's peak at the run's
precision. The peaks are NVIDIA's datasheet numbers for dense tensor-core math (no 2:4 sparsity): bf16 for runs
under bf16 autocast, TF32 for fp32 runs (what cuBLAS uses for fp32 matmuls when TF32 is allowed; without it the
peak is lower and the MFU an underestimate of the achieved fraction). An unknown device has no MFU, rather than a
guessed one.
"""
from __future__ import annotations

from typing import Optional

import torch

# (substring of torch.cuda.get_device_name, bf16 peak, tf32 peak); the first match wins, so the more specific
# names (PCIe parts) come before the general ones.
PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100 NVL", 835e12, 418e12),
    ("H100", 989e12, 494e12),  # SXM5
    ("H200", 989e12, 494e12),
    ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12),  # SXM4 and PCIe alike
    ("A10G", 70e12, 35e12),
    ("A10", 125e12, 62.5e12),
    ("L40S", 362e12, 183e12),
    ("L40", 181e12, 90.5e12),
    ("L4", 121e12, 60e12),
)


def peak_flops(device: torch.device, bf16: bool) -> Optional[float]:
    """The device's peak dense FLOP/s at the run's precision, or None (CPU, or a GPU not in PEAKS)."""
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device), bf16)


def peak_for_name(name: str, bf16: bool) -> Optional[float]:
    for key, bf16_peak, tf32_peak in PEAKS:
        if key in name:
            return bf16_peak if bf16 else tf32_peak
    return None
