"""python -m experiments.convert source=PATH out=DIR [eos_token=null]

Turns a dense released model, a Hugging Face model directory (llama, mistral, qwen2, gpt2, opt) or a GGUF file
(llama, qwen2), into a Switchyard checkpoint with the model's own tokenizer, unchanged: the same dense network,
so its logits equal the source's. It is the Sparse Upcycling baseline's starting point (continue training the
dense model), and a dense checkpoint `experiments.upcycle` or `compare` can take like any other:

    DIR/config.json            {"model": ..., "source": {"path", "origin", "notes"}}
    DIR/model.safetensors      fp32 weights (a bf16/fp16 source upcasts exactly; a quantized GGUF is dequantized)
    DIR/tokenizer.json         the source's tokenizer (tokenizers format), when it has one
    DIR/tokenizer_config.json  its special tokens (eos_token: what `load_tokenizer` uses as end-of-text)
    DIR/manifest.json

Reading reuses upcycle's readers (upcycle.read_dense: upcycle/hf.py, upcycle/gguf_reader.py) and writing the
upcycle app's tokenizer files, so the two apps agree on what a source means. DIR is written in one rename
(moe.checkpoint.save_checkpoint) and only after the whole source was read; a bad source writes nothing.

Continue training densely:  python -m experiments.train init_from=DIR data=... trainer.seq_len=256 ...
(the corpus is tokenized with DIR's tokenizer; see experiments/upcycle.py for the schedule choices).

`load_source(path)` is the same reading for other apps (evaluate): any of the sources above, or a Switchyard
checkpoint directory (dense or sparse, either layout), as (model, tokenizer).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from omegaconf import DictConfig

from experiments.app_options import check_options, exits_on_config_error, resolved
from experiments.hydra_conf import CONFIG_DIR
from experiments.tokenizer import BPETokenizer, EOS_TOKEN, PretrainedTokenizer, Tokenizer, load_tokenizer
from moe.model import Transformer

APP_KEYS = ("source", "out", "eos_token")


def is_switchyard_checkpoint(path: Path) -> bool:
    """A directory whose config.json has a "model" section: what moe.checkpoint writes (a Hugging Face config
    never has one)."""
    cfg_file = path / "config.json"
    if not (path.is_dir() and cfg_file.is_file()):
        return False
    try:
        doc = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # the readers name the damage
    return isinstance(doc, dict) and isinstance(doc.get("model"), dict)


def source_tokenizer(src, eos_token: Optional[str] = None) -> Optional[Tokenizer]:
    """Our tokenizer object for a DenseSource's `tokenizers.Tokenizer` (None when the source carries none): the
    class `load_tokenizer` returns for the files `tokenizer_writers` writes, so in memory and on disk agree."""
    if src.tokenizer is None:
        return None
    eos = eos_token or src.eos_token
    if eos:
        _check_eos(src, eos)
        return PretrainedTokenizer(src.tokenizer, {**src.tokenizer_config(), "eos_token": eos})
    if src.tokenizer.token_to_id(EOS_TOKEN) is not None:
        return BPETokenizer(src.tokenizer)
    raise ValueError(f"the tokenizer of {src.origin or 'the source'} names no end-of-text token (no eos_token in "
                     f"tokenizer_config.json, no eos_token_id in config.json, no tokenizer.ggml.eos_token_id) and has "
                     f"no {EOS_TOKEN}; pass eos_token=TOKEN (a token of its vocabulary)")


def _check_eos(src, eos: str) -> None:
    if src.tokenizer.token_to_id(eos) is None:
        raise ValueError(f"eos_token={eos!r} is not a token of the source's tokenizer; name one of its vocabulary")


def load_source(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Transformer, Optional[Tokenizer]]:
    """(model in eval mode on the CPU, its tokenizer or None) from a Switchyard checkpoint directory (dense or
    sparse, full or sharded layout; tokenizer.json beside it), a dense Hugging Face model directory or a GGUF file.

    dtype: the parameters' dtype (weights are read in fp32 and cast once; buffers such as RoPE's stay fp32).
    """
    path = Path(path).expanduser()
    if is_switchyard_checkpoint(path):
        from moe.checkpoint import load_model

        model = load_model(path)
        tok = load_tokenizer(path) if (path / "tokenizer.json").is_file() else None
    else:
        from upcycle import read_dense

        src = read_dense(path)
        model = src.build_model()
        tok = source_tokenizer(src)
    return cast_parameters(model, dtype).eval(), tok


def cast_parameters(model: Transformer, dtype: torch.dtype) -> Transformer:
    """The parameters in dtype; buffers stay as built (RoPE's inverse frequencies in fp32: the forward rotates in
    fp32, and bf16 frequencies would shift every position's angle). Tied weights stay one tensor."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(dtype)
    return model


def run_convert(opts: dict[str, Any]) -> dict[str, Any]:
    """The app without Hydra: opts holds the keys of conf/convert.yaml."""
    from moe.checkpoint import save_checkpoint
    from moe.flops import count_params
    from upcycle import read_dense
    from experiments.upcycle import tokenizer_writers

    check_options("convert", opts, APP_KEYS, ("source", "out"), "python -m experiments.convert source=PATH out=DIR")
    source = Path(opts["source"]).expanduser()
    out = Path(opts["out"]).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "model.safetensors").is_file())):
        raise ValueError(f"out={str(out)!r} exists and is not a Switchyard checkpoint; choose a new directory")
    if is_switchyard_checkpoint(source):
        raise ValueError(f"source={str(source)!r} is already a Switchyard checkpoint ({source / 'config.json'} has a "
                         f"'model' section); use it as it is: init_from={source}")

    t0 = time.perf_counter()
    src = read_dense(source)
    model = src.build_model()  # a sparse source was refused by its reader
    if opts.get("eos_token"):
        if src.tokenizer is None:
            raise ValueError(f"eos_token={opts['eos_token']!r} was given but {source} carries no tokenizer")
        _check_eos(src, opts["eos_token"])
        src.special_tokens["eos_token"] = opts["eos_token"]
    source_tokenizer(src)  # refuses a tokenizer without an end-of-text token before anything is written
    t1 = time.perf_counter()
    meta = {"source": {"path": str(source), "origin": src.origin, "notes": src.notes}}
    save_checkpoint(out, model, extra=tokenizer_writers(src), metadata=meta)
    cfg, params = model.cfg, count_params(model.cfg)
    lines = [f"source: {src.origin} ({source}), read in {t1 - t0:.1f}s"]
    lines += [f"  note: {n}" for n in src.notes]
    lines.append(f"dense: {cfg.n_layer} layers, d={cfg.d_model}, d_ff={cfg.d_ff}, vocab {cfg.vocab_size}, "
                 f"{params.total:,} parameters")
    lines.append(f"wrote {out}" + ("" if (out / "tokenizer.json").is_file() else " (no tokenizer: the source has none)"))
    text = "\n".join(lines)
    print(text)
    return {"out": str(out), "config": cfg, "origin": src.origin, "text": text}


@hydra.main(config_path=CONFIG_DIR, config_name="convert", version_base="1.3")
@exits_on_config_error("convert")
def main(cfg: DictConfig) -> None:
    run_convert(resolved(cfg, "python -m experiments.convert source=PATH out=DIR"))


if __name__ == "__main__":
    main()
