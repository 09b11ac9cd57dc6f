"""The Hugging Face formats a Switchyard model can be exported to, and what each can represent exactly.

Every format is a reader's key map run backwards (upcycle/keymaps.py: `invert_keymap`), a list of the model options
it cannot hold (`problems`: empty when the export is exact), its config.json, and the few tensors the format needs
that our model does not store (`complete`: zeros, and exact rescalings).

  format      transformers class       holds
  llama       LlamaForCausalLM         dense; RMSNorm, RoPE, gated MLP (any activation), biases on all of q/k/v/o or
                                       none (attention_bias), FFN biases (mlp_bias)
  qwen2       Qwen2ForCausalLM         dense; as llama with biases on q/k/v only (always: zeros when we have none)
  gpt2        GPT2LMHeadModel          dense; LayerNorm, learned positions, plain MLP, every bias, equal q/k/v widths
  opt         OPTForCausalLM           dense; as gpt2 with positions offset by 2 and LayerNorm eps 1e-5
  mixtral     MixtralForCausalLM       every FFN slot sparse, top-k routing with the top-k probabilities
                                       renormalised, SwiGLU-style experts, no biases, no shared experts
  qwen2_moe   Qwen2MoeForCausalLM      any mix of dense and sparse slots (decoder_sparse_step, mlp_only_layers),
                                       top-k routing with or without renormalisation (norm_topk_prob), one
                                       sigmoid-gated shared expert (our shared experts, with or without their gate)

Routing semantics (transformers 5.x, MixtralTopKRouter / Qwen2MoeTopKRouter): logits = x W_gate^T, a softmax over
all E experts, the top-k of those probabilities, then (Mixtral always, Qwen2-MoE when norm_topk_prob) divided by
their sum; dropless, no routed scaling. Our `topk` router with order=topk_softmax (a softmax over the k chosen
logits) is the renormalised form exactly: softmax is monotone, so the same k experts win, and exp(l_j)/Σ_top exp
equals p_j/Σ_top p. order=softmax_topk is norm_topk_prob=renormalize. Our routed `scale` multiplies every combine
weight, so it is folded into each expert's down projection (y = Σ w·s·E(x) = Σ w·E'(x)). Training-only options do
not change the model being exported: jitter, GShard's random second choice (evaluation keeps both), the aux and
z-loss coefficients (router_aux_loss_coef carries ours in transformers' convention: hf_aux_loss_coef), and a
training capacity factor when evaluation is dropless (eval_capacity_factor=0).
Other routers choose experts in ways these formats cannot express and are refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from moe.config import ModelConfig
from upcycle.keymaps import GPT2, LLAMA, MIXTRAL, OPT, QWEN2_MOE, KeyMap

# our activation -> transformers' ACT2FN name computing the same function (gelu_pytorch_tanh is torch's own
# tanh approximation, which is what our gelu_tanh runs; GPT-2's "gelu_new" spells it out and rounds differently)
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}

ROUTER_REFUSALS = {  # routers whose choice of experts is not a softmax-top-k of a linear gate, and why
    "expert_choice": "experts choose their top tokens of the batch (Zhou et al.); these formats let tokens choose",
    "hash": "tokens go to experts by a fixed table of token ids, not by a learned gate",
    "base": "tokens are assigned by a balanced assignment over the batch (BASE layers), not by each token's top-k",
    "sinkhorn": "experts are chosen from Sinkhorn-balanced scores (sigmoid weights for top_k=1), not a plain softmax",
    "bias_balanced": "experts are chosen by sigmoid/softmax scores plus a learned per-expert bias (DeepSeek-V3)",
}


@dataclass(frozen=True)
class HFFormat:
    name: str  # format=... value, and the model_type written to config.json
    architecture: str  # the transformers class config.json names ("architectures")
    keymap: KeyMap  # the reader's key map this export runs backwards
    prefix: str  # the body's prefix in the *ForCausalLM checkpoint ("model.", "transformer.")
    sparse: bool  # an MoE format (the model needs sparse layers) or a dense one
    problems: Callable[[ModelConfig], list[str]]  # why the format cannot hold a model exactly; [] when it can
    config: Callable[[ModelConfig], dict[str, Any]]  # config.json fields (without dtype and special token ids)
    complete: Callable[[ModelConfig, dict[str, Tensor]], None]  # adds what the format needs that we do not store
    notes: Callable[[ModelConfig], list[str]]  # how parts the format spells differently were written


# ----------------------------------------------------------------------------------------------- problems


def _kind(cfg: ModelConfig, f: HFFormat) -> list[str]:
    if f.sparse and not cfg.is_moe:
        return [f"the model is dense (model.moe.layers={cfg.moe.layers!r}) and {f.name} is an MoE format"]
    if not f.sparse and cfg.is_moe:
        return [f"sparse layers {list(cfg.sparse_layers)} (model.moe.layers={cfg.moe.layers!r}): {f.name} is dense"]
    # Gemma / BLOOM / GPT-Neo options (moe.config.ModelConfig.family_options): no export format holds them
    return [f"{o} ({f.name} has no such option)" for o in cfg.family_options()]


def _llama_backbone(cfg: ModelConfig, name: str) -> list[str]:
    out = []
    if cfg.norm != "rmsnorm":
        out.append(f"model.norm={cfg.norm!r} ({name} uses RMSNorm)")
    if cfg.position != "rope":
        out.append(f"model.position={cfg.position!r} ({name} uses RoPE)")
    return out


def _dense_slots(cfg: ModelConfig) -> list[int]:
    sparse = set(cfg.sparse_layers)
    return [i for i in range(cfg.n_layer) if i not in sparse]


def _gated_mlp(cfg: ModelConfig, name: str, bias_ok: bool) -> list[str]:
    """The dense FFN slots as Llama's gated MLP (only when the model has dense slots)."""
    if not _dense_slots(cfg):
        return []
    out = []
    if not cfg.glu:
        out.append(f"model.glu=false ({name}'s MLP is gated: down(act(gate(x)) * up(x)))")
    if cfg.ffn_bias and not bias_ok:
        out.append(f"model.ffn_bias=true ({name}'s MLP has no biases)")
    return out


