"""Fused Triton kernels (gating, device-side sort, grouped GEMMs); imported lazily, never at `import moe`.

Importing this package does not import triton: `triton_status()` answers whether the kernels can run here, and
the kernel modules (moe.kernels.gating, moe.kernels.sort, ...) import triton themselves when first used.

Triton decides at a kernel's definition (the module's import) whether it compiles for the GPU or runs in its
interpreter: with TRITON_INTERPRET=1 set before that import, kernels run on CPU tensors (slowly; the CPU tests
use it), otherwise they need a CUDA device.
"""
from __future__ import annotations

import importlib
import os
from functools import lru_cache
from typing import Optional

import torch

INSTALL_HINT = "install the triton extra (pip install 'switchyard-moe[triton]')"


def interpret_mode() -> bool:
    """TRITON_INTERPRET is set to a true value: kernels run in Triton's interpreter on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@lru_cache(maxsize=None)
def _triton_version() -> Optional[str]:
    try:
        return importlib.import_module("triton").__version__
    except ImportError:  # includes a broken install that fails half-way through its own imports
        return None


def triton_status(device: Optional[torch.device] = None) -> tuple[bool, str]:
    """Whether the Triton kernels can run on `device` (default: CUDA if present, else CPU), and why (or why not).

    ok on CUDA when triton imports; ok on CPU only in the interpreter (TRITON_INTERPRET=1)."""
    version = _triton_version()
    if version is None:
        return False, f"triton is not importable ({INSTALL_HINT})"
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device is available"
        return True, f"triton {version} on {torch.cuda.get_device_name(device)}"
    if interpret_mode():
        return True, f"triton {version} in its interpreter on {device.type} (TRITON_INTERPRET=1)"
    return False, f"no CUDA device ({device.type} tensors) and TRITON_INTERPRET is unset"


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (Triton blocks have power-of-two sizes; the tail is masked)."""
    return 1 << max(int(n) - 1, 0).bit_length()


__all__ = ["INSTALL_HINT", "interpret_mode", "next_pow2", "triton_status"]
