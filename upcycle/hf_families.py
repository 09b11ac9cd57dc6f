"""Hugging Face config.json readers of the Gemma, BLOOM and GPT-Neo families, and the refusal of encoders.

  gemma                 Gemma 1: embeddings x sqrt(d), RMSNorm with (1 + w), GeGLU (gelu_pytorch_tanh gate)
  gemma2                + post-attention and post-FFN norms, alternating local (sliding_window) and global blocks
                          (layer_types), soft-capped scores and logits, scores x query_pre_attn_scalar^-1/2
  gemma3_text           + QK-norm, a RoPE base per block kind (rope_parameters per layer type, or rope_theta and
                          rope_local_base_freq), linear RoPE scaling of the global blocks (4B+), no soft-capping
  gemma3                the multimodal Gemma3ForConditionalGeneration: its text model only (text_config, the
                          language_model.* tensors); the vision tower and projector are left out
  bloom                 ALiBi, LayerNorm on the embeddings, fused query_key_value interleaved per head
  gpt_neo               learned positions, alternating global/local blocks (attention_layers, window_size),
                          unscaled scores (GPT-Neo multiplies q.k by nothing), a bias on out_proj only

Encoders (BERT, RoBERTa, ...) and encoder-decoders (T5, BART, ...) attend bidirectionally or cross-attend:
Switchyard's blocks are causal decoder blocks, so they are out of scope and refused as such.
"""
from __future__ import annotations

from typing import Any, Optional

from moe.config import ModelConfig, MoEConfig

ENCODERS = ("bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
            "camembert", "mpnet", "modernbert", "nomic_bert", "ernie", "xlnet")
ENCODER_DECODERS = ("t5", "mt5", "umt5", "bart", "mbart", "pegasus", "marian", "led", "longt5", "prophetnet",
                    "whisper", "encoder-decoder", "t5gemma")


def check_decoder_only(c: dict, where: str, supported: list[str]) -> None:
    """Refuses encoder and encoder-decoder configs, saying that they are out of scope."""
    kind = c.get("model_type")
    archs = " ".join(c.get("architectures") or [])
    if c.get("is_encoder_decoder") or kind in ENCODER_DECODERS:
        raise ValueError(f"{where}: model_type={kind!r} is an encoder-decoder model; Switchyard upcycles decoder-only "
                         f"causal language models, so encoder-decoders are out of scope (supported: {supported})")
    if kind in ENCODERS or "MaskedLM" in archs:
        raise ValueError(f"{where}: model_type={kind!r} is an encoder (bidirectional attention, masked-LM "
                         f"pretraining); Switchyard upcycles decoder-only causal language models, so encoders are "
                         f"out of scope (supported: {supported})")


def _req(c: dict, where: str, *keys: str) -> Any:
    for key in keys:
        if c.get(key) is not None:
            return c[key]
    raise ValueError(f"{where}: config.json has no {keys[0]!r}, which a {c.get('model_type')} model needs")


def pattern_of(kinds: list[str]) -> str:
    """Per-block letters (G global, L local) -> the shortest cycle that spells them (model.attention_pattern)."""
    s = "".join(kinds)
    for p in range(1, len(s) + 1):
        if all(s[i] == s[i % p] for i in range(len(s))):
            return s[:p]
    return s


def rope_of(params: dict, default: float, where: str, what: str, linear_ok: bool = True) -> tuple[float, Optional[float]]:
    """(RoPE base, linear scaling factor or None) of one rope_parameters / rope_scaling dict."""
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "linear") or (kind == "linear" and not linear_ok):
        supported = "'default' (plain RoPE) and 'linear'" if linear_ok else "'default' (plain RoPE)"
        raise ValueError(f"{where}: RoPE type {kind!r} of {what} is not supported; supported: {supported}")
    factor = float(params["factor"]) if kind == "linear" else None
    return float(params.get("rope_theta") or default), (factor if factor != 1.0 else None)


def _gemma_rope(c: dict, where: str) -> tuple[float, Optional[float], Optional[float]]:
    """(global RoPE base, local base or None, the global blocks' linear factor or None) from transformers 5's
    per-layer-type rope_parameters or the older rope_theta / rope_local_base_freq / rope_scaling fields
    (rope_scaling applies to the global blocks, as transformers reads it)."""
    params = c.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        glob, factor = rope_of(params.get("full_attention") or {}, c.get("rope_theta") or 1e6, where, "full_attention")
        local, _ = rope_of(params.get("sliding_attention") or {}, c.get("rope_local_base_freq") or 1e4, where,
                           "sliding_attention", linear_ok=False)
        return glob, local, factor
    glob, factor = rope_of({**(c.get("rope_scaling") or {}), **params}, c.get("rope_theta") or 10000.0, where,
                           "the model")
    local = c.get("rope_local_base_freq")
    return glob, (float(local) if local is not None else None), factor


def gemma3_text_config(c: dict, where: str) -> dict:
    """The text model's config of a multimodal Gemma 3, completed with Gemma3TextConfig's defaults (the Hub's
    files spell out only what differs from them, e.g. hidden_size and rope_scaling)."""
    text = c.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"{where}: model_type='gemma3' needs a text_config (the language model's config)")
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is in the upcycle extra
        return {"model_type": "gemma3_text", **text}
    return transformers.Gemma3TextConfig(**{k: v for k, v in text.items() if k != "model_type"}).to_dict()


def _default_layer_types(c: dict, kind: str, n_layer: int) -> list[str]:
    """What transformers assumes when a config predates layer_types: Gemma 2 alternates local and global (local
    first), Gemma 3 repeats sliding_window_pattern - 1 local blocks and a global one (pattern 6), Gemma 1 is global."""
    period = {"gemma2": 2, "gemma3_text": int(c.get("sliding_window_pattern") or 6)}.get(kind)
    if period is None:
        return ["full_attention"] * n_layer
    return ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n_layer)]