def _sparse_slots(cfg: ModelConfig, name: str, renormalizes_always: bool) -> list[str]:
    """The sparse slots as the format's router (softmax, top-k, maybe renormalised; dropless) and gated experts."""
    r = cfg.moe.router
    out = []
    if r.name != "topk":
        out.append(f"model.moe.router.name={r.name!r}: {ROUTER_REFUSALS.get(r.name, 'not a top-k router')}")
        return out
    if renormalizes_always and r.order == "softmax_topk" and not r.renormalize:
        out.append(f"model.moe.router.order=softmax_topk with renormalize=false ({name} always renormalises the "
                   f"top-k probabilities; qwen2_moe has norm_topk_prob=false)")
    cf = r.capacity_factor if r.eval_capacity_factor is None else r.eval_capacity_factor
    if cf != 0:
        out.append(f"model.moe.router.capacity_factor={r.capacity_factor}, eval_capacity_factor={r.eval_capacity_factor}: "
                   f"evaluation drops tokens beyond a capacity ({name} is dropless; set eval_capacity_factor=0)")
    if not cfg.expert_glu:
        out.append(f"model.moe.glu=false ({name}'s experts are gated: down(act(gate(x)) * up(x)))")
    if cfg.ffn_bias:
        out.append(f"model.ffn_bias=true ({name}'s experts have no biases)")
    return out


def llama_problems(cfg: ModelConfig) -> list[str]:
    if kind := _kind(cfg, LLAMA_FORMAT):  # a dense format for an MoE or the other way round: nothing else matters
        return kind
    out = _llama_backbone(cfg, "Llama") + _gated_mlp(cfg, "Llama", bias_ok=True)
    if cfg.attn_bias == "qkv":
        out.append("model.attn_bias='qkv' (Llama's attention_bias puts biases on q, k, v and o together; qwen2 has "
                   "q/k/v biases)")
    return out


