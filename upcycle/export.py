"""Export to Hugging Face checkpoints (config.json + model.safetensors [+ tokenizer files]).

  an MoE of the Llama family       -> MixtralForCausalLM
  a dense model of the Llama family -> LlamaForCausalLM (Qwen2ForCausalLM when it has Qwen2's q/k/v biases)
  a dense GPT-2-shaped model        -> GPT2LMHeadModel

Mixtral's router (transformers 5.x, MixtralTopKRouter): softmax over all E logits, top-k, then the k chosen
probabilities renormalised to sum to 1. That equals our `topk_softmax` (softmax over the k chosen logits) and
our renormalised `softmax_topk`, up to round-off; it is dropless and has no routed scaling, so the exporter
requires a dropless topk router with scale 1. Experts are written in the layout every Mixtral loader reads,
`model.layers.N.block_sparse_moe.experts.J.w1/w2/w3.weight` (w1 = gate_proj [f, d], w3 = up_proj [f, d],
w2 = down_proj [d, f]) and `block_sparse_moe.gate.weight` [E, d]; transformers 5.x fuses them into its
`mlp.experts.gate_up_proj` / `down_proj` when it loads them.

Mixtral has no dense layers and no shared experts. A dense layer of a partly sparse model (layers=every:2) is
written as E identical copies of its FFN behind a zero router: every expert is the FFN and the top-k weights
sum to 1, so the layer's output is unchanged (this needs the experts to be as wide as the dense FFN, i.e. not a
granular model). Shared experts are refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from moe.checkpoint import write_atomically
from moe.config import ModelConfig
from moe.ffn import DenseFFN
from moe.layer import MoELayer
from moe.model import Transformer

GPT2_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def _llama_family(cfg: ModelConfig) -> bool:
    return (cfg.norm == "rmsnorm" and cfg.position == "rope" and cfg.glu and cfg.activation == "silu"
            and not cfg.ffn_bias)


def _gpt2_shaped(cfg: ModelConfig) -> bool:
    return (cfg.norm == "layernorm" and cfg.position == "learned" and cfg.position_offset == 0 and not cfg.glu
            and cfg.activation in GPT2_ACTIVATIONS and cfg.attn_bias == "all" and cfg.ffn_bias
            and cfg.kv_heads == cfg.n_head and cfg.dim_per_head * cfg.n_head == cfg.d_model and cfg.tie_embeddings)


def _describe(cfg: ModelConfig) -> str:
    return (f"norm={cfg.norm}, position={cfg.position}, activation={cfg.activation}, glu={cfg.glu}, "
            f"attn_bias={cfg.attn_bias}, ffn_bias={cfg.ffn_bias}")


def _rope_fields(cfg: ModelConfig) -> dict[str, Any]:
    return {"rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "rope_scaling": None}


def _llama_common(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.dim_per_head,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
        "torch_dtype": "float32", "dtype": "float32", **_rope_fields(cfg),
    }


def _llama_body(model: Transformer, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Everything but the FFN slots, in Hugging Face Llama names."""
    cfg = model.cfg
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layer):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        out[q + "input_layernorm.weight"] = state[p + "attn_norm.weight"]
        out[q + "post_attention_layernorm.weight"] = state[p + "ffn_norm.weight"]
        for proj in ("q", "k", "v", "o"):
            for kind in ("weight", "bias"):
                key = f"{p}attn.{proj}_proj.{kind}"
                if key in state:
                    out[f"{q}self_attn.{proj}_proj.{kind}"] = state[key]
    return out


def _dense_ffn(out: dict[str, Tensor], q: str, ffn: DenseFFN) -> None:
    out[q + "mlp.gate_proj.weight"] = ffn.gate.weight
    out[q + "mlp.up_proj.weight"] = ffn.up.weight
    out[q + "mlp.down_proj.weight"] = ffn.down.weight


def llama_checkpoint(model: Transformer) -> tuple[dict[str, Any], dict[str, Tensor]]:
    cfg = model.cfg
    if cfg.attn_bias == "qkv":
        config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False,
                  "sliding_window": None, "max_window_layers": cfg.n_layer}
    else:
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": cfg.attn_bias == "all",
                  "mlp_bias": False}
    config.update(_llama_common(cfg), intermediate_size=cfg.d_ff)
    state = model.state_dict()
    tensors = _llama_body(model, state)
    for i, block in enumerate(model.blocks):
        _dense_ffn(tensors, f"model.layers.{i}.", block.ffn)
    return config, tensors