def gemma_config(c: dict, where: str, activation) -> tuple[ModelConfig, list[str]]:
    """Gemma 1, 2 and 3 (text): `activation` maps a transformers activation name to ours."""
    kind = c.get("model_type")
    if c.get("use_bidirectional_attention"):
        raise ValueError(f"{where}: use_bidirectional_attention=true makes {kind} an encoder (EmbeddingGemma); "
                         f"encoders are out of scope, only causal decoders are read")
    d, heads = _req(c, where, "hidden_size"), _req(c, where, "num_attention_heads")
    head_dim = c.get("head_dim") or d // heads
    n_layer = _req(c, where, "num_hidden_layers")
    later = kind != "gemma"  # Gemma 2 and 3
    kinds = c.get("layer_types") or _default_layer_types(c, kind, n_layer)
    if len(kinds) != n_layer or set(kinds) - {"full_attention", "sliding_attention"}:
        raise ValueError(f"{where}: layer_types={kinds} must list full_attention or sliding_attention for each of "
                         f"the {n_layer} layers")
    pattern = pattern_of(["L" if k == "sliding_attention" else "G" for k in kinds])
    glob, local, factor = _gemma_rope(c, where)
    act_name = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    scalar = c.get("query_pre_attn_scalar")
    cfg = ModelConfig(
        vocab_size=_req(c, where, "vocab_size"), n_layer=n_layer, d_model=d, n_head=heads,
        n_kv_head=c.get("num_key_value_heads") or heads, head_dim=head_dim if head_dim * heads != d else None,
        d_ff=_req(c, where, "intermediate_size"), max_seq_len=_req(c, where, "max_position_embeddings"),
        activation=activation(act_name, where, "hidden_activation"), glu=True, norm="rmsnorm",
        norm_eps=float(c.get("rms_norm_eps", 1e-6)), position="rope", rope_theta=glob,
        attn_bias="all" if c.get("attention_bias") else "none", ffn_bias=False,
        tie_embeddings=bool(c.get("tie_word_embeddings", True)), embed_scale=True, norm_unit_offset=True,
        qk_norm=kind == "gemma3_text", post_norms=later, attention_pattern=pattern,
        sliding_window=c.get("sliding_window") if "L" in pattern else None,
        rope_local_theta=local if "L" in pattern and local is not None and local != glob else None,
        rope_linear_factor=factor,
        attn_scale=float(scalar) ** -0.5 if later and scalar is not None else None,
        attn_softcap=c.get("attn_logit_softcapping") if later else None,
        logit_softcap=c.get("final_logit_softcapping") if later else None,
        moe=MoEConfig(layers="none"),
    )
    return cfg, []


def bloom_config(c: dict, where: str) -> tuple[ModelConfig, list[str]]:
    if c.get("apply_residual_connection_post_layernorm"):
        raise ValueError(f"{where}: BLOOM with apply_residual_connection_post_layernorm=true (the residual taken "
                         f"after the norm) is not supported; Switchyard blocks add the branch to the un-normed input")
    d = _req(c, where, "hidden_size", "n_embed")
    notes: list[str] = []
    max_len = c.get("seq_length") or c.get("max_position_embeddings")
    if max_len is None:
        max_len = 2048
        notes.append("BLOOM's ALiBi has no position table, so config.json gives no length: max_seq_len is set to "
                     "2048, BLOOM's training length (change model.max_seq_len to go further)")
    cfg = ModelConfig(
        vocab_size=_req(c, where, "vocab_size"), n_layer=_req(c, where, "n_layer", "num_hidden_layers"), d_model=d,
        n_head=_req(c, where, "n_head", "num_attention_heads"), d_ff=4 * d, max_seq_len=int(max_len),
        activation="gelu_tanh", norm="layernorm", norm_eps=float(c.get("layer_norm_epsilon", 1e-5)),
        position="alibi", attn_bias="all", ffn_bias=True, embed_norm=True,
        tie_embeddings=bool(c.get("tie_word_embeddings", True)), moe=MoEConfig(layers="none"),
    )
    return cfg, notes


def gpt_neo_config(c: dict, where: str, activation) -> tuple[ModelConfig, list[str]]:
    d = _req(c, where, "hidden_size")
    n_layer = _req(c, where, "num_layers", "num_hidden_layers")
    layers = c.get("attention_layers")
    if layers is None:  # attention_types: [[["global", "local"], repeats], ...]
        layers = [kind for kinds, n in _req(c, where, "attention_types") for _ in range(n) for kind in kinds]
    if len(layers) != n_layer or set(layers) - {"global", "local"}:
        raise ValueError(f"{where}: attention_layers={layers} must list global or local for each of the {n_layer} "
                         f"layers (GPT-Neo's attention_types)")
    pattern = pattern_of(["L" if k == "local" else "G" for k in layers])
    cfg = ModelConfig(
        vocab_size=_req(c, where, "vocab_size"), n_layer=n_layer, d_model=d, n_head=_req(c, where, "num_heads"),
        d_ff=c.get("intermediate_size") or 4 * d, max_seq_len=_req(c, where, "max_position_embeddings"),
        activation=activation(c.get("activation_function", "gelu_new"), where, "activation_function"),
        norm="layernorm", norm_eps=float(c.get("layer_norm_epsilon", 1e-5)), position="learned",
        attn_bias="o", ffn_bias=True, tie_embeddings=bool(c.get("tie_word_embeddings", True)),
        attention_pattern=pattern, sliding_window=_req(c, where, "window_size") if "L" in pattern else None,
        attn_scale=1.0, moe=MoEConfig(layers="none"),
    )
    return cfg, []
