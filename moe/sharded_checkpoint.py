"""Sharded checkpoints: the tensors of a checkpoint written by every rank in pieces (torch.distributed.checkpoint,
DCP), read back at any world size and expert-parallel degree, including one process.

A checkpoint folder (moe.checkpoint) holds the sharded tensors under `sharded/`: DCP's `.metadata` (the global
shape of every tensor and which file holds which piece) and one `__R_0.distcp` file per rank. The keys are those
of the plain layout: "model/<state-dict key>" for the weights at full size (experts [E, ...] whatever the
expert-parallel degree; a tied lm_head left out) and "optimizer/<parameter index>/<key>" for the optimizer state,
as in trainer_state.safetensors. Every file is listed in the checkpoint's manifest like any other; DCP files hold
tensors and their byte ranges, and are read with weights_only semantics (no code runs on load).
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

SHARDED_DIR = "sharded"  # inside a checkpoint folder
METADATA_FILE = ".metadata"  # DCP's index of the shards
WEIGHT, MOMENT = "model/", "optimizer/"


def is_sharded(path: str | Path) -> bool:
    return (Path(path) / SHARDED_DIR / METADATA_FILE).is_file()


def tensor_shapes(folder: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Every tensor of a sharded folder: key -> (global shape, dtype), from DCP's metadata; a missing shard file
    (one rank's write lost or not copied) is named here, before anything is read."""
    if not (folder / METADATA_FILE).is_file():
        raise FileNotFoundError(f"{folder / METADATA_FILE} is missing: {folder} is not a complete sharded checkpoint")
    meta = FileSystemReader(str(folder)).read_metadata()
    files = sorted({info.relative_path for info in (meta.storage_data or {}).values()})
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"sharded checkpoint {folder} is missing its shard files {missing} (written by "
                                f"other ranks); copy the whole folder, or resume from another checkpoint")
    return {k: (v.size, v.properties.dtype) for k, v in meta.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def write(folder: Path, tensors: dict[str, Tensor], single_writer: bool = False) -> None:
    """Every rank writes its pieces of `tensors` (DTensors: their local shards; plain tensors: once) to folder.
    A collective unless single_writer (one process writing whole tensors, e.g. the converter)."""
    with _one_process(single_writer):
        dcp.save(tensors, checkpoint_id=str(folder), no_dist=single_writer)


def read_into(folder: Path, tensors: dict[str, Tensor]) -> None:
    """Loads the pieces each target needs into it, in place (DTensors read only their own shard: resharding on
    load). Every key must be in the checkpoint; a collective when the targets are DTensors."""
    available = tensor_shapes(folder)
    missing = sorted(set(tensors) - set(available))
    if missing:
        raise ValueError(f"sharded checkpoint {folder} lacks {missing[:8]}; it was written for another model or "
                         f"optimizer")
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(available[k][0]):
            raise ValueError(f"sharded checkpoint {folder}: {k} has shape {tuple(available[k][0])}, this model "
                             f"needs {tuple(t.shape)}; load it with the config stored in its config.json")
    alone = not _any_dtensor(tensors)
    with _one_process(alone):
        dcp.load(tensors, checkpoint_id=str(folder), no_dist=alone)


def read_full(folder: Path, expected: Optional[dict[str, torch.Size]] = None
              ) -> tuple[dict[str, Tensor], dict[int, dict[str, Tensor]]]:
    """(full-size weights, optimizer state by parameter index) of a sharded folder, read whole by this process
    alone (no collective). expected: the model's full shapes (moe.parallel.full_shapes), checked key by key."""
    shapes = tensor_shapes(folder)
    tensors = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in shapes.items()}
    if expected is not None:
        have = {k[len(WEIGHT):]: v[0] for k, v in shapes.items() if k.startswith(WEIGHT)}
        missing, unexpected = sorted(set(expected) - set(have)), sorted(set(have) - set(expected))
        bad = [f"{k}: checkpoint {tuple(have[k])} vs model {tuple(v)}" for k, v in expected.items()
               if k in have and tuple(have[k]) != tuple(v)]
        if missing or unexpected or bad:
            raise ValueError(f"sharded checkpoint {folder} does not fit this model config: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}, shape mismatches {bad[:8]}; load it with the config "
                             f"stored in its config.json")
    with _one_process(True):
        dcp.load(tensors, checkpoint_id=str(folder), no_dist=True)
    weights = {k[len(WEIGHT):]: t for k, t in tensors.items() if k.startswith(WEIGHT)}
    moments: dict[int, dict[str, Tensor]] = {}
    for k, t in tensors.items():
        if k.startswith(MOMENT):
            index, _, name = k[len(MOMENT):].partition("/")
            moments.setdefault(int(index), {})[name] = t
    return weights, dict(sorted(moments.items()))


def flat(weights: dict[str, Tensor], moments: dict[int, dict[str, Tensor]]) -> dict[str, Tensor]:
    """The keys a sharded folder holds, from weights and per-parameter optimizer state."""
    out = {WEIGHT + k: v for k, v in weights.items()}
    for i, values in moments.items():
        for k, v in values.items():
            if torch.is_tensor(v):
                out[f"{MOMENT}{i}/{k}"] = v
    return out


def _any_dtensor(tensors: dict[str, Tensor]) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for t in tensors.values())


@contextlib.contextmanager
def _one_process(alone: bool) -> Iterator[None]:
    """DCP warns that it 'assumes' a single process even when told so (no_dist=True): that is the intent here."""
    with warnings.catch_warnings():
        if alone:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
