"""Key maps of the Gemma, BLOOM and GPT-Neo families, for Hugging Face directories and llama.cpp's GGUF names
(the rule language is upcycle.keymaps').

Gemma blocks have four norms: attn_norm (input_layernorm), attn_post_norm (post_attention_layernorm),
ffn_norm (pre_feedforward_layernorm) and ffn_post_norm (post_feedforward_layernorm); Gemma 1 has two, in Llama's
names, so it reads with upcycle.keymaps.LLAMA. Gemma 3 adds q_norm and k_norm; their rules are skipped for
Gemma 2, whose config has no qk_norm. llama.cpp's converter adds 1 to every Gemma norm weight (its RMSNorm
multiplies by w, not by 1 + w), which `minus1` takes back; it does not permute Gemma's Q and K.
"""
from __future__ import annotations

from upcycle.keymaps import KeyMap, Rule, _linear_rules, _norm_rules, _r

_GEMMA_NORMS = (("attn_norm", "input_layernorm"), ("attn_post_norm", "post_attention_layernorm"),
                ("ffn_norm", "pre_feedforward_layernorm"), ("ffn_post_norm", "post_feedforward_layernorm"))

GEMMA2 = KeyMap(  # Gemma 2 and Gemma 3 text models (Gemma2ForCausalLM, Gemma3ForCausalLM)
    "gemma2",
    tuple(
        [_r("embed.weight", "embed_tokens.weight")]
        + [_r(f"blocks.{{i}}.{ours}.weight", f"layers.{{i}}.{theirs}.weight") for ours, theirs in _GEMMA_NORMS]
        + [rule for p in "qkvo" for rule in _linear_rules(f"blocks.{{i}}.attn.{p}_proj", f"layers.{{i}}.self_attn.{p}_proj")]
        + [_r(f"blocks.{{i}}.attn.{p}_norm.weight", f"layers.{{i}}.self_attn.{p}_norm.weight") for p in "qk"]
        + [_r(f"blocks.{{i}}.ffn.{ours}.weight", f"layers.{{i}}.mlp.{ours}_proj.weight") for ours in ("up", "gate", "down")]
        + [_r("norm.weight", "norm.weight"), _r("lm_head.weight", "lm_head.weight")]
    ),
)

def _bloom(family: str, names: dict[str, str], qkv_op: str) -> KeyMap:
    """BLOOM's layout under either naming: `names` maps our parts to theirs, `qkv_op` splits the fused q/k/v."""
    n = names
    return KeyMap(family, tuple(
        [_r("embed.weight", n["embed"] + ".weight")]
        + _norm_rules("embed_norm", n["embed_norm"])
        + _norm_rules("blocks.{i}.attn_norm", n["attn_norm"])
        + [_r(f"blocks.{{i}}.attn.{p}_proj.{w}", f"{n['qkv']}.{w}", f"{qkv_op}:{k}")
           for k, p in enumerate("qkv") for w in ("weight", "bias")]
        + [rule for ours in ("attn.o_proj", "ffn.up", "ffn.down") for rule in _linear_rules(f"blocks.{{i}}.{ours}", n[ours])]
        + _norm_rules("blocks.{i}.ffn_norm", n["ffn_norm"])
        + _norm_rules("norm", n["norm"])
        + [_r("lm_head.weight", n["head"])]
    ))


# BloomForCausalLM: fused query_key_value interleaved per head, LayerNorm on the embeddings
BLOOM = _bloom("bloom", {
    "embed": "word_embeddings", "embed_norm": "word_embeddings_layernorm", "attn_norm": "h.{i}.input_layernorm",
    "qkv": "h.{i}.self_attention.query_key_value", "attn.o_proj": "h.{i}.self_attention.dense",
    "ffn_norm": "h.{i}.post_attention_layernorm", "ffn.up": "h.{i}.mlp.dense_h_to_4h",
    "ffn.down": "h.{i}.mlp.dense_4h_to_h", "norm": "ln_f", "head": "lm_head.weight"}, "headthird")

GPT_NEO = KeyMap(  # GPTNeoForCausalLM: nn.Linear projections (not GPT-2's Conv1D), a bias on out_proj only
    "gpt_neo",
    tuple(
        [_r("embed.weight", "wte.weight"), _r("pos_embed.weight", "wpe.weight")]
        + _norm_rules("blocks.{i}.attn_norm", "h.{i}.ln_1")
        + [rule for p in "qkv" for rule in _linear_rules(f"blocks.{{i}}.attn.{p}_proj", f"h.{{i}}.attn.attention.{p}_proj")]
        + _linear_rules("blocks.{i}.attn.o_proj", "h.{i}.attn.attention.out_proj")
        + _norm_rules("blocks.{i}.ffn_norm", "h.{i}.ln_2")
        + _linear_rules("blocks.{i}.ffn.up", "h.{i}.mlp.c_fc")
        + _linear_rules("blocks.{i}.ffn.down", "h.{i}.mlp.c_proj")
        + _norm_rules("norm", "ln_f")
        + [_r("lm_head.weight", "lm_head.weight")]
    ),
    ignore=(r"h\.\d+\.attn\.attention\.(bias|masked_bias)",),  # the mask buffers older checkpoints saved
)


def _gguf_gemma(family: str, norms: tuple[tuple[str, str], ...]) -> KeyMap:
    rules: list[Rule] = [_r("embed.weight", "token_embd.weight")]
    rules += [_r(f"blocks.{{i}}.{ours}.weight", f"blk.{{i}}.{theirs}.weight", "minus1") for ours, theirs in norms]
    rules += [_r(f"blocks.{{i}}.attn.{p}_proj.weight", f"blk.{{i}}.attn_{q}.weight")
              for p, q in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output"))]
    rules += [_r(f"blocks.{{i}}.attn.{p}_norm.weight", f"blk.{{i}}.attn_{p}_norm.weight", "minus1") for p in "qk"]
    rules += [_r(f"blocks.{{i}}.ffn.{p}.weight", f"blk.{{i}}.ffn_{p}.weight") for p in ("up", "gate", "down")]
    rules += [_r("norm.weight", "output_norm.weight", "minus1"), _r("lm_head.weight", "output.weight")]
    return KeyMap(family, tuple(rules))


GGUF_GEMMA = _gguf_gemma("gguf gemma", (("attn_norm", "attn_norm"), ("ffn_norm", "ffn_norm")))
GGUF_GEMMA2 = _gguf_gemma("gguf gemma2", (("attn_norm", "attn_norm"), ("attn_post_norm", "post_attention_norm"),
                                          ("ffn_norm", "ffn_norm"), ("ffn_post_norm", "post_ffw_norm")))

# llama.cpp's bloom: attn_qkv holds q, k, v one after the other (the converter un-interleaves them)
GGUF_BLOOM = _bloom("gguf bloom", {
    "embed": "token_embd", "embed_norm": "token_embd_norm", "attn_norm": "blk.{i}.attn_norm", "qkv": "blk.{i}.attn_qkv",
    "attn.o_proj": "blk.{i}.attn_output", "ffn_norm": "blk.{i}.ffn_norm", "ffn.up": "blk.{i}.ffn_up",
    "ffn.down": "blk.{i}.ffn_down", "norm": "output_norm", "head": "output.weight"}, "third")
