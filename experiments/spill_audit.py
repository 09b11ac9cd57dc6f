"""Issue 20's spill audit: every tiled kernel compiled for sm_90 (no GPU needed) at its default tiles and at each
autotune candidate (moe.kernels.tile_configs.candidates), bf16 and fp32 (TF32), with registers, spill bytes and
shared memory as ptxas reports them.

    .venv/bin/python -m experiments.spill_audit --out audit.jsonl [--shape aligned|tails|generic]
        [--defaults-only] [--worker I --workers N]

Each build is one line of JSON appended to --out as soon as it is compiled (compiles take tens of seconds here,
so a killed run keeps what it had); a second run skips the builds already in the file. --worker I of N takes
every N-th build (run N processes side by side on a shared machine, each with its own --out).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled, not interpreted (before triton is imported)

import torch  # noqa: E402

from moe.kernels.gemm_tiles import GPU_BLOCKS, GPU_BLOCKS_FP32  # noqa: E402
from moe.kernels.tile_configs import KERNELS, ROW_TILED, TMA_KERNELS, WGRAD, candidates  # noqa: E402
from tests.moe.kernels.sm90_builds import SHAPES  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def jobs(defaults_only: bool) -> list[tuple[str, str, dict, str]]:
    """(kernel, dtype name, GemmBlocks fields, variant): the defaults of every kernel first, then the rest."""
    first, rest = [], []
    for dname, dtype in DTYPES.items():
        default = GPU_BLOCKS_FP32 if dtype == torch.float32 else GPU_BLOCKS
        for kernel in KERNELS:
            first.append((kernel, dname, default, ""))
            for b in candidates(kernel, dtype)[1:]:
                variant = "persistent" if b.persistent else "tma" if b.tma else ""
                rest.append((kernel, dname, b, variant))
            if kernel in WGRAD:
                rest.append((kernel, dname, default, "split"))
            if kernel in ROW_TILED:
                rest.append((kernel, dname, default, "persistent"))
            if kernel in TMA_KERNELS:
                rest.append((kernel, dname, default, "tma"))
    out = first if defaults_only else first + rest
    return [(k, d, {f: v for f, v in asdict(b).items() if f not in ("persistent", "tma")}, var)
            for k, d, b, var in out]


def key(job) -> str:
    k, d, b, var = job
    return f"{k}|{d}|{b['block_m']}x{b['block_n']}x{b['block_k']}|w{b['num_warps']}|s{b['num_stages']}|{var}"


def main(argv=None) -> None:
    from moe.kernels.gemm_tiles import GemmBlocks
    from tests.moe.kernels.sm90_builds import usage

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON-lines file, appended to")
    ap.add_argument("--defaults-only", action="store_true")
    ap.add_argument("--worker", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--shape", default="aligned", choices=SHAPES, help="tests/moe/kernels/sm90_builds.py")
    args = ap.parse_args(argv)
    out = Path(args.out)
    done = set()
    if out.exists():
        done = {json.loads(line)["key"] for line in out.read_text().splitlines() if line.strip()}
    seen = set()
    mine = []
    for j in jobs(args.defaults_only):
        if key(j) not in seen:  # a candidate may repeat a default
            seen.add(key(j))
            mine.append(j)
    for j in mine[args.worker::args.workers]:
        if key(j) in done:
            continue
        kernel, dname, b, variant = j
        t0 = time.time()
        try:
            row = usage(kernel, DTYPES[dname], GemmBlocks(**b), variant, args.shape)
        except Exception as e:  # noqa: BLE001 - a build that does not compile is a finding, not a crash
            row = {"error": f"{type(e).__name__}: {str(e)[-300:]}"}
        row.update(key=key(j), shape=args.shape, kernel=kernel, dtype=dname, blocks=b, variant=variant,
                   seconds=round(time.time() - t0, 1))
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(row["key"], row.get("registers"), row.get("spills"), row.get("shared_bytes"), row.get("error", ""),
              flush=True)


if __name__ == "__main__":
    main()
