"""python -m experiments.convert_checkpoint SRC DST [--to full|sharded]

Turns a sharded checkpoint (trainer=fsdp: `sharded/`, every rank's pieces) into the plain single-file one
(`model.safetensors`, optimizer moments in `trainer_state.safetensors`) for generate, export and upcycle, or a plain
one into a sharded one (to resume under trainer=fsdp with every rank reading only its own pieces). --to defaults to
the other layout. Everything else (config, tokenizer, counters, RNG) is copied; DST is written atomically with its
own manifest, and SRC is verified against its manifest first. Either layout resumes under every trainer at any
world size, so this is for the tools that read files, not for resuming.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from experiments.trainer_state import JSON_FILE, TENSORS_FILE, load_trainer_state, state_writers
from moe import sharded_checkpoint
from moe.checkpoint import WEIGHTS_FILE, read_metadata, write_atomically, write_folder
from moe.config import ModelConfig
from moe.manifest import MANIFEST_FILE, verify

LAYOUT_FILES = {WEIGHTS_FILE, TENSORS_FILE, JSON_FILE, MANIFEST_FILE, "config.json"}  # rewritten, not copied


def convert(src: str | Path, dst: str | Path, to: Optional[str] = None) -> Path:
    src, dst = Path(src), Path(dst)
    meta = read_metadata(src)
    verify(src)
    sharded = sharded_checkpoint.is_sharded(src)
    to = to or ("full" if sharded else "sharded")
    if to not in ("full", "sharded"):
        raise ValueError(f"--to {to!r} must be full or sharded")
    if (to == "sharded") == sharded:
        raise ValueError(f"{src} is already {to}; nothing to convert")
    if dst.exists():
        raise ValueError(f"{dst} exists; choose a new destination")
    optimizer, train, rng = load_trainer_state(src, torch.device("cpu"))
    if sharded:
        weights, moments = sharded_checkpoint.read_full(src / sharded_checkpoint.SHARDED_DIR)
        for i, values in moments.items():  # the scalars (e.g. step as plain numbers) came from trainer_state.json
            optimizer["state"].setdefault(i, {}).update(values)
    else:
        weights = load_file(str(src / WEIGHTS_FILE))
    cfg = ModelConfig.from_dict(meta["model"])
    extra_meta = {k: v for k, v in meta.items() if k != "model"}
    with write_atomically(dst) as tmp:
        for p in src.iterdir():  # the tokenizer and whatever else rides along
            if p.name not in LAYOUT_FILES and p.name != sharded_checkpoint.SHARDED_DIR:
                (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
        if to == "sharded":
            moments = {i: {k: v for k, v in s.items() if torch.is_tensor(v)} for i, s in optimizer["state"].items()}
            sharded_checkpoint.write(tmp / sharded_checkpoint.SHARDED_DIR, sharded_checkpoint.flat(weights, moments),
                                     single_writer=True)
            optimizer = {"state": {i: {k: v for k, v in s.items() if not torch.is_tensor(v)}
                                   for i, s in optimizer["state"].items()},
                         "param_groups": optimizer["param_groups"]}
            weights = None
        write_folder(tmp, cfg, weights, state_writers(optimizer, train, rng), extra_meta)
    return dst


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="a checkpoint folder (RUN_DIR/checkpoints/step_N)")
    ap.add_argument("dst", help="the new checkpoint folder (must not exist)")
    ap.add_argument("--to", choices=("full", "sharded"), default=None, help="target layout (default: the other one)")
    args = ap.parse_args(argv)
    out = convert(args.src, args.dst, args.to)
    print(f"wrote {out} ({'sharded' if sharded_checkpoint.is_sharded(out) else 'full'})")


if __name__ == "__main__":
    main()
