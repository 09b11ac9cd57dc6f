"""Tiny random Gemma 1/2/3, BLOOM and GPT-Neo models built with transformers (configs in code, no hub)."""
from __future__ import annotations

from pathlib import Path

import torch

from tests.upcycle.conftest import perturb

V, D, LAYERS, HEADS, FF, SEQ = 96, 32, 6, 4, 64, 64


def family_config(kind: str, **overrides):
    import transformers

    common = dict(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, max_position_embeddings=SEQ)
    if kind == "gemma":  # Gemma 1: no post-branch norms, no windows, no caps
        cfg = transformers.GemmaConfig(**common, num_key_value_heads=1, head_dim=16, pad_token_id=0,
                                       rope_parameters={"rope_type": "default", "rope_theta": 3000.0})
    elif kind == "gemma2":
        # head_dim 16 != D / HEADS, query_pre_attn_scalar != head_dim, caps small enough to bite on random weights
        cfg = transformers.Gemma2Config(**common, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                                        sliding_window=5, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                        rope_parameters={"rope_type": "default", "rope_theta": 2000.0},
                                        attention_dropout=0.0, pad_token_id=0)
    elif kind == "gemma3":
        cfg = transformers.Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                                            sliding_window=5, sliding_window_pattern=3,
                                            rope_theta=50000.0, rope_local_base_freq=500.0, pad_token_id=0)
    elif kind == "bloom":
        cfg = transformers.BloomConfig(vocab_size=V, hidden_size=D, n_layer=4, n_head=6 if D % 6 == 0 else 4,
                                       hidden_dropout=0.0, attention_dropout=0.0)
    elif kind == "gpt_neo":
        cfg = transformers.GPTNeoConfig(vocab_size=V, hidden_size=D, num_layers=4, num_heads=HEADS,
                                        attention_types=[[["global", "local"], 2]], window_size=5,
                                        max_position_embeddings=SEQ, intermediate_size=FF, resid_dropout=0.0,
                                        embed_dropout=0.0, attention_dropout=0.0)
    else:
        raise AssertionError(kind)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_family(kind: str, path: Path, seed: int = 0, **overrides):
    """A tiny random `kind` model (gemma, gemma2, gemma3, bloom, gpt_neo) saved to `path`; returns the transformers model
    in eval mode with the eager attention (the reference arithmetic)."""
    import transformers

    torch.manual_seed(seed)
    cfg = family_config(kind, **overrides)
    cls = {"gemma": transformers.GemmaForCausalLM, "gemma2": transformers.Gemma2ForCausalLM, "gemma3": transformers.Gemma3ForCausalLM,
           "bloom": transformers.BloomForCausalLM, "gpt_neo": transformers.GPTNeoForCausalLM}[kind]
    cfg._attn_implementation = "eager"
    model = perturb(cls(cfg), seed, std=0.2)
    model.save_pretrained(str(path))
    return model


# ----------------------------------------------------------------------------------------------- GGUF


def _gemma_names(i: int, arch: str) -> dict[str, str]:
    if arch == "gemma":  # Gemma 1's post_attention_layernorm is the norm before the FFN
        return {**_gemma_names(i, "gemma2"), f"model.layers.{i}.post_attention_layernorm.weight": f"blk.{i}.ffn_norm.weight"}
    return {f"model.layers.{i}.{ours}": f"blk.{i}.{theirs}" for ours, theirs in (
        ("input_layernorm.weight", "attn_norm.weight"), ("post_attention_layernorm.weight", "post_attention_norm.weight"),
        ("pre_feedforward_layernorm.weight", "ffn_norm.weight"), ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
        ("self_attn.q_proj.weight", "attn_q.weight"), ("self_attn.k_proj.weight", "attn_k.weight"),
        ("self_attn.v_proj.weight", "attn_v.weight"), ("self_attn.o_proj.weight", "attn_output.weight"),
        ("self_attn.q_norm.weight", "attn_q_norm.weight"), ("self_attn.k_norm.weight", "attn_k_norm.weight"),
        ("mlp.gate_proj.weight", "ffn_gate.weight"), ("mlp.up_proj.weight", "ffn_up.weight"),
        ("mlp.down_proj.weight", "ffn_down.weight"))}


