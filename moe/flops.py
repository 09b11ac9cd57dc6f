"""Parameter and FLOP accounting from a ModelConfig alone (no model is built, so GPT-3 175B costs nothing).

Shape legend: V vocabulary, d model width, L blocks, H query heads, G key/value heads, hd head width,
f dense FFN hidden width, f_e expert hidden width, E experts per sparse layer, k experts per token, S sequence.

Conventions (those of torch.utils.flop_counter.FlopCounterMode, Chinchilla and PaLM):
- A multiply-add is 2 FLOPs: x[*, a] @ w[a, b] costs 2*a*b per row. Bias adds, norms, activations, softmax,
  RoPE, residual adds, the routing top-k and the weighted combine are elementwise and not counted.
- Attention scores (QK^T and AV) are counted over the full S x S square, 4*S*H*hd per token and layer,
  although a causal mask makes half of it unnecessary: FlopCounterMode, Chinchilla (appendix F) and PaLM
  (appendix B: training = 6N + 12*L*H*hd*S per token) count it that way. Kaplan et al.'s 2*L*S*d_attn is half.
- Sparse layers are counted dropless: every token reaches its k experts (capacity_factor 0, the default);
  with a fixed capacity, dropped assignments would make the real count smaller. The count is the useful
  work of the `sorted` dispatcher; `einsum` also spends FLOPs on its one-hot dispatch/combine einsums and
  on padded capacity slots, which are overhead, not model FLOPs, and are left out.
- training = forward + backward with backward = 2 x forward (a gradient for the input and one for the weight
  of every matmul), the "model FLOPs" behind MFU. Fused SDPA kernels recompute QK^T in their backward, so
  FlopCounterMode counts 5 score-sized matmuls there instead of 4; `attention_recompute=True` counts that
  (the hardware FLOPs of flash/efficient/cudnn attention). Activation checkpointing is never counted.
- The family options (moe.config) add no matmul: ALiBi is an added bias, soft-capping a tanh, the embedding
  scale a multiply, QK-norm and post-branch norms are norms; none is counted. A sliding window is a mask over
  the same full S x S square that scaled_dot_product_attention computes, so local blocks count as global ones
  (a windowed kernel would do S x W). Their parameters (QK-norm and post-branch norm weights, the embedding
  norm, GPT-Neo's o-only bias) are counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from moe.config import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    total: int  # all parameters, tied embeddings counted once: sum(p.numel() for p in Transformer(cfg).parameters())
    embedding: int  # token embedding table plus the learned position table (V*d + (max_seq_len+offset)*d)
    active: int  # touched per token: dense parts + routers + k experts per sparse layer; INCLUDES `embedding`
    active_non_embedding: int  # active - embedding (Kaplan's N); an untied lm_head is in it, a tied one is not
    experts_total: int  # every expert weight and bias of every sparse layer
    router: int  # every router gate weight (d*E per sparse layer; routers have no bias)


@dataclass(frozen=True)
class FlopCount:
    attention_proj: int  # q, k, v and o projections: 2*d*(H + 2G)*hd + 2*H*hd*d per layer
    attention_scores: int  # QK^T and AV over the full S x S square: 4*S*H*hd per layer
    ffn_dense: int  # dense FFN slots: 2*d*f per projection (2 projections, 3 with GLU)
    experts: int  # sparse slots: k routed experts per token, 2*d*f_e per projection (dropless), plus shared experts
    router: int  # router gates: 2*d*E per sparse layer
    lm_head: int  # output projection: 2*d*V
    forward: int  # sum of the above, per token, one forward pass
    backward: int  # 2 x forward, plus attention_scores/2 when counting fused-SDPA recomputation
    training: int  # forward + backward: 3 x forward in the default model-FLOPs convention


def _norm_params(cfg: ModelConfig) -> int:
    return 2 * cfg.d_model if cfg.norm == "layernorm" else cfg.d_model  # LayerNorm weight+bias, RMSNorm weight


def _ffn_params(cfg: ModelConfig, hidden: int, glu: bool) -> int:
    """One FFN (dense, or one expert): up, optional gate, down, each with a bias when cfg.ffn_bias."""
    d, n_in = cfg.d_model, 2 if glu else 1
    weights = n_in * d * hidden + hidden * d
    biases = (n_in * hidden + d) if cfg.ffn_bias else 0
    return weights + biases


def _shared_width(cfg: ModelConfig) -> int:
    """Summed hidden width of a sparse layer's shared (always-active) experts; 0 without them."""
    return (cfg.moe.shared_hidden or cfg.moe.num_shared_experts * cfg.expert_hidden) if cfg.moe.num_shared_experts else 0


def _attention_params(cfg: ModelConfig) -> int:
    d, hd, H, G = cfg.d_model, cfg.dim_per_head, cfg.n_head, cfg.kv_heads
    weights = d * (H + 2 * G) * hd + H * hd * d
    biases = 0
    if cfg.attn_bias in ("all", "qkv"):
        biases += (H + 2 * G) * hd
    if cfg.attn_bias in ("all", "o"):
        biases += d
    qk_norms = 2 * hd if cfg.qk_norm else 0  # one RMSNorm weight for the queries, one for the keys
    return weights + biases + qk_norms


