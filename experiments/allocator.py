"""A memory allocator that keeps freed pages, for CPU timings that measure compute rather than page faults.

glibc malloc serves large blocks (above 32 MiB at most) with mmap and returns them to the kernel on free, so every
training step's fresh activation and gradient buffers are faulted in again, page by page. On the benchmark's
shapes that first touch costs 20-25% of a GEMM writing into a 128 MiB buffer, and an MoE layer allocates more
fresh memory than its dense twin (E weight gradients instead of one), so page faults alone inflate its ratio.
PyTorch's CUDA caching allocator never pays this; on CPU a retaining allocator makes the comparison fair:

- jemalloc with decay disabled (`MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1`), preloaded;
- else tcmalloc (it keeps freed spans by default), preloaded;
- else glibc told to keep everything on its heap (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`).

The choice must be in the environment before the process starts, so `reexec` re-runs the module once with it.
`make bench` installs jemalloc first where it can (Debian's libjemalloc2).
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

CHOICES = ("auto", "jemalloc", "tcmalloc", "glibc-retain", "system")
MARK = "SWITCHYARD_ALLOCATOR"  # set in the re-executed process: the allocator it runs with, in words
_GLIBC_RETAIN = {"MALLOC_MMAP_THRESHOLD_": str(1 << 40), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def installed() -> dict[str, str]:
    """Shared libraries the dynamic loader knows: {"jemalloc": path, "tcmalloc": path}, either may be missing."""
    try:
        libs = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found: dict[str, str] = {}
    for line in libs.splitlines():
        path = line.split("=>")[-1].strip()
        for name, lib in (("jemalloc", "libjemalloc.so"), ("tcmalloc", "libtcmalloc.so")):
            if lib in line and name not in found:
                found[name] = path
    return found


def environment(choice: str, libs: Optional[dict[str, str]] = None) -> tuple[dict[str, str], str]:
    """The variables to add for `choice`, and the allocator in words. Raises ValueError for an impossible choice."""
    if choice not in CHOICES:
        raise ValueError(f"--allocator={choice!r} must be one of {CHOICES}")
    libs = installed() if libs is None else libs
    if choice == "auto":
        choice = "jemalloc" if "jemalloc" in libs else "tcmalloc" if "tcmalloc" in libs else "glibc-retain"
    if choice in ("jemalloc", "tcmalloc"):
        if choice not in libs:
            raise ValueError(f"--allocator={choice}: lib{choice} is not installed (ldconfig -p does not list it); "
                             f"install it (Debian: apt-get install libjemalloc2 / libtcmalloc-minimal4, or run "
                             f"`make bench`), or pass --allocator auto")
        env = {"LD_PRELOAD": libs[choice]}
        if choice == "jemalloc":
            env["MALLOC_CONF"] = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
        return env, f"{choice} ({libs[choice]}) preloaded, freed pages kept"
    if choice == "glibc-retain":
        return dict(_GLIBC_RETAIN), "glibc malloc with mmap and trim thresholds at 1 TiB (freed pages kept)"
    return {}, "glibc malloc as configured (freed large blocks go back to the kernel: page faults are timed too)"


def current() -> str:
    """The allocator this process runs with, in words."""
    if MARK in os.environ:
        return os.environ[MARK]
    preload = os.environ.get("LD_PRELOAD", "")
    return f"{preload} preloaded" if preload else "glibc malloc (not re-executed with a retaining allocator)"


def reexec(module: str, argv: list[str], choice: str) -> None:
    """Re-run `python -m module argv` with the allocator's environment, once; returns only in the re-run process."""
    if MARK in os.environ:
        return
    env, words = environment(choice)
    if "LD_PRELOAD" in env and os.environ.get("LD_PRELOAD"):
        env["LD_PRELOAD"] = f"{env['LD_PRELOAD']}:{os.environ['LD_PRELOAD']}"
    os.environ.update(env)
    os.environ[MARK] = words
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])