def _bloom_tensors(sd: dict, c) -> dict[str, torch.Tensor]:
    """BLOOM as llama.cpp's converter writes it: query_key_value un-interleaved to q; k; v, the embedding twice."""
    H, d = c.n_head, c.hidden_size
    out = {"token_embd.weight": sd["transformer.word_embeddings.weight"],
           "output.weight": sd["transformer.word_embeddings.weight"]}
    for ours, theirs in (("word_embeddings_layernorm", "token_embd_norm"), ("ln_f", "output_norm")):
        for w in ("weight", "bias"):
            out[f"{theirs}.{w}"] = sd[f"transformer.{ours}.{w}"]
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        for w in ("weight", "bias"):
            qkv = sd[p + f"self_attention.query_key_value.{w}"]
            qkv = qkv.reshape(H, 3, d // H, *qkv.shape[1:])
            out[f"blk.{i}.attn_qkv.{w}"] = torch.cat([qkv[:, n].reshape(d, *qkv.shape[3:]) for n in range(3)])
            for ours, theirs in (("input_layernorm", "attn_norm"), ("self_attention.dense", "attn_output"),
                                 ("post_attention_layernorm", "ffn_norm"), ("mlp.dense_h_to_4h", "ffn_up"),
                                 ("mlp.dense_4h_to_h", "ffn_down")):
                out[f"blk.{i}.{theirs}.{w}"] = sd[p + f"{ours}.{w}"]
    return out


def write_family_gguf(path: Path, hf, arch: str, tokenizer: dict | None = None) -> None:
    """A GGUF of a transformers gemma / gemma2 / gemma3 / bloom model as llama.cpp's convert_hf_to_gguf writes it (Gemma's
    norm weights + 1, BLOOM's fused q/k/v un-interleaved); tokenizer: {"tokens", "scores", "types", ...}."""
    import gguf

    c = hf.config
    sd = {k: v.detach().float() for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    if arch == "bloom":
        w.add_context_length(SEQ)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.n_layer)
        w.add_feed_forward_length(4 * c.hidden_size)
        w.add_head_count(c.n_head)
        w.add_head_count_kv(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
        tensors = _bloom_tensors(sd, c)
    else:
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        if arch != "gemma":
            w.add_sliding_window(c.sliding_window)
        theta = c.rope_parameters["full_attention"]["rope_theta"] if arch == "gemma3" else c.rope_parameters["rope_theta"]
        w.add_rope_freq_base(float(theta))
        if arch == "gemma2":
            w.add_attn_logit_softcapping(c.attn_logit_softcapping)
            w.add_final_logit_softcapping(c.final_logit_softcapping)
        elif arch == "gemma3":  # llama.cpp's gemma3 defaults are a pattern of 6 and a local base of 1e4; a tiny model says its own
            w.add_sliding_window_pattern([k == "sliding_attention" for k in c.layer_types])
            w.add_rope_freq_base_swa(float(c.rope_parameters["sliding_attention"]["rope_theta"]))
            if c.rope_parameters["full_attention"].get("rope_type") == "linear":
                w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                w.add_rope_scaling_factor(float(c.rope_parameters["full_attention"]["factor"]))
        names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
        for i in range(c.num_hidden_layers):
            names.update(_gemma_names(i, arch))
        tensors = {gname: sd[hname] + (1.0 if gname.endswith("norm.weight") else 0.0)
                   for hname, gname in names.items() if hname in sd}
    if tokenizer is not None:
        w.add_tokenizer_model("llama")
        w.add_token_list(tokenizer["tokens"])
        w.add_token_scores(tokenizer["scores"])
        w.add_token_types(tokenizer["types"])
        w.add_add_space_prefix(tokenizer.get("add_space_prefix", False))
        w.add_bos_token_id(tokenizer.get("bos", 2))
        w.add_eos_token_id(tokenizer.get("eos", 1))
    for name, t in tensors.items():
        w.add_tensor(name, t.numpy().astype("float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