def qwen2_problems(cfg: ModelConfig) -> list[str]:
    if kind := _kind(cfg, QWEN2_FORMAT):  # a dense format for an MoE or the other way round: nothing else matters
        return kind
    out = _llama_backbone(cfg, "Qwen2") + _gated_mlp(cfg, "Qwen2", bias_ok=False)
    if cfg.attn_bias == "all":
        out.append("model.attn_bias='all' (Qwen2's o_proj has no bias; llama has attention_bias)")
    return out


def _gpt_shaped(cfg: ModelConfig, name: str, offset: int) -> list[str]:
    out = []
    if cfg.norm != "layernorm":
        out.append(f"model.norm={cfg.norm!r} ({name} uses LayerNorm)")
    if cfg.position != "learned" or cfg.position_offset != offset:
        out.append(f"model.position={cfg.position!r}, position_offset={cfg.position_offset} ({name} learns "
                   f"absolute positions offset by {offset})")
    if cfg.glu:
        out.append(f"model.glu=true ({name}'s MLP is not gated)")
    if cfg.kv_heads != cfg.n_head or cfg.dim_per_head * cfg.n_head != cfg.d_model:
        out.append(f"n_kv_head={cfg.kv_heads}, head_dim={cfg.dim_per_head} ({name} has n_head heads of "
                   f"d_model / n_head for each of q, k and v)")
    return out


def gpt2_problems(cfg: ModelConfig) -> list[str]:
    if kind := _kind(cfg, GPT2_FORMAT):  # a dense format for an MoE or the other way round: nothing else matters
        return kind
    out = _gpt_shaped(cfg, "GPT-2", 0)
    if cfg.attn_bias != "all" or not cfg.ffn_bias:
        out.append(f"model.attn_bias={cfg.attn_bias!r}, ffn_bias={cfg.ffn_bias} (GPT-2 has every bias)")
    return out


def opt_problems(cfg: ModelConfig) -> list[str]:
    if kind := _kind(cfg, OPT_FORMAT):  # a dense format for an MoE or the other way round: nothing else matters
        return kind
    out = _gpt_shaped(cfg, "OPT", 2)
    if (cfg.attn_bias, cfg.ffn_bias) not in (("all", True), ("none", False)):
        out.append(f"model.attn_bias={cfg.attn_bias!r}, ffn_bias={cfg.ffn_bias} (OPT's enable_bias puts biases on "
                   f"every attention and FFN projection or on none)")
    if cfg.norm_eps != 1e-5:
        out.append(f"model.norm_eps={cfg.norm_eps} (OPT's LayerNorms use eps 1e-5)")
    return out


def mixtral_problems(cfg: ModelConfig) -> list[str]:
    if kind := _kind(cfg, MIXTRAL_FORMAT):  # a dense format for an MoE or the other way round: nothing else matters
        return kind
    out = _llama_backbone(cfg, "Mixtral")
    if cfg.attn_bias != "none":
        out.append(f"model.attn_bias={cfg.attn_bias!r} (Mixtral's attention has no biases)")
    dense = _dense_slots(cfg)
    if dense:
        out.append(f"layers {dense} are dense (model.moe.layers={cfg.moe.layers!r}): every Mixtral layer is sparse "
                   f"(qwen2_moe holds dense layers)")
    if cfg.moe.num_shared_experts:
        out.append(f"model.moe.num_shared_experts={cfg.moe.num_shared_experts} (Mixtral has no shared experts; "
                   f"qwen2_moe has one)")
    return out + _sparse_slots(cfg, "Mixtral", renormalizes_always=True)


