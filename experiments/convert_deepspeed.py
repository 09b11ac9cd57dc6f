"""python -m experiments.convert_deepspeed DS_CHECKPOINT OUT_DIR [--tag TAG] [--config CKPT_OR_JSON] [--tokenizer FILE]

Turns a DeepSpeed engine checkpoint of a Switchyard model (engine.save_checkpoint, e.g. written by trainer=deepspeed
with deepspeed.engine_checkpoint=true to RUN_DIR/deepspeed/step_N) into a plain Switchyard model checkpoint:
OUT_DIR/config.json + model.safetensors (+ tokenizer.json: --tokenizer, or the run's own checkpoint of the same
step when the engine checkpoint sits in RUN_DIR/deepspeed/), written atomically, readable by every other tool
(init_from=, generate, upcycle, compare). The training state is not converted: resume=auto continues from the
trainer's own checkpoints (RUN_DIR/checkpoints/step_N), which trainer=deepspeed always writes.

What it reads (DS_CHECKPOINT is the directory holding `latest`, or one tag directory):
- mp_rank_00_model_states.pt: `module` (the engine's module: keys prefixed `model.`), and the client state
  "switchyard" with the model config (or --config for checkpoints without it);
- switchyard_experts_ep_rank_XX.safetensors (expert parallelism): each expert-parallel rank's expert shards,
  concatenated in rank order to the full-size expert tensors (DeepSpeed's own module state holds only rank 0's shards);
- *zero_pp_rank_*_optim_states.pt (ZeRO 1/2), only when the module state is bf16 (DeepSpeed's bf16 mode): the fp32
  master weights, each rank's flat partitions cut by the module state's param_shapes, as deepspeed.utils.zero_to_fp32
  does (no expert parallelism: expert-data-parallel partitions are not reassembled).
DeepSpeed's per-expert files of its own MoE class (layer_*_expert_*_model_states.pt) belong to DeepSpeed's MoE
layers, not to this project's models, and are refused.

Nothing is unpickled beyond plain data: DeepSpeed's .pt files are pickles, read with torch.load(weights_only=True)
and only the few DeepSpeed objects listed in DEEPSPEED_GLOBALS rebuilt, as plain values; a file that needs any other
global is refused (unpickling one could run code). DeepSpeed's own zero_to_fp32 unpickles everything, so it is not
used. Needs neither DeepSpeed nor a process group.
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
from safetensors import safe_open

from experiments.engines.deepspeed import ENGINE_DIR, EXPERT_SHARD_FILE, EXPERT_SHARD_META
from moe.checkpoint import load_config, save_checkpoint
from moe.config import ModelConfig
from moe.model import Transformer
from moe.parallel import full_shapes

MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")  # ZeRO 1/2; bf16 mode: bf16_
PREFIX = "model."  # experiments.engines.deepspeed.EngineModule holds the Transformer as `model`
# The only non-default globals in the files trainer=deepspeed writes (DeepSpeed 0.19: its module state needs none,
# its ZeRO 1/2 optimizer files these three). Each is plain data and is rebuilt as a plain value under its name, so
# no DeepSpeed class, nor anything else, is imported or called while a user's file is read; torch's weights_only
# defaults cover the rest (tensors, dict, OrderedDict, list, str, numbers, torch.Size).
DEEPSPEED_GLOBALS = [
    (int, "deepspeed.runtime.zero.config.ZeroStageEnum"),  # class ZeroStageEnum(int, Enum), pickled as Enum(stage)
    (SimpleNamespace, "deepspeed.utils.tensor_fragment.fragment_address"),  # a dataclass of two ints: numel, start
    (SimpleNamespace, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),  # its attributes: cur_scale, dynamic
]
REFUSED = ("needs arbitrary unpickling ({what}), which Switchyard refuses because unpickling it can run code; only "
           "DeepSpeed checkpoints written by trainer=deepspeed convert, and the run's own checkpoints "
           "(RUN_DIR/checkpoints/step_N) need no conversion")


def load_deepspeed_file(path: Path) -> dict:
    """One of DeepSpeed's .pt files, unpickled as plain data only: tensors, containers, numbers, strings and the
    DEEPSPEED_GLOBALS; a file that needs anything else raises ValueError naming it and the globals it needs."""
    allowed = [name for _, name in DEEPSPEED_GLOBALS]
    try:
        with torch.serialization.safe_globals(DEEPSPEED_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:  # lists the globals without unpickling anything; the error itself names only the first one
            unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
        except Exception:  # not a zip archive (torch's legacy format or a bare pickle): the error names the global
            unsafe = []
        first = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        what = (f"globals {', '.join(unsafe)}" if unsafe else f"global {first.group(1)}" if first
                else "objects other than tensors and plain data")
        raise ValueError(f"{path} {REFUSED.format(what=what)}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not the dict DeepSpeed's save_checkpoint writes; pass "
                         f"a checkpoint written by trainer=deepspeed")
    return obj


def resolve_tag_dir(path: str | Path, tag: Optional[str] = None) -> Path:
    """The tag directory holding mp_rank_00_model_states.pt: path itself, path/tag, or path/<contents of latest>."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist; pass the directory DeepSpeed's save_checkpoint wrote")
    if tag is None and (path / MODEL_STATES).is_file():
        return path
    if tag is None:
        if not (path / "latest").is_file():
            raise FileNotFoundError(f"{path} holds neither {MODEL_STATES} nor a `latest` file; pass a tag directory "
                                    f"or --tag TAG")
        tag = (path / "latest").read_text().strip()
    if not (path / tag / MODEL_STATES).is_file():
        raise FileNotFoundError(f"{path / tag / MODEL_STATES} is missing: not a DeepSpeed checkpoint of tag {tag!r}")
    return path / tag