def mixtral_checkpoint(model: Transformer) -> tuple[dict[str, Any], dict[str, Tensor]]:
    cfg, moe = model.cfg, model.cfg.moe
    r = moe.router
    problems = []
    if cfg.attn_bias != "none":
        problems.append(f"attn_bias={cfg.attn_bias!r} (Mixtral attention has no biases)")
    if moe.num_shared_experts:
        problems.append(f"num_shared_experts={moe.num_shared_experts} (Mixtral has no shared experts)")
    if not cfg.expert_glu:
        problems.append("experts without GLU (Mixtral experts are SwiGLU)")
    if r.name != "topk" or r.scale != 1.0 or r.random_second:
        problems.append(f"router {r.name} with scale={r.scale}, random_second={r.random_second} (Mixtral: topk, scale 1)")
    if r.order == "softmax_topk" and not r.renormalize:
        problems.append("routing.order=softmax_topk without renormalize (Mixtral renormalises the top-k weights; "
                        "use topk_softmax or renormalize=true)")
    if r.capacity_factor != 0 or (r.eval_capacity_factor not in (None, 0)):
        problems.append(f"capacity_factor={r.capacity_factor} (Mixtral is dropless: 0)")
    dense_layers = [i for i in range(cfg.n_layer) if i not in set(cfg.sparse_layers)]
    if dense_layers and cfg.expert_hidden != cfg.d_ff:
        problems.append(f"dense layers {dense_layers} of width {cfg.d_ff} beside experts of width {cfg.expert_hidden} "
                        f"(Mixtral has one intermediate_size; dense layers are written as E copies of their FFN)")
    if problems:
        raise ValueError("this model cannot be written as a Mixtral checkpoint: " + "; ".join(problems))
    E = moe.num_experts
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **_llama_common(cfg),
              "intermediate_size": cfg.expert_hidden, "num_local_experts": E, "num_experts_per_tok": r.top_k,
              "router_aux_loss_coef": r.aux_loss_coef, "output_router_logits": False, "router_jitter_noise": 0.0,
              "sliding_window": None}
    state = model.state_dict()
    tensors = _llama_body(model, state)
    for i, block in enumerate(model.blocks):
        q = f"model.layers.{i}.block_sparse_moe."
        if isinstance(block.ffn, MoELayer):
            ex = block.ffn.experts
            tensors[q + "gate.weight"] = block.ffn.router.gate.weight.float()
            for e in range(E):
                tensors[f"{q}experts.{e}.w1.weight"] = ex.w_gate[e].t()
                tensors[f"{q}experts.{e}.w3.weight"] = ex.w_up[e].t()
                tensors[f"{q}experts.{e}.w2.weight"] = ex.w_down[e].t()
        else:  # a dense layer: E copies of the FFN behind a zero router (output unchanged, see the docstring)
            ffn = block.ffn
            tensors[q + "gate.weight"] = torch.zeros(E, cfg.d_model)
            for e in range(E):
                tensors[f"{q}experts.{e}.w1.weight"] = ffn.gate.weight
                tensors[f"{q}experts.{e}.w3.weight"] = ffn.up.weight
                tensors[f"{q}experts.{e}.w2.weight"] = ffn.down.weight
    return config, tensors


def gpt2_checkpoint(model: Transformer) -> tuple[dict[str, Any], dict[str, Tensor]]:
    cfg = model.cfg
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
              "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
              "n_inner": cfg.d_ff, "activation_function": GPT2_ACTIVATIONS[cfg.activation],
              "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": True, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
              "attn_pdrop": 0.0, "initializer_range": cfg.init_std, "torch_dtype": "float32", "dtype": "float32"}
    s = model.state_dict()
    t = {"transformer.wte.weight": s["embed.weight"], "transformer.wpe.weight": s["pos_embed.weight"],
         "transformer.ln_f.weight": s["norm.weight"], "transformer.ln_f.bias": s["norm.bias"]}
    for i in range(cfg.n_layer):
        p, q = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
            t[q + theirs + ".weight"], t[q + theirs + ".bias"] = s[p + ours + ".weight"], s[p + ours + ".bias"]
        t[q + "attn.c_attn.weight"] = torch.cat([s[f"{p}attn.{x}_proj.weight"] for x in "qkv"]).t()  # Conv1D [in, out]
        t[q + "attn.c_attn.bias"] = torch.cat([s[f"{p}attn.{x}_proj.bias"] for x in "qkv"])
        t[q + "attn.c_proj.weight"], t[q + "attn.c_proj.bias"] = s[p + "attn.o_proj.weight"].t(), s[p + "attn.o_proj.bias"]
        t[q + "mlp.c_fc.weight"], t[q + "mlp.c_fc.bias"] = s[p + "ffn.up.weight"].t(), s[p + "ffn.up.bias"]
        t[q + "mlp.c_proj.weight"], t[q + "mlp.c_proj.bias"] = s[p + "ffn.down.weight"].t(), s[p + "ffn.down.bias"]
    return config, t


def hf_checkpoint(model: Transformer) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config.json contents, tensors) of the Hugging Face checkpoint this model becomes."""
    cfg = model.cfg
    if _llama_family(cfg):
        return mixtral_checkpoint(model) if cfg.is_moe else llama_checkpoint(model)
    if _gpt2_shaped(cfg) and not cfg.is_moe:
        return gpt2_checkpoint(model)
    raise ValueError(
        f"no Hugging Face format for this model ({_describe(cfg)}, sparse layers {list(cfg.sparse_layers)}): "
        f"supported are the Llama family (rmsnorm, rope, silu GLU, no FFN bias) dense or MoE (Mixtral), and dense "
        f"GPT-2-shaped models (layernorm, learned positions, biases, tied head)"
    )


def export_hf(model: Transformer, out: str | Path, tokenizer=None, tokenizer_config: Optional[dict] = None,
              special_ids: Optional[dict[str, int]] = None) -> Path:
    """Writes `out` (atomically: a temporary folder renamed into place) as a Hugging Face checkpoint.

    tokenizer: a `tokenizers.Tokenizer` written as tokenizer.json; tokenizer_config: written as
    tokenizer_config.json (special tokens, chat template); special_ids: bos/eos/pad token ids for config.json.
    """
    from safetensors.torch import save_file

    config, tensors = hf_checkpoint(model)
    config.update({f"{k}_token_id": v for k, v in (special_ids or {}).items()})
    # safetensors refuses shared storage: every tensor is written as its own contiguous copy.
    tensors = {k: v.detach().float().contiguous().clone() for k, v in tensors.items()}
    out = Path(out)
    with write_atomically(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(tokenizer.to_str())
        if tokenizer_config:
            (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    return out
