"""The trainer's state in a checkpoint, without pickle: optimizer moments, RNG states, counters.

Two files beside the weights: `trainer_state.safetensors` holds every tensor (the optimizer's per-parameter state,
the torch and CUDA generator states, numpy's Mersenne-Twister key) and `trainer_state.json` everything else (the
step counters, the optimizer's param groups and scalar state, Python's and numpy's RNG positions). Neither format
can run code when read, so a checkpoint from a colleague or a shared bucket is data, never a program. A directory
that holds only the pickled `trainer_state.pt` of older versions is refused rather than unpickled.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TENSORS_FILE = "trainer_state.safetensors"
JSON_FILE = "trainer_state.json"
STATE_FILES = (TENSORS_FILE, JSON_FILE)
LEGACY_FILE = "trainer_state.pt"  # pickled by versions before 0.2: never read
FORMAT = 1


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed (skipped ones included: their batches were consumed)
    tokens: int = 0  # training tokens consumed
    flops: float = 0.0  # cumulative training FLOPs (model FLOPs: 3x forward, see moe.flops)
    elapsed_s: float = 0.0  # seconds spent in training steps (evaluation and checkpointing excluded)
    loss_sum: float = 0.0  # LM loss summed since the last metrics record (carried across a resume)
    loss_count: int = 0  # steps in loss_sum
    skipped_steps: int = 0  # steps whose gradient norm was not finite: no update was applied
    skipped_in_a_row: int = 0  # the current run of such steps (trainer.max_skipped_steps bounds it)


def rng_state() -> dict[str, Any]:
    """Every generator a step draws from (dropout, router jitter, data order helpers)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_writers(optimizer: dict, state: TrainState, rng: dict[str, Any]) -> dict[str, Callable[[Path], None]]:
    """The two state files as {file name: writer(path)} for moe.checkpoint.save_checkpoint's `extra`.
    `optimizer` is an optimizer state_dict (torch's layout)."""
    tensors: dict[str, torch.Tensor] = {"rng/torch": rng["torch"]}
    for i, s in enumerate(rng.get("cuda", [])):
        tensors[f"rng/cuda/{i}"] = s
    name, key, pos, has_gauss, gauss = rng["numpy"]
    tensors["rng/numpy/key"] = torch.from_numpy(np.asarray(key, dtype=np.uint32).astype(np.int64))
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in optimizer["state"].items():
        for k, v in values.items():
            if torch.is_tensor(v):
                tensors[f"optimizer/{index}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[k] = v
    meta = {
        "format": FORMAT,
        "state": asdict(state),
        "optimizer": {"param_groups": optimizer["param_groups"], "scalars": scalars},
        "rng": {"python": _python_rng_to_json(rng["python"]),
                "numpy": {"name": name, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
                "cuda_devices": len(rng.get("cuda", []))},
    }
    return {TENSORS_FILE: lambda path: save_file(tensors, str(path)),
            JSON_FILE: lambda path: path.write_text(json.dumps(meta))}


def load_trainer_state(folder: Path, device: torch.device) -> tuple[dict, TrainState, dict[str, Any]]:
    """(optimizer state_dict, TrainState, RNG state) from a checkpoint folder; names the file that is wrong."""
    if not (folder / TENSORS_FILE).is_file() and (folder / LEGACY_FILE).is_file():
        raise ValueError(
            f"{folder / LEGACY_FILE} is a pickle (the trainer-state format of Switchyard before 0.2); reading it would "
            f"run whatever code it carries, so it is refused. Start a new run from these weights with "
            f"init_from={folder} (the optimizer state starts fresh), or resume it with the Switchyard version that "
            f"wrote it"
        )
    for name in STATE_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing; the checkpoint at {folder} is incomplete")
    try:
        tensors = load_file(str(folder / TENSORS_FILE))
    except Exception as e:  # safetensors raises its own types for truncated or foreign files
        raise ValueError(f"cannot read {folder / TENSORS_FILE}: {e}") from None
    try:
        meta = json.loads((folder / JSON_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
        state = TrainState(**{f.name: meta["state"][f.name] for f in fields(TrainState) if f.name in meta["state"]})
        groups, scalars = meta["optimizer"]["param_groups"], meta["optimizer"]["scalars"]
        py, npy = meta["rng"]["python"], meta["rng"]["numpy"]
        cuda_devices = meta["rng"]["cuda_devices"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"cannot read {folder / JSON_FILE} ({type(e).__name__}: {e}); the checkpoint is damaged") from None
    per_param: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in scalars.items()}
    for key, t in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "optimizer":
            index, _, name = rest.partition("/")
            # "step" stays on the CPU as torch keeps it (AdamW without capturable); moments go to the device
            per_param.setdefault(int(index), {})[name] = t if name == "step" else t.to(device)
    optimizer = {"state": dict(sorted(per_param.items())),
                 "param_groups": [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                                  for g in groups]}
    rng = {"torch": tensors["rng/torch"], "python": (py[0], tuple(py[1]), py[2]),
           "numpy": (npy["name"], tensors["rng/numpy/key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                     npy["cached_gaussian"])}
    if cuda_devices:
        rng["cuda"] = [tensors[f"rng/cuda/{i}"] for i in range(cuda_devices)]
    return optimizer, state, rng


def _python_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]
