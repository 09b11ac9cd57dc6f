"""What DeepSpeed compiles behind a run's back, said before it does: on a CPU device, joining the process group
JIT-builds its shared-memory collective op (deepspeed_shm_comm) with torch.utils.cpp_extension, silently and on
first use only (minutes on a small machine; cached in torch's extensions folder afterwards). A run that would build
it prints a line first, so a silent start is not taken for a hang.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import torch

CPU_OPS = ("deepspeed_shm_comm",)  # built when trainer=deepspeed joins its process group on a CPU device


def extensions_dir() -> Path:
    """torch.utils.cpp_extension's build folder for this Python and CUDA (its default layout; TORCH_EXTENSIONS_DIR
    overrides it)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(cache) / "torch_extensions")
    cuda = "cpu" if torch.version.cuda is None else "cu" + torch.version.cuda.replace(".", "")
    return Path(root) / f"py{sys.version_info.major}{sys.version_info.minor}_{cuda}"


def ops_to_build(device: torch.device) -> list[str]:
    """The DeepSpeed ops a run on `device` will compile first: those of CPU_OPS without a built library."""
    if device.type != "cpu":
        return []
    return [op for op in CPU_OPS if not any((extensions_dir() / op).glob("*.so"))]


def build_notice(device: torch.device) -> Optional[str]:
    """The line to print before DeepSpeed compiles, or None when nothing is to be built."""
    ops = ops_to_build(device)
    if not ops:
        return None
    return (f"DeepSpeed compiles its {', '.join(ops)} op on first use (can take minutes; cached in "
            f"{extensions_dir()})")


def announce_build(kind: str, device_name: str) -> bool:
    """Prints the build notice on rank 0 (the launcher's RANK) of a trainer=deepspeed run that will compile;
    True when it did, so that the caller can say how long the set-up took."""
    if kind != "deepspeed" or int(os.environ.get("RANK", "0") or 0) != 0:
        return False
    from experiments.engines.ranks import resolve_device

    notice = build_notice(resolve_device(device_name))
    if notice:
        print(notice, flush=True)
    return notice is not None
