"""Hugging Face model directories: config.json -> our ModelConfig, weights through a family key map.

Supported `model_type`s:
  gpt2                       Conv1D weights [in, out], fused c_attn split into q/k/v, gelu_new -> gelu_tanh,
                             learned positions, tied head
  opt                        ReLU, learned positions with offset 2, pre-LayerNorm only (do_layer_norm_before);
                             project_in/out (word_embed_proj_dim != hidden_size) is not supported
  llama, mistral, qwen2      RMSNorm, RoPE (default or linear), SwiGLU (our `up`=up_proj, `gate`=gate_proj,
  (SmolLM, SmolLM2: llama)   `down`=down_proj), grouped-query attention, Qwen2's q/k/v biases -> attn_bias="qkv"
  gemma, gemma2, gemma3_text, bloom, gpt_neo    see upcycle/hf_families.py
Encoders and encoder-decoders (BERT, T5, ...) are refused as out of scope (upcycle.hf_families.check_decoder_only).

Mistral / Qwen2 sliding-window attention: our attention is full causal attention. The two agree exactly for
sequences no longer than the window, so the window becomes the model's max_seq_len (the forward pass raises
beyond it) and the reader says so in its notes.

Weights: model.safetensors, pytorch_model.bin, or their sharded forms through *.index.json.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from moe.config import ModelConfig, MoEConfig
from upcycle.hf_families import (bloom_config, check_decoder_only, gemma3_text_config, gemma_config, gpt_neo_config,
                                 rope_of)
from upcycle.keymaps import GPT2, LLAMA, OPT, KeyMap, TensorSource, apply_keymap
from upcycle.keymaps_families import BLOOM, GEMMA2, GPT_NEO
from upcycle.source import DenseSource

SUPPORTED = ("gpt2", "opt", "llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "gemma3", "bloom",
             "gpt_neo")
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}


# ---------------------------------------------------------------------------------------------- weights


class HFWeights:
    """The tensors of a Hugging Face directory, read lazily from safetensors (or loaded once from .bin)."""

    def __init__(self, path: Path):
        self.path = path
        self._where: dict[str, Path] = {}
        self._bins: dict[Path, dict[str, Tensor]] = {}
        files = self._weight_files(path)
        for f in files:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        self._where[k] = f
            else:
                for k in self._load_bin(f):
                    self._where[k] = f

    @staticmethod
    def _weight_files(path: Path) -> list[Path]:
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / index).is_file():
                try:
                    weight_map = json.loads((path / index).read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path / index} is not a valid shard index ({e!r}); it needs a 'weight_map'") from None
                files = sorted({path / f for f in weight_map.values()})
                absent = [f.name for f in files if not f.is_file()]
                if absent:
                    raise FileNotFoundError(f"{path / index} names shard(s) that are missing: {absent}")
                return files
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (path / single).is_file():
                return [path / single]
        raise FileNotFoundError(
            f"{path} has a config.json but no weights: expected model.safetensors, pytorch_model.bin, or a sharded "
            f"model.safetensors.index.json / pytorch_model.bin.index.json"
        )

    def _load_bin(self, f: Path) -> dict[str, Tensor]:
        if f not in self._bins:
            try:
                self._bins[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ValueError(f"cannot read {f}: {e}") from None
        return self._bins[f]

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> Tensor:
        f = self._where[name]
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as h:
                return h.get_tensor(name)
        return self._load_bin(f)[name]


class TextPart:
    """The text model's tensors of a multimodal checkpoint: those under `prefix`, and its head (the Hub's
    language_model.lm_head.weight, or lm_head.weight) as lm_head.weight; the rest (vision) is hidden."""

    def __init__(self, weights: TensorSource, prefix: str):
        self._w = weights
        self._names = {k: k for k in weights.keys() if k.startswith(prefix)}
        for head in ("lm_head.weight", prefix.split(".")[0] + ".lm_head.weight"):
            if head in weights.keys():
                self._names["lm_head.weight"] = head
        self.left_out = len(weights.keys()) - len(self._names)

    def keys(self) -> list[str]:
        return list(self._names)

    def get(self, name: str) -> Tensor:
        return self._w.get(self._names[name])


# ---------------------------------------------------------------------------------------------- configs


def _get(cfg: dict, key: str, where: str, default: Any = ...) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is ...:
        raise ValueError(f"{where}: config.json has no {key!r}, which a {cfg.get('model_type')} model needs")
    return default


def _activation(name: str, where: str, field: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"{where}: {field}={name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _rope(c: dict, where: str) -> tuple[float, Optional[float]]:
    """(RoPE base, linear scaling factor or None) from rope_parameters (transformers 5) or rope_scaling."""
    params = {**(c.get("rope_scaling") or {}), **(c.get("rope_parameters") or {})}
    return rope_of(params, c.get("rope_theta") or 10000.0, where, "rope_parameters / rope_scaling")


def gpt2_config(c: dict, where: str) -> tuple[ModelConfig, list[str]]:
    for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False), ("scale_attn_weights", True)):
        if bool(c.get(key, ok)) != ok:
            raise ValueError(f"{where}: GPT-2 config {key}={c.get(key)} is not supported (only {key}={ok})")
    d = _get(c, "n_embd", where)
    cfg = ModelConfig(
        vocab_size=_get(c, "vocab_size", where), n_layer=_get(c, "n_layer", where), d_model=d,
        n_head=_get(c, "n_head", where), d_ff=c.get("n_inner") or 4 * d, max_seq_len=_get(c, "n_positions", where),
        activation=_activation(c.get("activation_function", "gelu_new"), where, "activation_function"),
        norm="layernorm", norm_eps=float(c.get("layer_norm_epsilon", 1e-5)), position="learned",
        attn_bias="all", ffn_bias=True, tie_embeddings=bool(c.get("tie_word_embeddings", True)),
        moe=MoEConfig(layers="none"),
    )
    return cfg, []


def opt_config(c: dict, where: str) -> tuple[ModelConfig, list[str]]:
    if not c.get("do_layer_norm_before", True):
        raise ValueError(f"{where}: OPT with do_layer_norm_before=false (post-LayerNorm, e.g. opt-350m) is not "
                         f"supported; Switchyard blocks are pre-LayerNorm (do_layer_norm_before=true)")
    d = _get(c, "hidden_size", where)
    if c.get("word_embed_proj_dim", d) != d:
        raise ValueError(f"{where}: OPT with word_embed_proj_dim={c['word_embed_proj_dim']} != hidden_size={d} "
                         f"(project_in/project_out layers) is not supported")
    if c.get("_remove_final_layer_norm", False) or not c.get("layer_norm_elementwise_affine", True):
        raise ValueError(f"{where}: OPT without a final or an affine LayerNorm is not supported "
                         f"(_remove_final_layer_norm must be false, layer_norm_elementwise_affine true)")
    bias = bool(c.get("enable_bias", True))
    cfg = ModelConfig(
        vocab_size=_get(c, "vocab_size", where), n_layer=_get(c, "num_hidden_layers", where), d_model=d,
        n_head=_get(c, "num_attention_heads", where), d_ff=_get(c, "ffn_dim", where),
        max_seq_len=_get(c, "max_position_embeddings", where),
        activation=_activation(c.get("activation_function", "relu"), where, "activation_function"),
        norm="layernorm", norm_eps=1e-5, position="learned", position_offset=2,
        attn_bias="all" if bias else "none", ffn_bias=bias, tie_embeddings=bool(c.get("tie_word_embeddings", True)),
        moe=MoEConfig(layers="none"),
    )
    return cfg, []


def llama_config(c: dict, where: str) -> tuple[ModelConfig, list[str]]:
    kind = c.get("model_type")
    notes: list[str] = []
    act = _activation(c.get("hidden_act", "silu"), where, "hidden_act")
    d, heads = _get(c, "hidden_size", where), _get(c, "num_attention_heads", where)
    head_dim = c.get("head_dim") or d // heads
    max_len = _get(c, "max_position_embeddings", where)
    window = c.get("sliding_window")
    uses_window = window is not None and (kind == "mistral" or c.get("use_sliding_window", False))
    if uses_window and window < max_len:
        notes.append(f"sliding_window={window}: our attention is full causal attention, which equals sliding-window "
                     f"attention for sequences of at most {window} tokens, so max_seq_len is set to {window}")
        max_len = window
    if kind == "qwen2":
        attn_bias = "qkv"  # Qwen2: biases on q/k/v, none on o
    else:
        attn_bias = "all" if c.get("attention_bias", False) else "none"
    theta, factor = _rope(c, where)
    cfg = ModelConfig(
        vocab_size=_get(c, "vocab_size", where), n_layer=_get(c, "num_hidden_layers", where), d_model=d,
        n_head=heads, n_kv_head=c.get("num_key_value_heads") or heads,
        head_dim=head_dim if head_dim != d // heads or d % heads else None,
        d_ff=_get(c, "intermediate_size", where), max_seq_len=max_len, activation=act, glu=True,
        norm="rmsnorm", norm_eps=float(c.get("rms_norm_eps", 1e-6)), position="rope", rope_theta=theta,
        rope_linear_factor=factor,
        attn_bias=attn_bias, ffn_bias=bool(c.get("mlp_bias", False)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)), moe=MoEConfig(layers="none"),
    )
    return cfg, notes


FAMILIES: dict[str, tuple[Any, KeyMap, tuple[str, ...]]] = {
    # model_type -> (config reader, key map, body prefixes to try: *ForCausalLM first, then the bare model)
    "gpt2": (gpt2_config, GPT2, ("transformer.", "")),
    "opt": (opt_config, OPT, ("model.", "")),
    "llama": (llama_config, LLAMA, ("model.", "")),
    "mistral": (llama_config, LLAMA, ("model.", "")),
    "qwen2": (llama_config, LLAMA, ("model.", "")),
    "gemma": (lambda c, w: gemma_config(c, w, _activation), LLAMA, ("model.", "")),
    "gemma2": (lambda c, w: gemma_config(c, w, _activation), GEMMA2, ("model.", "")),
    "gemma3_text": (lambda c, w: gemma_config(c, w, _activation), GEMMA2, ("model.", "")),
    # multimodal Gemma 3: the text model's tensors, under the Hub's or transformers 5's in-memory names
    "gemma3": (lambda c, w: gemma_config(gemma3_text_config(c, w), w, _activation), GEMMA2,
               ("language_model.model.", "model.language_model.")),
    "bloom": (bloom_config, BLOOM, ("transformer.", "")),
    "gpt_neo": (lambda c, w: gpt_neo_config(c, w, _activation), GPT_NEO, ("transformer.", "")),
}


# Fields by which a Hugging Face config says its FFNs are experts (Mixtral, Qwen2-MoE/OLMoE, DeepSeek, DBRX's
# ffn_config holds its own): named in the error, so a sparse model is refused as sparse, not as an unknown type.
MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def check_dense(c: dict, where: str) -> None:
    """Refuses a Mixture-of-Experts config, naming the field that says so."""
    kind = c.get("model_type")
    for key in MOE_FIELDS:
        n = c.get(key)
        if isinstance(n, int) and n > 1:
            raise ValueError(f"{where}: {key}={n} (model_type={kind!r}) is a sparse Mixture-of-Experts model; only "
                             f"dense models are read (supported model_type: {list(SUPPORTED)})")
    if isinstance(kind, str) and (kind.endswith("moe") or kind in ("mixtral", "dbrx", "deepseek_v2", "deepseek_v3")):
        raise ValueError(f"{where}: model_type={kind!r} is a sparse Mixture-of-Experts model; only dense models "
                         f"are read (supported model_type: {list(SUPPORTED)})")


def hf_model_config(c: dict, where: str = "config.json") -> tuple[ModelConfig, KeyMap, tuple[str, ...], list[str]]:
    kind = c.get("model_type")
    check_dense(c, where)
    check_decoder_only(c, where, list(SUPPORTED))
    if kind not in FAMILIES:
        raise ValueError(f"{where}: model_type={kind!r} is not supported; supported: {list(SUPPORTED)}")
    reader, keymap, prefixes = FAMILIES[kind]
    cfg, notes = reader(c, where)
    return cfg, keymap, prefixes, notes


# ---------------------------------------------------------------------------------------------- tokenizer


def _token_text(tok: Any) -> Optional[str]:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def hf_tokenizer(path: Path, c: dict) -> tuple[Any, dict[str, Optional[str]], Optional[str]]:
    """(tokenizers.Tokenizer or None, special tokens, chat template) from tokenizer.json, tokenizer_config.json and
    chat_template.jinja."""
    tok = None
    if (path / "tokenizer.json").is_file():
        import tokenizers

        tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    tc: dict = {}
    if (path / "tokenizer_config.json").is_file():
        tc = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    special = {k: _token_text(tc.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    if tok is not None and special.get("eos_token") is None:
        eos_id = c.get("eos_token_id")
        if isinstance(eos_id, list):
            eos_id = eos_id[0] if eos_id else None
        if eos_id is not None:
            special["eos_token"] = tok.id_to_token(int(eos_id))
    # transformers 5 writes the template to chat_template.jinja rather than into tokenizer_config.json
    jinja = path / "chat_template.jinja"
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else tc.get("chat_template")
    return tok, {k: v for k, v in special.items() if v is not None}, template


# ---------------------------------------------------------------------------------------------- reader


def read_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> DenseSource:
    path = Path(path)
    where = str(path / "config.json")
    c = json.loads((path / "config.json").read_text())
    cfg, keymap, prefixes, notes = hf_model_config(c, where)
    weights: TensorSource = HFWeights(path)
    keys = set(weights.keys())
    # Which prefix the body uses: the one under which the embedding is found.
    probe = keymap.rules[0].theirs
    prefix = next((p for p in prefixes if p + probe in keys), None)
    if prefix is None:
        raise ValueError(f"{path}: no tensor named {[p + probe for p in prefixes]}; these weights are not a "
                         f"{c.get('model_type')} checkpoint in the Hugging Face layout")
    if c.get("model_type") == "gemma3":  # the text model of a multimodal checkpoint
        weights = TextPart(weights, prefix)
        notes.append(f"multimodal Gemma 3: the text model is read; {weights.left_out} tensors of the vision tower "
                     f"and projector are left out")
    state = apply_keymap(keymap, weights, cfg, prefix=prefix, dtype=dtype, where=str(path))
    tok, special, template = hf_tokenizer(path, c)
    return DenseSource(config=cfg, state=state, tokenizer=tok, special_tokens=special, chat_template=template,
                       origin=f"hf {c.get('model_type')}", notes=notes)
