"""Tiny random Gemma 2, Gemma 3, BLOOM and GPT-Neo models built with transformers (configs in code, no hub)."""
from __future__ import annotations

from pathlib import Path

import torch

from tests.upcycle.conftest import perturb

V, D, LAYERS, HEADS, FF, SEQ = 96, 32, 6, 4, 64, 64


def family_config(kind: str, **overrides):
    import transformers

    common = dict(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, max_position_embeddings=SEQ)
    if kind == "gemma2":
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
    """A tiny random `kind` model (gemma2, gemma3, bloom, gpt_neo) saved to `path`; returns the transformers model
    in eval mode with the eager attention (the reference arithmetic)."""
    import transformers

    torch.manual_seed(seed)
    cfg = family_config(kind, **overrides)
    cls = {"gemma2": transformers.Gemma2ForCausalLM, "gemma3": transformers.Gemma3ForCausalLM,
           "bloom": transformers.BloomForCausalLM, "gpt_neo": transformers.GPTNeoForCausalLM}[kind]
    cfg._attn_implementation = "eager"
    model = perturb(cls(cfg), seed, std=0.2)
    model.save_pretrained(str(path))
    return model