def qwen2_moe_problems(cfg: ModelConfig) -> list[str]:
    if kind := _kind(cfg, QWEN2_MOE_FORMAT):  # a dense format for an MoE or the other way round: nothing else matters
        return kind
    out = _llama_backbone(cfg, "Qwen2-MoE") + _gated_mlp(cfg, "Qwen2-MoE", bias_ok=False)
    if cfg.attn_bias == "all":
        out.append("model.attn_bias='all' (Qwen2-MoE's o_proj has no bias)")
    return out + _sparse_slots(cfg, "Qwen2-MoE", renormalizes_always=False)


# ----------------------------------------------------------------------------------------------- config.json


def _llama_common(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.dim_per_head,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "hidden_act": HF_ACTIVATIONS[cfg.activation], "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0, "initializer_range": cfg.init_std, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "rope_scaling": None,
    }


def llama_config(cfg: ModelConfig) -> dict[str, Any]:
    return {**_llama_common(cfg), "intermediate_size": cfg.d_ff, "attention_bias": cfg.attn_bias == "all",
            "mlp_bias": cfg.ffn_bias}


def qwen2_config(cfg: ModelConfig) -> dict[str, Any]:
    return {**_llama_common(cfg), "intermediate_size": cfg.d_ff, "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": cfg.n_layer}


def gpt2_config(cfg: ModelConfig) -> dict[str, Any]:
    return {"vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.d_ff,
            "activation_function": HF_ACTIVATIONS[cfg.activation], "layer_norm_epsilon": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "initializer_range": cfg.init_std}


def opt_config(cfg: ModelConfig) -> dict[str, Any]:
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
            "ffn_dim": cfg.d_ff, "num_attention_heads": cfg.n_head, "max_position_embeddings": cfg.max_seq_len,
            "word_embed_proj_dim": cfg.d_model, "do_layer_norm_before": True, "_remove_final_layer_norm": False,
            "layer_norm_elementwise_affine": True, "enable_bias": cfg.ffn_bias,
            "activation_function": HF_ACTIVATIONS[cfg.activation], "tie_word_embeddings": cfg.tie_embeddings,
            "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "layerdrop": 0.0,
            "init_std": cfg.init_std}


def hf_aux_loss_coef(aux_loss_coef: float, top_k: int, num_sparse_layers: int) -> float:
    """Our load-balancing coefficient -> transformers' router_aux_loss_coef for the same training signal.

    Ours (routing.losses.load_balancing_loss, all_choices) is, per sparse layer, E * sum_i f_i * P_i with f_i the
    fraction of the T*k assignments, summed over the L sparse layers (moe.model). transformers' Mixtral and
    Qwen2-MoE load_balancing_loss_func pools the rows of all L layers into one E * sum_i F_i * Pbar_i with F_i
    the assignments per *token* (k times our f) and both averaged over the L layers; the model adds
    router_aux_loss_coef times that. With L = 1 that is k times our loss, so coef_hf = coef / k exactly
    (routing=mixtral's 0.02 at k = 2 is 0.01). With L > 1 the pooled loss's gradient on layer l's probabilities
    is coef_hf * k * E * mean_l(f) / L against our coef * E * f_l, so coef_hf = coef * L / k matches it exactly
    whenever each expert's load fraction is the same in every layer (balanced routing), and approximately else.
    GShard's first_choice convention (RouterConfig.balance_loss) counts T, not T*k, assignments: the same
    conversion keeps the gradient at balance, but the two losses are different functions away from it."""
    if top_k < 1 or num_sparse_layers < 1:
        raise ValueError(f"top_k={top_k} and num_sparse_layers={num_sparse_layers} must be at least 1 to convert "
                         "model.moe.router.aux_loss_coef")
    return aux_loss_coef * num_sparse_layers / top_k


def aux_loss_coef_from_hf(router_aux_loss_coef: float, top_k: int, num_sparse_layers: int) -> float:
    """transformers' router_aux_loss_coef -> our model.moe.router.aux_loss_coef (hf_aux_loss_coef inverted)."""
    return router_aux_loss_coef / hf_aux_loss_coef(1.0, top_k, num_sparse_layers)