def _model_config(states: dict, config: Optional[str]) -> ModelConfig:
    if config is not None:
        c = Path(config)
        if c.is_dir():
            return load_config(c)
        return ModelConfig.from_dict(json.loads(c.read_text())["model"])
    meta = states.get("switchyard")
    if not meta:
        raise ValueError("the checkpoint carries no Switchyard model config (client state 'switchyard'); pass "
                         "--config with a Switchyard checkpoint directory or config.json of the same model")
    return ModelConfig.from_dict(meta["model"])


def _read_shard(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """One EXPERT_SHARD_FILE: its metadata (ep_size, ep_rank, banks) and its tensors."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {}).get(EXPERT_SHARD_META, "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"cannot read {path}: {e}; it is not an expert shard file written by trainer=deepspeed") \
            from None
    if not isinstance(meta, dict) or not {"ep_size", "ep_rank"} <= meta.keys():
        raise ValueError(f"{path} lacks its expert-parallel metadata ({EXPERT_SHARD_META!r}: ep_size, ep_rank); it "
                         f"was not written by trainer=deepspeed")
    return meta, tensors


def _expert_shards(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Full-size expert tensors from the per-rank shard files (empty when there are none)."""
    files = sorted(tag_dir.glob(EXPERT_SHARD_FILE.replace("{ep_rank:02d}", "*")))
    legacy = sorted(tag_dir.glob("switchyard_experts_ep_rank_*.pt"))
    if legacy and not files:  # before safetensors the shards were pickles, which are no longer read
        raise ValueError(f"{legacy[0]} is an expert shard file of an older Switchyard (a pickle); use the run's own "
                         f"checkpoint of that step (RUN_DIR/checkpoints/{tag_dir.name}), which needs no conversion")
    if not files:
        return {}
    shards = sorted((_read_shard(f) for f in files), key=lambda s: s[0]["ep_rank"])
    ep = shards[0][0]["ep_size"]
    ranks = [meta["ep_rank"] for meta, _ in shards]
    if ranks != list(range(ep)):
        raise ValueError(f"{tag_dir}: expert shard files of ranks {ranks} found, expected 0..{ep - 1}; the checkpoint "
                         f"is incomplete")
    keys = shards[0][1].keys()
    if any(t.keys() != keys for _, t in shards):
        raise ValueError(f"{tag_dir}: the expert shard files hold different tensors; the checkpoint is damaged")
    return {k: torch.cat([t[k] for _, t in shards]) for k in keys}


def _fp32_from_zero(tag_dir: Path, states: dict) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a ZeRO 1/2 checkpoint: every parameter group's flat partitions concatenated in
    rank order, cut in the order of the module state's param_shapes (skipping DeepSpeed's alignment padding), the
    layout deepspeed.utils.zero_to_fp32 reads; its tool unpickles arbitrary objects, so the files are read here."""
    files = {int(m.group(1)): f for f in tag_dir.iterdir() if (m := OPTIM_STATES.fullmatch(f.name))}
    if not files:
        raise FileNotFoundError(f"{tag_dir} holds bf16 weights but no zero_pp_rank_N_mp_rank_00_optim_states.pt files "
                                f"with their fp32 masters; copy the whole tag directory, or use the run's own "
                                f"checkpoint (checkpoints/step_N)")
    optim = [load_deepspeed_file(files[r]).get("optimizer_state_dict") or {} for r in sorted(files)]
    counts = optim[0].get("partition_count")
    world = max(counts) if isinstance(counts, list) else counts
    if sorted(files) != list(range(world or 0)) or optim[0].get("zero_stage") not in (1, 2):
        raise ValueError(f"{tag_dir}: optimizer files of ranks {sorted(files)} found, expected the ZeRO 1/2 "
                         f"partitions of ranks 0..{(world or 0) - 1}; the checkpoint is incomplete or not ZeRO 1/2")
    paddings = optim[0].get("param_alignment_paddings")  # may be absent: then none, as zero_to_fp32 reads it
    if not isinstance(states.get("param_shapes"), list):
        raise ValueError(f"{tag_dir / MODEL_STATES} lacks DeepSpeed's param_shapes, which place the fp32 masters; "
                         f"it was not written by DeepSpeed's save_checkpoint")
    out = {}
    for i, shapes in enumerate(states["param_shapes"]):
        flat = torch.cat([o["single_partition_of_fp32_groups"][i] for o in optim])
        offset = 0
        for j, (name, shape) in enumerate(shapes.items()):
            out[name] = flat.narrow(0, offset, math.prod(shape)).view(tuple(shape))
            offset += math.prod(shape) + (paddings[i][j] if paddings else 0)
        align = 2 * world  # ZeRO pads every group to a multiple of 2 x world size
        if math.ceil(offset / align) != math.ceil(flat.numel() / align):
            raise ValueError(f"{tag_dir}: parameter group {i} holds {flat.numel()} fp32 values, its param_shapes "
                             f"{offset}; the optimizer files do not belong to {MODEL_STATES}")
    for name, source in (states.get("shared_params") or {}).items():  # tied weights: stored once, under source
        if source in out:
            out[name] = out[source]
    return out


def convert(ds_checkpoint: str | Path, out_dir: str | Path, tag: Optional[str] = None, config: Optional[str] = None,
            tokenizer: Optional[str] = None) -> Path:
    """Writes the Switchyard checkpoint OUT_DIR from a DeepSpeed engine checkpoint; returns OUT_DIR."""
    tag_dir = resolve_tag_dir(ds_checkpoint, tag)
    if list(tag_dir.glob("layer_*_expert_*_model_states.pt")):
        raise ValueError(f"{tag_dir} holds per-expert files of DeepSpeed's own MoE layers; only checkpoints of "
                         f"Switchyard models (trainer=deepspeed) convert")
    states = load_deepspeed_file(tag_dir / MODEL_STATES)
    cfg = _model_config(states, config)
    module = states.get("module")
    if not isinstance(module, dict) or not module or not all(k.startswith(PREFIX) and isinstance(v, torch.Tensor)
                                                             for k, v in module.items()):
        raise ValueError(f"{tag_dir / MODEL_STATES}: the module state is not tensors under keys starting with "
                         f"{PREFIX!r}; it was not written by experiments.engines.deepspeed")
    state = {k[len(PREFIX):]: v for k, v in module.items()}
    ep = (states.get("switchyard") or {}).get("expert_parallel", 1)
    if any(v.dtype != torch.float32 for v in state.values() if v.is_floating_point()):  # DeepSpeed's bf16 mode
        if ep > 1:
            raise ValueError(f"{tag_dir}: bf16 weights of an expert-parallel run (ep={ep}); their fp32 masters are "
                             f"partitioned over expert groups that DeepSpeed's zero_to_fp32 does not reassemble; use "
                             f"the run's own checkpoint (checkpoints/step_N) instead")
        fp32 = _fp32_from_zero(tag_dir, states)
        state.update({k[len(PREFIX):]: v for k, v in fp32.items() if k.startswith(PREFIX)})
    for k, v in _expert_shards(tag_dir).items():
        state[k[len(PREFIX):]] = v
    with torch.device("meta"):
        model = Transformer(cfg)  # shapes and config only; no memory
    expected = full_shapes(model)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v)}" for k, v in expected.items() if k in state
             and state[k].shape != v]
    if missing or unexpected or wrong:
        shard_files = EXPERT_SHARD_FILE.format(ep_rank=0).replace("00", "XX")
        hint = f" (expert shards of an expert-parallel run without its {shard_files} files?)" \
            if wrong else ""
        raise ValueError(f"{tag_dir} does not fit the model config: missing {missing[:8]}, unexpected "
                         f"{unexpected[:8]}, shape mismatches {wrong[:8]}{hint}")
    state = {k: v.detach().float().contiguous() for k, v in state.items()}
    meta = {"converted_from": str(tag_dir), "step": (states.get("switchyard") or {}).get("step",
                                                                                       states.get("global_steps"))}
    extra = {}
    sibling = tag_dir.parent.parent / "checkpoints" / tag_dir.name / "tokenizer.json"  # RUN_DIR/deepspeed/step_N
    if tokenizer is None and tag_dir.parent.name == ENGINE_DIR and sibling.is_file():
        tokenizer = str(sibling)  # the run's own checkpoint of the same step has the tokenizer
    if tokenizer is not None:
        extra["tokenizer.json"] = lambda p: shutil.copyfile(tokenizer, p)
    return save_checkpoint(Path(out_dir), model, extra=extra, metadata=meta, state=state)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                     prog="python -m experiments.convert_deepspeed")
    parser.add_argument("ds_checkpoint", help="DeepSpeed checkpoint directory (holding `latest`) or one tag directory")
    parser.add_argument("out_dir", help="the Switchyard checkpoint directory to write")
    parser.add_argument("--tag", default=None, help="the tag to convert (default: the one named in `latest`)")
    parser.add_argument("--config", default=None,
                        help="a Switchyard checkpoint directory or config.json with the model config, for "
                             "checkpoints that do not carry it")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json to copy beside the weights")
    args = parser.parse_args(argv)
    try:
        out = convert(args.ds_checkpoint, args.out_dir, args.tag, args.config, args.tokenizer)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
