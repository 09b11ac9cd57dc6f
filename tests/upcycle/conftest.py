"""Tiny Hugging Face models built locally (config classes + random init, no hub), and a tiny GGUF writer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

TINY = dict(vocab=96, d=32, layers=4, heads=4, ff=64, seq=64)


def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Random init leaves biases at 0 and norm weights at 1, which would hide a mapping bug: nudge everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def make_hf(kind: str, path: Path, seed: int = 0, save_kwargs: dict | None = None, **overrides):
    """A tiny random `kind` model (gpt2, opt, llama, qwen2, mistral) saved to `path`; returns the HF model."""
    t = TINY
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=t["vocab"], n_positions=t["seq"], n_embd=t["d"], n_layer=t["layers"],
                                      n_head=t["heads"], n_inner=t["ff"], resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
        cls = transformers.GPT2LMHeadModel
    elif kind == "opt":
        cfg = transformers.OPTConfig(vocab_size=t["vocab"], hidden_size=t["d"], num_hidden_layers=t["layers"],
                                     ffn_dim=t["ff"], num_attention_heads=t["heads"], max_position_embeddings=t["seq"],
                                     word_embed_proj_dim=t["d"], dropout=0.0, attention_dropout=0.0, pad_token_id=1)
        cls = transformers.OPTForCausalLM
    elif kind in ("llama", "qwen2", "mistral"):
        config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                      "mistral": transformers.MistralConfig}[kind]
        extra = {"sliding_window": None} if kind == "mistral" else {}
        cfg = config_cls(vocab_size=t["vocab"], hidden_size=t["d"], intermediate_size=t["ff"],
                         num_hidden_layers=t["layers"], num_attention_heads=t["heads"], num_key_value_heads=2,
                         head_dim=t["d"] // t["heads"], max_position_embeddings=t["seq"], rms_norm_eps=1e-6,
                         rope_theta=50000.0, tie_word_embeddings=False, **extra)
        cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
               "mistral": transformers.MistralForCausalLM}[kind]
    else:
        raise AssertionError(kind)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = perturb(cls(cfg), seed)
    model.save_pretrained(str(path), **(save_kwargs or {}))
    return model


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def ids_for(vocab: int, length: int = 24, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- GGUF


def write_gguf(path: Path, hf_llama, quantize: tuple[str, ...] = ("blk.0.ffn_up.weight",), arch: str = "llama",
               tokenizer=None, drop: tuple[str, ...] = (), extra_tensors: dict | None = None,
               meta_overrides: dict | None = None, raw_types: dict | None = None) -> dict[str, np.ndarray]:
    """A tiny GGUF from an HF Llama model, as llama.cpp's converter writes it (Q/K rows permuted); tensors named in
    `quantize` are stored as Q8_0. Returns the float arrays that were written (the Q8_0 ones dequantized)."""
    gguf = pytest.importorskip("gguf")
    from upcycle.keymaps import llama_cpp_permute

    c = hf_llama.config
    w = gguf.GGUFWriter(str(path), arch)
    meta = {"context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
            "block_count": c.num_hidden_layers, "feed_forward_length": c.intermediate_size,
            "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
            "rope.freq_base": float(c.rope_parameters["rope_theta"]), "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps)}
    meta.update(meta_overrides or {})
    for key, value in meta.items():
        if value is None:
            continue
        full = f"{arch}.{key}"
        if isinstance(value, float):
            w.add_float32(full, value)
        else:
            w.add_uint32(full, int(value))
    if tokenizer is not None:
        tokens, merges, types, eos = tokenizer
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_merges(merges)
        w.add_token_types(types)
        w.add_eos_token_id(eos)
    sd = {k: v.detach().float() for k, v in hf_llama.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(c.num_hidden_layers):
        for ours, theirs in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
                             ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                             ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                             ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")):
            names[f"model.layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
            names[f"model.layers.{i}.{ours}.bias"] = f"blk.{i}.{theirs}.bias"  # Qwen2's q/k/v biases, when present
    written = {}
    for hf_name, name in names.items():
        if name in drop or hf_name not in sd:
            continue
        t = sd[hf_name]
        if name.endswith("attn_q.weight") and arch == "llama":  # llama.cpp permutes Q/K for llama only
            t = llama_cpp_permute(t, c.num_attention_heads)
        elif name.endswith("attn_k.weight") and arch == "llama":
            t = llama_cpp_permute(t, c.num_key_value_heads)
        arr = t.numpy().astype(np.float32)
        if name in quantize:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            written[name] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        elif raw_types and name in raw_types:
            qtype, data = raw_types[name]
            w.add_tensor(name, data, raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)
            written[name] = arr
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written