def count_params(cfg: ModelConfig) -> ParamCount:
    """Parameters of Transformer(cfg), computed from the config (exact; see ParamCount for each field)."""
    d, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layer
    n_sparse = len(cfg.sparse_layers)
    E = cfg.moe.num_experts

    embedding = V * d + ((cfg.max_seq_len + cfg.position_offset) * d if cfg.position == "learned" else 0)
    lm_head = 0 if cfg.tie_embeddings else d * V
    per_block = (4 if cfg.post_norms else 2) * _norm_params(cfg) + _attention_params(cfg)
    dense_ffn = _ffn_params(cfg, cfg.d_ff, cfg.glu)
    expert = _ffn_params(cfg, cfg.expert_hidden, cfg.expert_glu)
    router = n_sparse * d * E if cfg.moe.router.has_gate else 0
    shared_width = _shared_width(cfg)
    shared_experts = n_sparse * ((_ffn_params(cfg, shared_width, cfg.expert_glu) + (d if cfg.moe.shared_gate else 0))
                                 if shared_width else 0)
    experts_total = n_sparse * E * expert
    embed_norm = _norm_params(cfg) if cfg.embed_norm else 0
    shared = (embedding + L * per_block + (L - n_sparse) * dense_ffn + _norm_params(cfg) + lm_head + router
              + shared_experts + embed_norm)

    total = shared + experts_total
    active = shared + round(n_sparse * cfg.moe.router.experts_per_token * expert)
    return ParamCount(total=total, embedding=embedding, active=active, active_non_embedding=active - embedding,
                      experts_total=experts_total, router=router)


def flops_per_token(cfg: ModelConfig, seq_len: Optional[int] = None, *, attention_recompute: bool = False) -> FlopCount:
    """Forward, backward and training FLOPs per token for sequences of seq_len tokens (default max_seq_len).

    Matches FlopCounterMode on a real forward (and forward + loss.backward()) of Transformer(cfg) divided by
    the number of tokens, for dropless routing, when SDPA's FLOPs are visible to it (the math backend, or
    the fused kernels with attention_recompute=True). See the module docstring for the conventions.
    """
    S = cfg.max_seq_len if seq_len is None else seq_len
    if not 1 <= S <= cfg.max_seq_len:
        raise ValueError(f"seq_len={S} must be between 1 and model.max_seq_len={cfg.max_seq_len}")
    d, hd, H, G, L = cfg.d_model, cfg.dim_per_head, cfg.n_head, cfg.kv_heads, cfg.n_layer
    n_sparse = len(cfg.sparse_layers)

    attention_proj = L * (2 * d * (H + 2 * G) * hd + 2 * H * hd * d)
    attention_scores = L * 4 * S * H * hd  # per token: (2*S*S*H*hd for QK^T + the same for AV) / S
    ffn_dense = (L - n_sparse) * (3 if cfg.glu else 2) * 2 * d * cfg.d_ff
    n_expert_proj = 3 if cfg.expert_glu else 2
    experts = round(n_sparse * cfg.moe.router.experts_per_token * n_expert_proj * 2 * d * cfg.expert_hidden)
    shared_width = _shared_width(cfg)
    if shared_width:  # shared experts are always active; counted with the routed ones
        experts += n_sparse * (n_expert_proj * 2 * d * shared_width + (2 * d if cfg.moe.shared_gate else 0))
    router = n_sparse * 2 * d * cfg.moe.num_experts if cfg.moe.router.has_gate else 0
    lm_head = 2 * d * cfg.vocab_size

    forward = attention_proj + attention_scores + ffn_dense + experts + router + lm_head
    # Fused SDPA backward: recompute QK^T, then dV, dP, dQ, dK: 5 score-sized matmuls against 2 forward (2.5x).
    backward = 2 * forward + (attention_scores // 2 if attention_recompute else 0)
    return FlopCount(attention_proj=attention_proj, attention_scores=attention_scores, ffn_dense=ffn_dense,
                     experts=experts, router=router, lm_head=lm_head, forward=forward, backward=backward,
                     training=forward + backward)


def model_summary(cfg: ModelConfig, seq_len: Optional[int] = None) -> dict[str, Any]:
    """Plain numbers for logging: parameter counts and per-token FLOPs at seq_len (default max_seq_len)."""
    p = count_params(cfg)
    f = flops_per_token(cfg, seq_len)
    return {
        "params_total": p.total,
        "params_active": p.active,
        "params_active_non_embedding": p.active_non_embedding,
        "params_embedding": p.embedding,
        "params_experts": p.experts_total,
        "sparse_layers": len(cfg.sparse_layers),
        "seq_len": cfg.max_seq_len if seq_len is None else seq_len,
        "forward_flops_per_token": f.forward,
        "training_flops_per_token": f.training,
    }
