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
- switchyard_experts_ep_rank_XX.pt (expert parallelism): each expert-parallel rank's expert shards, concatenated
  in rank order to the full-size expert tensors (DeepSpeed's own module state holds only rank 0's shards);
- zero_pp_rank_*_optim_states.pt (ZeRO 1/2), only when the module state is bf16 (DeepSpeed's bf16 mode): the fp32
  master weights, reassembled by deepspeed.utils.zero_to_fp32 (no expert parallelism: DeepSpeed's tool does not
  know expert-data-parallel partitions).
DeepSpeed's per-expert files of its own MoE class (layer_*_expert_*_model_states.pt) belong to DeepSpeed's MoE
layers, not to this project's models, and are refused.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from experiments.deepspeed_engine import ENGINE_DIR, EXPERT_SHARD_FILE
from moe.checkpoint import load_config, save_checkpoint
from moe.config import ModelConfig
from moe.model import Transformer
from moe.parallel import full_shapes

MODEL_STATES = "mp_rank_00_model_states.pt"
PREFIX = "model."  # experiments.deepspeed_engine.EngineModule holds the Transformer as `model`


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


def _expert_shards(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Full-size expert tensors from the per-rank shard files (empty when there are none)."""
    files = sorted(tag_dir.glob(EXPERT_SHARD_FILE.replace("{ep_rank:02d}", "*")))
    if not files:
        return {}
    blobs = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    ep = blobs[0]["expert_parallel"]["ep_size"]
    ranks = sorted(b["expert_parallel"]["ep_rank"] for b in blobs)
    if ranks != list(range(ep)):
        raise ValueError(f"{tag_dir}: expert shard files of ranks {ranks} found, expected 0..{ep - 1}; the checkpoint "
                         f"is incomplete")
    blobs.sort(key=lambda b: b["expert_parallel"]["ep_rank"])
    return {k: torch.cat([b["module"][k] for b in blobs]) for k in blobs[0]["module"]}


def _fp32_from_zero(tag_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def convert(ds_checkpoint: str | Path, out_dir: str | Path, tag: Optional[str] = None, config: Optional[str] = None,
            tokenizer: Optional[str] = None) -> Path:
    """Writes the Switchyard checkpoint OUT_DIR from a DeepSpeed engine checkpoint; returns OUT_DIR."""
    tag_dir = resolve_tag_dir(ds_checkpoint, tag)
    if list(tag_dir.glob("layer_*_expert_*_model_states.pt")):
        raise ValueError(f"{tag_dir} holds per-expert files of DeepSpeed's own MoE layers; only checkpoints of "
                         f"Switchyard models (trainer=deepspeed) convert")
    states = torch.load(tag_dir / MODEL_STATES, map_location="cpu", weights_only=False)
    cfg = _model_config(states, config)
    module = states["module"]
    if not all(k.startswith(PREFIX) for k in module):
        raise ValueError(f"{tag_dir / MODEL_STATES}: module keys do not start with {PREFIX!r}; it was not written by "
                         f"experiments.deepspeed_engine")
    state = {k[len(PREFIX):]: v for k, v in module.items()}
    ep = (states.get("switchyard") or {}).get("expert_parallel", 1)
    if any(v.dtype != torch.float32 for v in state.values() if v.is_floating_point()):  # DeepSpeed's bf16 mode
        if ep > 1:
            raise ValueError(f"{tag_dir}: bf16 weights of an expert-parallel run (ep={ep}); their fp32 masters are "
                             f"partitioned over expert groups that DeepSpeed's zero_to_fp32 does not reassemble; use "
                             f"the run's own checkpoint (checkpoints/step_N) instead")
        fp32 = _fp32_from_zero(tag_dir)
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
        hint = " (expert shards of an expert-parallel run without its switchyard_experts_ep_rank_XX.pt files?)" \
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
