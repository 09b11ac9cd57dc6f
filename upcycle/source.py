"""What every reader returns (`DenseSource`), and `read_dense(path)`, which picks the reader for a path.

Sources:
  a Switchyard checkpoint directory   config.json with a "model" section + model.safetensors (moe.checkpoint)
  a Hugging Face model directory      config.json + model.safetensors / pytorch_model.bin (sharded or not)
  a GGUF file                         llama.cpp's single-file format (llama, qwen2, gemma, gemma2, gemma3, bloom)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from moe.config import ModelConfig
from moe.model import Transformer

if TYPE_CHECKING:
    import tokenizers


@dataclass
class DenseSource:
    config: ModelConfig  # the dense model, in our config (moe.layers="none")
    state: dict[str, Tensor]  # its weights in our names and layout (a tied head is absent), fp32
    tokenizer: Optional["tokenizers.Tokenizer"] = None  # the model's tokenizer, when the source carries one
    special_tokens: dict[str, Optional[str]] = field(default_factory=dict)  # bos_token, eos_token, unk/pad_token
    chat_template: Optional[str] = None  # the Jinja chat template the source ships, if any
    origin: str = ""  # e.g. "gguf llama (SmolLM2 135M)", "hf llama", "switchyard"
    notes: list[str] = field(default_factory=list)  # what the reader decided (dequantized types, clamps, ...)
    tokenizer_file: Optional[Path] = None  # a Switchyard tokenizer file to copy as it is (byte tokenizers)

    @property
    def eos_token(self) -> Optional[str]:
        return self.special_tokens.get("eos_token")

    def build_model(self) -> Transformer:
        """The dense Transformer with these weights, in eval mode."""
        if self.config.is_moe:
            raise ValueError("the source is already a sparse model; upcycling starts from a dense one")
        return model_from_state(self.config, self.state).eval()

    def tokenizer_config(self) -> dict[str, Any]:
        """The Hugging Face tokenizer_config.json fields we know (special tokens, chat template)."""
        out: dict[str, Any] = {k: v for k, v in self.special_tokens.items() if v is not None}
        if self.chat_template:
            out["chat_template"] = self.chat_template
        return out


def model_from_state(cfg: ModelConfig, state: dict[str, Tensor]) -> Transformer:
    """A dense Transformer holding `state`, built without the random initialisation it would overwrite."""
    from moe.model import rotary_tables

    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise ValueError(f"the state does not fit the config: missing {missing[:8]}, unexpected {unexpected[:8]}")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    if model.rotary is not None:  # buffers derived from the config, not part of the state
        model.rotary, model.rotary_local = rotary_tables(cfg)
    return model


def read_dense(path: str | Path, dtype: torch.dtype = torch.float32) -> DenseSource:
    """Reads a dense model from a Switchyard checkpoint directory, a Hugging Face directory or a .gguf file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"source={str(path)!r} does not exist; pass a Switchyard checkpoint directory, "
                                f"a Hugging Face model directory (config.json + weights) or a .gguf file")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            from upcycle.gguf_reader import read_gguf

            return read_gguf(path, dtype=dtype)
        raise ValueError(f"source={str(path)!r} is a file but not a GGUF file (it does not start with 'GGUF'); "
                         f"pass a .gguf file or a model directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: pass that file)" if ggufs else ""
        raise FileNotFoundError(f"{cfg_file} is missing: {path} is neither a Switchyard checkpoint nor a "
                                f"Hugging Face model directory{hint}")
    try:
        doc = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file} is not valid JSON ({e})") from None
    if isinstance(doc, dict) and "model" in doc and isinstance(doc["model"], dict):
        return read_switchyard(path)
    from upcycle.hf import read_hf

    return read_hf(path, dtype=dtype)


def read_switchyard(path: str | Path) -> DenseSource:
    """A Switchyard checkpoint directory (moe.checkpoint), with its tokenizer when it has one."""
    from moe.checkpoint import load_model, model_state

    path = Path(path)
    model = load_model(path)
    if model.cfg.is_moe:
        raise ValueError(f"{path} is already a sparse model (model.moe.layers={model.cfg.moe.layers!r}); "
                         f"upcycling starts from a dense checkpoint")
    src = DenseSource(config=model.cfg, state={k: v.float() for k, v in model_state(model).items()},
                      origin="switchyard")
    tok_file = path / "tokenizer.json"
    if tok_file.is_file():
        src.tokenizer_file = tok_file
        doc = json.loads(tok_file.read_text(encoding="utf-8"))
        if isinstance(doc, dict) and "model" in doc:
            import tokenizers

            src.tokenizer = tokenizers.Tokenizer.from_file(str(tok_file))
        side = path / "tokenizer_config.json"
        if side.is_file():
            tc = json.loads(side.read_text(encoding="utf-8"))
            src.special_tokens = {k: tc.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if tc.get(k)}
            src.chat_template = tc.get("chat_template")
    return src