def _moe_common(cfg: ModelConfig) -> dict[str, Any]:
    r = cfg.moe.router
    coef = hf_aux_loss_coef(r.aux_loss_coef, r.top_k, len(cfg.sparse_layers))
    return {"num_experts_per_tok": r.top_k, "router_aux_loss_coef": coef, "output_router_logits": False}


def mixtral_config(cfg: ModelConfig) -> dict[str, Any]:
    return {**_llama_common(cfg), **_moe_common(cfg), "intermediate_size": cfg.expert_hidden,
            "num_local_experts": cfg.moe.num_experts, "router_jitter_noise": 0.0, "sliding_window": None}


def qwen2_moe_layout(cfg: ModelConfig) -> tuple[int, list[int]]:
    """(decoder_sparse_step, mlp_only_layers): Qwen2-MoE makes layer i sparse when i is not in mlp_only_layers and
    (i + 1) % decoder_sparse_step == 0. A step alone when one describes our sparse layers (every:K is step K),
    else step 1 with every dense layer listed."""
    sparse = set(cfg.sparse_layers)
    for step in range(1, cfg.n_layer + 1):
        if sparse == {i for i in range(cfg.n_layer) if (i + 1) % step == 0}:
            return step, []
    return 1, _dense_slots(cfg)


def shared_width(cfg: ModelConfig) -> int:
    """Our shared experts together are one dense FFN of this width (moe.layer.MoELayer); 0 when there are none."""
    moe = cfg.moe
    return (moe.shared_hidden or moe.num_shared_experts * cfg.expert_hidden) if moe.num_shared_experts else 0


def qwen2_moe_config(cfg: ModelConfig) -> dict[str, Any]:
    step, mlp_only = qwen2_moe_layout(cfg)
    r = cfg.moe.router
    return {**_llama_common(cfg), **_moe_common(cfg), "intermediate_size": cfg.d_ff,
            "moe_intermediate_size": cfg.expert_hidden, "shared_expert_intermediate_size": shared_width(cfg),
            "num_experts": cfg.moe.num_experts, "norm_topk_prob": r.order == "topk_softmax" or r.renormalize,
            "decoder_sparse_step": step, "mlp_only_layers": mlp_only, "qkv_bias": cfg.attn_bias == "qkv",
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layer}


# ----------------------------------------------------------------------------------------------- completion


def _nothing(cfg: ModelConfig, tensors: dict[str, Tensor]) -> None:
    pass


def _no_notes(cfg: ModelConfig) -> list[str]:
    return []


def qwen2_complete(cfg: ModelConfig, tensors: dict[str, Tensor]) -> None:
    """Qwen2 always has q/k/v biases: zeros add nothing."""
    if cfg.attn_bias != "none":
        return
    for i in range(cfg.n_layer):
        for p, width in (("q", cfg.n_head), ("k", cfg.kv_heads), ("v", cfg.kv_heads)):
            tensors[f"model.layers.{i}.self_attn.{p}_proj.bias"] = torch.zeros(width * cfg.dim_per_head)


def qwen2_notes(cfg: ModelConfig) -> list[str]:
    return ["model.attn_bias='none': Qwen2's q/k/v biases are written as zeros"] if cfg.attn_bias == "none" else []


def _scale_experts(cfg: ModelConfig, tensors: dict[str, Tensor], down: str) -> None:
    """Our routed `scale` multiplies every combine weight; the formats have none, so it goes into each routed
    expert's down projection (`down`: its name's ending), not into a shared expert's."""
    scale = cfg.moe.router.scale
    if scale != 1.0:
        for name in [k for k in tensors if ".experts." in k and k.endswith(down)]:
            tensors[name] = tensors[name] * scale


def _moe_notes(cfg: ModelConfig) -> list[str]:
    r, out = cfg.moe.router, []
    if r.scale != 1.0:
        out.append(f"model.moe.router.scale={r.scale} is folded into every routed expert's down projection (the "
                   f"format has no routed scaling)")
    training_only = [f"{k}={v}" for k, v in (("jitter", r.jitter), ("random_second", r.random_second),
                                             ("capacity_factor", r.capacity_factor)) if v]
    if training_only:
        out.append(f"model.moe.router {', '.join(training_only)} act in training only; the export is the model as "
                   f"it evaluates")
    return out


