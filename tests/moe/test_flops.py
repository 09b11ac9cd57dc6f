"""Parameter and FLOP accounting (moe.flops) against real models and torch's FlopCounterMode, and the papers.

The FLOP oracle is torch.utils.flop_counter.FlopCounterMode on a real forward (and forward + loss.backward())
of a tiny Transformer, divided by the tokens. Three things it does not see by default, handled here:
- On CPU, F.scaled_dot_product_attention runs aten._scaled_dot_product_flash_attention_for_cpu, which has
  no FLOP formula (counted 0). The main tests force the MATH backend, whose plain bmm's FlopCounterMode counts
  with its own formulas (backward = 2 x forward). A second test keeps the fused CPU kernel and maps it to
  torch's formulas for the GPU fused kernels, whose backward recomputes QK^T (moe.flops attention_recompute).
- F.grouped_mm (the experts' path on CUDA) is counted 0 too. The main MoE tests set gemm_impl="loop" on
  every Experts module: the per-expert loop then runs plain aten.mm, again counted by torch's own formulas,
  an oracle independent of ours. A custom mapping for aten._grouped_mm would need a formula we write
  ourselves; one test does that, to show the grouped path does the same work as the loop.
- Routing must be dropless (capacity_factor 0) for the count to be exact; a capacity only removes work.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from moe import ModelConfig, MoEConfig, Transformer, get_preset
from moe.experts import Experts
from moe.flops import FlopCount, ParamCount, count_params, flops_per_token, model_summary
from moe.layer import MoELayer
from routing import RouterConfig

aten = torch.ops.aten
B, S = 2, 16

BASE = dict(vocab_size=97, n_layer=3, d_model=32, n_head=4, d_ff=48, max_seq_len=S)
GPT2 = dict(BASE, activation="gelu_tanh", norm="layernorm", position="learned", attn_bias="all", ffn_bias=True)
OPT = dict(GPT2, activation="relu", position_offset=2)
LLAMA = dict(BASE, activation="silu", glu=True, norm="rmsnorm", position="rope", n_kv_head=2, tie_embeddings=False)
QWEN2 = dict(LLAMA, attn_bias="qkv", tie_embeddings=True)


def _moe(layers: str, top_k: int = 2, num_experts: int = 4, expert_hidden=None, **router) -> MoEConfig:
    return MoEConfig(layers=layers, num_experts=num_experts, expert_hidden=expert_hidden,
                     router=RouterConfig(top_k=top_k, **router))


DENSE = {
    "gpt2": GPT2,
    "opt": OPT,
    "llama_gqa": LLAMA,
    "qwen2": QWEN2,
    "head_dim": dict(LLAMA, head_dim=12, n_kv_head=None),  # H*hd = 48 != d_model
    "head_dim_learned": dict(GPT2, head_dim=4),  # H*hd = 16 < d_model, with biases
    "no_position": dict(GPT2, position="none", tie_embeddings=False),
    "glu_bias": dict(LLAMA, ffn_bias=True, attn_bias="all", norm="layernorm"),  # dense gate carries a bias
}
MOE = {
    "llama_every2_top2": dict(LLAMA, moe=_moe("every:2", 2, expert_hidden=24)),
    "gpt2_all_top1_bias": dict(GPT2, moe=_moe("all", 1)),
    "opt_last1_top2": dict(OPT, moe=_moe("last:1", 2, num_experts=3, expert_hidden=20)),
    "qwen2_list_top2": dict(QWEN2, moe=_moe("0,2", 2, expert_hidden=16)),
    "glu_bias_all_top2": dict(LLAMA, ffn_bias=True, moe=_moe("all", 2, expert_hidden=16)),  # experts carry a gate bias too
    "einsum_top2": dict(LLAMA, moe=MoEConfig(layers="every:2", num_experts=4, dispatcher="einsum")),
    "shared_gated": dict(LLAMA, moe=MoEConfig(layers="all", num_experts=4, expert_hidden=16, num_shared_experts=2,
                                              shared_gate=True)),
    "hash_top1": dict(LLAMA, moe=MoEConfig(layers="all", num_experts=4, router=RouterConfig(name="hash", top_k=1))),
    "shared_width_bias": dict(GPT2, moe=MoEConfig(layers="1", num_experts=3, num_shared_experts=1, shared_hidden=40)),
}
ALL = {**DENSE, **MOE}


def _model(kw: dict, grouped_mm: bool = False) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**kw))
    for m in model.modules():
        if isinstance(m, Experts):
            m.gemm_impl = "grouped_mm" if grouped_mm else "loop"
    return model


def _counted(model: Transformer, seq_len: int = S, backward: bool = False, mapping=None) -> int:
    idx = torch.randint(0, model.cfg.vocab_size, (B, seq_len), generator=torch.Generator().manual_seed(1))
    with FlopCounterMode(display=False, custom_mapping=mapping or {}) as counter:
        out = model(idx, idx if backward else None)
        if backward:
            out.total_loss.backward()  # the LM loss and the router's aux losses
    return counter.get_total_flops()


# ---------------------------------------------------------------- parameters against the real model

@pytest.mark.parametrize("name", sorted(ALL))
def test_param_counts_match_the_model(name):
    model = _model(ALL[name])
    p = count_params(model.cfg)
    assert isinstance(p, ParamCount)
    assert p.total == sum(t.numel() for t in model.parameters())  # parameters() yields a tied weight once
    emb = model.embed.weight.numel() + (model.pos_embed.weight.numel() if model.pos_embed is not None else 0)
    assert p.embedding == emb
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    experts = sum(t.numel() for m in moe_layers for t in m.experts.parameters())
    assert p.experts_total == experts
    assert p.router == sum(t.numel() for m in moe_layers for t in m.router.parameters())
    cfg = model.cfg
    k_of_e = sum(t.numel() for m in moe_layers for t in m.experts.parameters()) * cfg.moe.router.top_k
    active = p.total - experts + (k_of_e // cfg.moe.num_experts if moe_layers else 0)
    assert p.active == active and p.active_non_embedding == active - emb
    if not moe_layers:
        assert p.active == p.total and p.router == 0 and p.experts_total == 0


# ---------------------------------------------------------------- FLOPs against FlopCounterMode

@pytest.mark.parametrize("seq_len", [S, 11])
@pytest.mark.parametrize("name", sorted(set(ALL) - {"einsum_top2"}))
def test_flops_match_flop_counter_forward_and_backward(name, seq_len):
    model = _model(ALL[name])
    f = flops_per_token(model.cfg, seq_len)
    assert isinstance(f, FlopCount)
    with sdpa_kernel(SDPBackend.MATH):
        fwd = _counted(model, seq_len)
        train = _counted(model, seq_len, backward=True)
    T = B * seq_len
    assert fwd == f.forward * T
    assert train == f.training * T == 3 * f.forward * T  # every matmul: input and weight gradients
    assert f.forward == f.attention_proj + f.attention_scores + f.ffn_dense + f.experts + f.router + f.lm_head
    if model.cfg.is_moe:
        assert f.experts > 0 and (f.router > 0) == model.cfg.moe.router.has_gate


def _cpu_flash(q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(q, k, v)


def _cpu_flash_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, q, k, v)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "llama_every2_top2"])
def test_fused_sdpa_backward_recomputes_scores(name):
    # torch's formulas for the GPU fused kernels (flash, efficient, cudnn), applied to the CPU flash kernel:
    # the backward recomputes QK^T, 5 score-sized matmuls against 2 in the forward.
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward}
    model = _model(ALL[name])
    f = flops_per_token(model.cfg, S, attention_recompute=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        assert _counted(model, mapping=mapping) == f.forward * B * S
        assert _counted(model, backward=True, mapping=mapping) == f.training * B * S
    assert f.training == 3 * f.forward + f.attention_scores // 2
    assert f.forward == flops_per_token(model.cfg, S).forward


def _grouped_mm_flops(a, b, *args, out_shape=None, **kwargs) -> int:
    """2*M*K*N summed over groups, for the four layouts of aten._grouped_mm (offs splits M, K or N)."""
    if len(a) == 2 and len(b) == 3:  # [M_total, K] x [G, K, N]: forward and input gradient
        return 2 * a[0] * a[1] * b[2]
    if len(a) == 2 and len(b) == 2:  # [M, K_total] x [K_total, N] -> [G, M, N]: weight gradient
        return 2 * a[0] * a[1] * b[1]
    if len(a) == 3 and len(b) == 2:  # [G, M, K] x [K, N_total]
        return 2 * a[1] * a[2] * b[1]
    return 2 * a[0] * a[1] * a[2] * b[2]  # batched


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="this torch has no grouped_mm")
def test_grouped_mm_path_does_the_same_work():
    model = _model(MOE["llama_every2_top2"], grouped_mm=True)
    f = flops_per_token(model.cfg, S)
    with sdpa_kernel(SDPBackend.MATH):
        assert _counted(model) < f.forward * B * S  # FlopCounterMode alone does not see grouped_mm
        mapping = {aten._grouped_mm: _grouped_mm_flops}
        assert _counted(model, mapping=mapping) == f.forward * B * S
        assert _counted(model, backward=True, mapping=mapping) == f.training * B * S


def test_capacity_and_einsum_are_bounded_by_the_dropless_count():
    kw = dict(LLAMA, moe=_moe("all", 2, capacity_factor=0.5, min_capacity=1))
    with sdpa_kernel(SDPBackend.MATH):
        dropped = _counted(_model(kw))
        einsum = _counted(_model(MOE["einsum_top2"]))
    assert dropped < flops_per_token(ModelConfig(**kw), S).forward * B * S  # dropped tokens skip their experts
    # einsum's one-hot dispatch/combine and padded slots are overhead beyond the model FLOPs
    assert einsum > flops_per_token(ModelConfig(**MOE["einsum_top2"]), S).forward * B * S


def test_seq_len_is_checked():
    cfg = ModelConfig(**GPT2)
    with pytest.raises(ValueError, match="max_seq_len"):
        flops_per_token(cfg, S + 1)
    assert flops_per_token(cfg) == flops_per_token(cfg, S)


# ---------------------------------------------------------------- published presets

@pytest.mark.parametrize("name, nominal", [
    ("gpt3_125m", 125e6), ("gpt3_350m", 350e6), ("gpt3_760m", 760e6),
    ("gpt3_1.3b", 1.3e9),  # 16 heads x 128: Table 2.1's 24 x 128 does not fit d_model 2048
    ("gpt3_2.7b", 2.7e9), ("gpt3_6.7b", 6.7e9), ("gpt3_13b", 13e9), ("gpt3_175b", 175e9),
    ("opt_125m", 125e6), ("opt_1.3b", 1.3e9), ("opt_6.7b", 6.7e9), ("opt_66b", 66e9), ("opt_175b", 175e9),
])
def test_published_dense_sizes(name, nominal):
    # The papers round; our counts include biases, norms and the 2048-entry position table.
    p = count_params(get_preset(name))
    print(f"{name}: {p.total:,} parameters")
    assert p.active == p.total and p.experts_total == 0
    assert abs(p.total / nominal - 1) < 0.03


def test_gpt3_175b_and_opt_175b():
    for name in ("gpt3_175b", "opt_175b"):
        assert abs(count_params(get_preset(name)).total / 175e9 - 1) < 0.01
    assert abs(count_params(get_preset("gpt3_125m")).total / 125e6 - 1) < 0.01


def test_glam_64b_64e_is_in_the_papers_range():
    p = count_params(get_preset("glam_64b_64e"))
    f = flops_per_token(get_preset("glam_64b_64e"))
    print(f"glam_64b_64e: total {p.total / 1e9:.1f}B, active {p.active / 1e9:.1f}B "
          f"(non-embedding {p.active_non_embedding / 1e9:.1f}B), {f.training:.3g} training FLOPs/token at S=1024")
    # Paper (Du et al. 2022, Table 4): 1.2T total, 96.6B activated per token. Reproduced with plain-GELU
    # experts, GLU only in the dense FFNs and one tied 256k x 8192 table (moe/presets.py).
    assert abs(p.active / 96.6e9 - 1) < 0.005
    assert abs(p.total / 1.2e12 - 1) < 0.04
    assert p.experts_total == 32 * 64 * 2 * 8192 * 32768


def test_dense_preset_active_equals_total_and_moe_twin_is_sparse():
    dense, sparse = count_params(get_preset("glam_8b")), count_params(get_preset("glam_8b_64e"))
    assert dense.active == dense.total and dense.router == 0
    assert sparse.active < sparse.total and sparse.router == 16 * 4096 * 64


@pytest.mark.parametrize("name", ["gpt3_175b", "gpt3_6.7b", "glam_64b_64e"])
def test_forward_is_two_flops_per_active_matmul_weight(name):
    # Exact bridge between the two counts: every active weight matrix does one multiply-add per token; biases
    # and norm gains do none; the output head does V*d whether or not it is tied to the (uncounted) embedding.
    cfg = get_preset(name)
    p, f = count_params(cfg), flops_per_token(cfg)
    d, L = cfg.d_model, cfg.n_layer
    norms = (2 * L + 1) * (2 * d if cfg.norm == "layernorm" else d)
    attn_b = {"none": 0, "qkv": (cfg.n_head + 2 * cfg.kv_heads) * cfg.dim_per_head, "all": 4 * d}[cfg.attn_bias]
    ffn_b = (cfg.d_ff + d) if cfg.ffn_bias else 0
    head = d * cfg.vocab_size if cfg.tie_embeddings else 0
    assert f.forward == 2 * (p.active_non_embedding - norms - L * (attn_b + ffn_b) + head) + f.attention_scores


def test_kaplan_6n_rule_for_gpt3_175b():
    cfg = get_preset("gpt3_175b")
    p, f = count_params(cfg), flops_per_token(cfg, 2048)
    attention = 12 * cfg.n_layer * cfg.n_head * cfg.dim_per_head * 2048  # PaLM's 12*L*H*Q*T (full square)
    approx = 6 * p.active_non_embedding + attention
    print(f"gpt3_175b: training {f.training:.4g} FLOPs/token, 6N + attention {approx:.4g}")
    assert f.training == 3 * f.forward
    assert abs(f.training / approx - 1) < 0.01  # the rest is the output head's 6*d*V (0.35%)
    assert math.isclose(f.training, 1.076e12, rel_tol=0.005)


def test_model_summary():
    s = model_summary(get_preset("tiny_moe"), 64)
    p, f = count_params(get_preset("tiny_moe")), flops_per_token(get_preset("tiny_moe"), 64)
    assert s["params_total"] == p.total and s["params_active"] == p.active
    assert s["training_flops_per_token"] == f.training and s["seq_len"] == 64
    assert all(isinstance(v, int) for v in s.values())
