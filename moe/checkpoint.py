"""Model checkpoint directories: config.json + model.safetensors (+ whatever a trainer adds) + manifest.json; a
sharded checkpoint (moe.sharded_checkpoint) holds `sharded/` instead of model.safetensors, and reads the same way.

A checkpoint is written under a temporary name in the same parent directory and renamed into place (moe.atomic),
so a crash at any point leaves either the old checkpoint or the new one, never half of one. The manifest
(moe.manifest: sizes and SHA-256 of every file) is written last, inside the temporary folder, and readers verify
the files they load against it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

# commit and temporary_folder are re-exported: the checkpoint manager (experiments.checkpoints) and export write
# their folders with them, rank 0 making the folder the other ranks fill.
from moe.atomic import commit, temporary_folder, write_atomically
from moe.config import ModelConfig
from moe.manifest import verify, write_manifest
from moe.model import Transformer
from moe.parallel import full_shapes, full_state_dict, load_full_state_dict
from moe.sharded_checkpoint import is_sharded

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def model_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The state dict to save: tied weights stored once (safetensors refuses shared storage), experts at full size
    (an expert-parallel model's shards are gathered: a collective, every rank of the model must call it)."""
    state = {k: v.detach().contiguous() for k, v in full_state_dict(model).items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_checkpoint(
    path: str | Path,
    model: Transformer,
    extra: Optional[dict[str, Callable[[Path], None]]] = None,
    metadata: Optional[dict] = None,
    state: Optional[dict[str, torch.Tensor]] = None,
) -> Path:
    """Writes the checkpoint directory `path` atomically.

    extra: file name -> writer(path) for additional files (the trainer's state, a tokenizer).
    metadata: extra JSON stored beside the model config in config.json (e.g. the step, the data fingerprint).
    state: the tensors to write, model_state(model) when None (expert parallelism: gathered on every rank,
    written by one).
    """
    path = Path(path)
    with write_atomically(path) as tmp:
        write_folder(tmp, model.cfg, state if state is not None else model_state(model), extra, metadata)
    return path


def write_folder(folder: Path, cfg: ModelConfig, weights: Optional[dict[str, torch.Tensor]],
                 extra: Optional[dict[str, Callable[[Path], None]]] = None, metadata: Optional[dict] = None) -> None:
    """Fills a (temporary) checkpoint folder: config.json, model.safetensors unless weights is None (a sharded
    checkpoint's tensors are in folder/sharded already), the extra files, and last the manifest of them all."""
    (folder / CONFIG_FILE).write_text(json.dumps({"model": cfg.to_dict(), **(metadata or {})}, indent=2))
    if weights is not None:
        save_file(weights, str(folder / WEIGHTS_FILE))
    for name, writer in (extra or {}).items():
        writer(folder / name)
    write_manifest(folder)


def read_metadata(path: str | Path) -> dict:
    """config.json of a checkpoint directory, with a clear error when it is missing or unreadable."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist; pass a directory written by Switchyard")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} is missing: {path} is not a Switchyard checkpoint directory")
    verify(path, [CONFIG_FILE])
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file} is not valid JSON ({e}); the checkpoint is damaged") from None
    if "model" not in meta:
        raise ValueError(f"{cfg_file} has no 'model' section; it was not written by Switchyard")
    return meta


def load_config(path: str | Path) -> ModelConfig:
    return ModelConfig.from_dict(read_metadata(path)["model"])


def read_weights(model: Transformer, path: str | Path, verified: bool = False) -> dict[str, torch.Tensor]:
    """The full-size weights of a checkpoint (model.safetensors, or a sharded checkpoint read whole), checked
    against the model: every missing, unexpected or mis-shaped tensor is named. verified: the caller has just
    checked the whole folder against its manifest (a resume), so the files are not hashed a second time."""
    path = Path(path)
    expected = full_shapes(model)
    if is_sharded(path) and not (path / WEIGHTS_FILE).is_file():
        if not verified:
            verify(path)
        from moe.sharded_checkpoint import SHARDED_DIR, read_full

        return read_full(path / SHARDED_DIR, expected)[0]
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; the checkpoint at {path} is incomplete")
    if not verified:
        verify(path, [WEIGHTS_FILE])
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"cannot read {weights}: {e}") from None
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v)}"
              for k, v in expected.items() if k in state and state[k].shape != v]
    if missing or unexpected or shapes:
        raise ValueError(
            f"checkpoint {path} does not fit this model config: missing {missing[:8]}, unexpected {unexpected[:8]}, "
            f"shape mismatches {shapes[:8]}; load it with the config stored in its config.json"
        )
    return state


def load_weights(model: Transformer, path: str | Path) -> None:
    """Loads a checkpoint's weights (either layout) into model, possibly expert-sharded."""
    load_full_state_dict(model, read_weights(model, path), strict=False)  # lm_head.weight is tied to embed.weight


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> Transformer:
    """Builds a Transformer from a checkpoint's own config and loads its weights."""
    model = Transformer(load_config(path))
    load_weights(model, path)
    return model.to(map_location)


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "commit", "load_config", "load_model", "load_weights", "model_state",
           "read_metadata", "read_weights", "save_checkpoint", "temporary_folder", "write_atomically", "write_folder"]