def mixtral_complete(cfg: ModelConfig, tensors: dict[str, Tensor]) -> None:
    _scale_experts(cfg, tensors, ".w2.weight")


def qwen2_moe_complete(cfg: ModelConfig, tensors: dict[str, Tensor]) -> None:
    _scale_experts(cfg, tensors, ".down_proj.weight")
    d, width = cfg.d_model, shared_width(cfg)
    for i in cfg.sparse_layers:
        q = f"model.layers.{i}.mlp."
        if not width:  # a shared expert of width 0: it adds exactly 0
            tensors[q + "shared_expert.gate_proj.weight"] = torch.zeros(0, d)
            tensors[q + "shared_expert.up_proj.weight"] = torch.zeros(0, d)
            tensors[q + "shared_expert.down_proj.weight"] = torch.zeros(d, 0)
        if q + "shared_expert_gate.weight" not in tensors:
            # Qwen2-MoE always gates its shared expert by sigmoid(x . w): a zero w gives 1/2 for every token, and a
            # doubled down projection gives back our ungated shared experts (halving and doubling are exact).
            tensors[q + "shared_expert_gate.weight"] = torch.zeros(1, d)
            if width:
                tensors[q + "shared_expert.down_proj.weight"] = tensors[q + "shared_expert.down_proj.weight"] * 2


def qwen2_moe_notes(cfg: ModelConfig) -> list[str]:
    step, mlp_only = qwen2_moe_layout(cfg)
    out = [f"sparse layers {list(cfg.sparse_layers)}: decoder_sparse_step={step}, mlp_only_layers={mlp_only}"]
    out += _moe_notes(cfg)
    if not shared_width(cfg):
        out.append("no shared experts: Qwen2-MoE's shared expert is written with width 0 (it adds exactly 0)")
    elif not cfg.moe.shared_gate:
        out.append("ungated shared experts: Qwen2-MoE's sigmoid gate is written as zeros (1/2 for every token) and "
                   "the shared down projection doubled")
    return out


# ----------------------------------------------------------------------------------------------- the formats

LLAMA_FORMAT = HFFormat("llama", "LlamaForCausalLM", LLAMA, "model.", False, llama_problems, llama_config, _nothing,
                        _no_notes)
QWEN2_FORMAT = HFFormat("qwen2", "Qwen2ForCausalLM", LLAMA, "model.", False, qwen2_problems, qwen2_config,
                        qwen2_complete, qwen2_notes)
GPT2_FORMAT = HFFormat("gpt2", "GPT2LMHeadModel", GPT2, "transformer.", False, gpt2_problems, gpt2_config, _nothing,
                       _no_notes)
OPT_FORMAT = HFFormat("opt", "OPTForCausalLM", OPT, "model.", False, opt_problems, opt_config, _nothing, _no_notes)
MIXTRAL_FORMAT = HFFormat("mixtral", "MixtralForCausalLM", MIXTRAL, "model.", True, mixtral_problems, mixtral_config,
                          mixtral_complete, _moe_notes)
QWEN2_MOE_FORMAT = HFFormat("qwen2_moe", "Qwen2MoeForCausalLM", QWEN2_MOE, "model.", True, qwen2_moe_problems,
                            qwen2_moe_config, qwen2_moe_complete, qwen2_moe_notes)

# In the order `auto` prefers them: the plainest format that holds the model exactly (llama before qwen2's zero
# biases, mixtral before qwen2_moe's zero-width shared expert).
FORMATS: dict[str, HFFormat] = {f.name: f for f in (LLAMA_FORMAT, QWEN2_FORMAT, GPT2_FORMAT, OPT_FORMAT,
                                                     MIXTRAL_FORMAT, QWEN2_MOE_FORMAT)}
