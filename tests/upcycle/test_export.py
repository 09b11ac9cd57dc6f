"""Export: transformers loads what we write (Llama, Qwen2, GPT-2, OPT, Mixtral, Qwen2-MoE) with our logits (fp32,
within 1e-4; in practice ~1e-7); format=auto picks the format that is exact and says why the others are not; models
no format can hold are refused by the field to change, before anything is written; the tensors are the readers' key
maps run backwards (reading them back gives our state bit for bit); bf16 writes bf16."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from moe.checkpoint import model_state
from moe.config import MoEConfig
from moe.model import Transformer
from moe.presets import get_preset
from routing.config import RouterConfig
from routing.topk import topk_gating
from tests.upcycle.conftest import TINY, ids_for, make_hf, perturb
from upcycle import UpcycleConfig, read_dense, upcycle
from upcycle.export import choose_format, export_hf
from upcycle.keymaps import GGUF_LLAMA, GPT2, LLAMA, MIXTRAL, OPT, QWEN2_MOE, DictSource, apply_keymap, invert_keymap

transformers = pytest.importorskip("transformers")
TOL = 1e-4  # max |Δ logit| in fp32 (the must-show bound)
V = 96
BASE = get_preset("tiny_dense").replace(vocab_size=V, n_layer=4, d_model=32, n_head=4, n_kv_head=2, d_ff=48,
                                        max_seq_len=32, rope_theta=50000.0)


def moe_cfg(layers="all", base=BASE, **moe):
    kw = dict(num_experts=4, expert_hidden=16, router=RouterConfig(top_k=2))
    return base.replace(moe=MoEConfig(layers=layers, **{**kw, **moe}))


def build(cfg, seed=0) -> Transformer:
    torch.manual_seed(seed)
    return perturb(Transformer(cfg), seed, std=0.1)  # routers far from uniform, norms and biases away from 1 and 0


def logit_diff(model: Transformer, path) -> tuple[float, object]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = ids_for(V, length=24)
    with torch.no_grad():
        return (hf(input_ids=ids).logits - model.eval()(ids).logits).abs().max().item(), hf


def exported(tmp_path, cfg, **kw):
    model = build(cfg)
    out = export_hf(model, tmp_path / "hf", **kw)
    diff, hf = logit_diff(model, out)
    return diff, hf, json.loads((out / "config.json").read_text()), out


# ----------------------------------------------------------------------------------------------- dense


@pytest.mark.parametrize("name, cfg, cls", [
    ("llama", BASE, "LlamaForCausalLM"),
    ("llama untied, biases everywhere", BASE.replace(tie_embeddings=False, attn_bias="all", ffn_bias=True),
     "LlamaForCausalLM"),
    ("llama GeGLU, own head width", BASE.replace(activation="gelu_tanh", head_dim=16), "LlamaForCausalLM"),
    ("qwen2 for q/k/v biases", BASE.replace(attn_bias="qkv"), "Qwen2ForCausalLM"),
    ("gpt2", get_preset("gpt3_125m").replace(vocab_size=V, n_layer=2, d_model=32, n_head=4, head_dim=None, d_ff=48,
                                             max_seq_len=32), "GPT2LMHeadModel"),
    ("opt", get_preset("opt_125m").replace(vocab_size=V, n_layer=2, d_model=32, n_head=4, d_ff=48, max_seq_len=32,
                                           tie_embeddings=False), "OPTForCausalLM"),
])
def test_dense_models_load_with_our_logits(tmp_path, name, cfg, cls):
    diff, hf, config, _ = exported(tmp_path, cfg)
    assert type(hf).__name__ == cls and config["architectures"] == [cls]
    assert diff < TOL, f"{name}: max |Δ logit| {diff:.2e}"


def test_qwen2_on_request_writes_zero_biases(tmp_path):
    """A bias-free dense model is also exact as Qwen2 (whose q/k/v always have biases): zeros are written."""
    diff, hf, config, out = exported(tmp_path, BASE, format="qwen2")
    assert config["model_type"] == "qwen2" and diff < TOL
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert torch.count_nonzero(f.get_tensor("model.layers.0.self_attn.q_proj.bias")) == 0


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "opt"])
def test_dense_export_reads_back_through_our_reader(tmp_path, kind):
    make_hf(kind, tmp_path / "src")
    dense = read_dense(tmp_path / "src").build_model()
    export_hf(dense, tmp_path / "out")
    again = read_dense(tmp_path / "out").build_model()
    ids = ids_for(TINY["vocab"])
    with torch.no_grad():
        assert (again(ids).logits - dense(ids).logits).abs().max().item() == 0.0


# ----------------------------------------------------------------------------------------------- MoE


def test_all_sparse_moe_is_mixtral(tmp_path):
    diff, hf, config, _ = exported(tmp_path, moe_cfg("all"))
    assert type(hf).__name__ == "MixtralForCausalLM"
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (4, 2, 16)
    assert (config["bos_token_id"], config["eos_token_id"]) == (None, None)  # not Mixtral's defaults 1 and 2
    assert diff < TOL, f"max |Δ logit| {diff:.2e}"


def test_every2_with_shared_expert_is_qwen2_moe(tmp_path):
    cfg = moe_cfg("every:2", num_shared_experts=1, shared_gate=True)
    diff, hf, config, out = exported(tmp_path, cfg)
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    assert (config["decoder_sparse_step"], config["mlp_only_layers"]) == (2, [])
    assert (config["intermediate_size"], config["moe_intermediate_size"], config["shared_expert_intermediate_size"],
            config["norm_topk_prob"]) == (48, 16, 16, True)
    assert [type(layer.mlp).__name__ for layer in hf.model.layers] == ["Qwen2MoeMLP", "Qwen2MoeSparseMoeBlock"] * 2
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # a dense layer is written once, not as E copies
        assert sorted(k for k in f.keys() if k.startswith("model.layers.0.mlp.")) == [
            "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.up_proj.weight"]
    assert diff < TOL, f"max |Δ logit| {diff:.2e}"


@pytest.mark.parametrize("name, cfg, fields", [
    ("ungated shared experts (zero gate, doubled down)", moe_cfg("all", num_shared_experts=2),
     {"shared_expert_intermediate_size": 32}),
    ("no shared expert (width 0), listed layers", moe_cfg("0,3"),
     {"shared_expert_intermediate_size": 0, "decoder_sparse_step": 1, "mlp_only_layers": [1, 2]}),
    ("softmax_topk without renormalisation", moe_cfg("every:2", router=RouterConfig(top_k=2, order="softmax_topk")),
     {"norm_topk_prob": False}),
    ("routed scale folded, top-1, q/k/v biases, untied", moe_cfg("last:2", base=BASE.replace(attn_bias="qkv", tie_embeddings=False),
                                                                router=RouterConfig(top_k=1, scale=2.5)),
     {"qkv_bias": True, "num_experts_per_tok": 1, "tie_word_embeddings": False}),
    ("training-only router options", moe_cfg("every:2", router=RouterConfig(
        top_k=2, jitter=0.1, random_second=True, capacity_factor=1.25, eval_capacity_factor=0.0)), {}),
])
def test_qwen2_moe_variants(tmp_path, name, cfg, fields):
    diff, hf, config, _ = exported(tmp_path, cfg)
    assert config["model_type"] == "qwen2_moe"
    assert {k: config[k] for k in fields} == fields
    assert diff < TOL, f"{name}: max |Δ logit| {diff:.2e}"


def test_routing_semantics_match_transformers_routers():
    """Mixtral's router (softmax over E, top-k, renormalise) is our topk_softmax; Qwen2-MoE's with
    norm_topk_prob=false is our softmax_topk without renormalisation: same experts, same weights."""
    torch.manual_seed(0)
    x, w = torch.randn(50, 32), torch.randn(8, 32)
    mix = transformers.MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2)
    qwen = transformers.Qwen2MoeConfig(hidden_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    for router, order in ((MixtralTopKRouter(mix), "topk_softmax"), (Qwen2MoeTopKRouter(qwen), "softmax_topk")):
        router.weight.data.copy_(w)
        _, their_w, their_i = router(x)
        _, our_w, our_i = topk_gating(x @ w.t(), 2, order, renormalize=False)
        assert torch.equal(their_i, our_i)
        assert (their_w - our_w).abs().max().item() < 1e-6


def test_upcycled_every2_model_exports(tmp_path):
    """The upcycle app's export option: an upcycled Llama that keeps dense layers now becomes Qwen2-MoE."""
    make_hf("llama", tmp_path / "src")
    moe = upcycle(read_dense(tmp_path / "src").build_model(),
                  UpcycleConfig(layers="every:2", num_experts=4, router_init_std=0.5))
    out = export_hf(moe, tmp_path / "hf")
    assert TINY["vocab"] == V  # logit_diff samples ids below V
    diff, hf = logit_diff(moe, out)
    assert type(hf).__name__ == "Qwen2MoeForCausalLM" and diff < TOL


# ----------------------------------------------------------------------------------------------- auto and refusals


def test_auto_names_the_exact_format_and_why_not_the_others():
    choice = choose_format(moe_cfg("every:2", num_shared_experts=1))
    assert choice.format.name == "qwen2_moe"
    assert any("layers [0, 2] are dense" in p for p in choice.problems["mixtral"])
    assert any("num_shared_experts=1" in p for p in choice.problems["mixtral"])
    assert choice.problems["llama"] == ["sparse layers [1, 3] (model.moe.layers='every:2'): llama is dense"]
    text = choice.text()
    assert text.splitlines()[0].startswith("format: qwen2_moe (Qwen2MoeForCausalLM), chosen by format=auto")
    assert "mixtral: " in text and "gpt2: " in text

    dense = choose_format(BASE)
    assert dense.format.name == "llama" and dense.problems["qwen2"] == []  # exact too, but llama comes first
    assert "qwen2: also exact" in dense.text()
    assert choose_format(moe_cfg("all")).format.name == "mixtral"
    assert choose_format(moe_cfg("all", router=RouterConfig(order="softmax_topk"))).format.name == "qwen2_moe"


GLAM = get_preset("glam_0.1b_64e").replace(n_layer=2, d_model=32, n_head=4, head_dim=None, d_ff=48, vocab_size=V)


@pytest.mark.parametrize("cfg, fmt, match", [
    (moe_cfg(router=RouterConfig(name="expert_choice", capacity_factor=1.0)), "auto", "name='expert_choice': experts choose"),
    (moe_cfg(router=RouterConfig(name="hash", top_k=1)), "auto", "router.name='hash': tokens go to experts by a fixed"),
    (moe_cfg(router=RouterConfig(name="bias_balanced")), "auto", "per-expert bias"),
    (moe_cfg(router=RouterConfig(capacity_factor=1.25)), "auto", "set eval_capacity_factor=0"),
    (moe_cfg(glu=False), "auto", r"model.moe.glu=false \(Qwen2-MoE's experts are gated"),
    (moe_cfg(base=BASE.replace(ffn_bias=True)), "auto", "experts have no biases"),
    (moe_cfg(base=BASE.replace(attn_bias="all")), "auto", "o_proj has no bias"),
    (GLAM, "auto", "model.position='none'"),
    (moe_cfg(router=RouterConfig(order="softmax_topk")), "mixtral", "always renormalises"),
    (moe_cfg("every:2"), "mixtral", r"layers \[0, 2\] are dense"),
    (moe_cfg(num_shared_experts=1), "mixtral", "no shared experts"),
    (BASE.replace(attn_bias="qkv"), "llama", "qwen2 has q/k/v biases"),
    (BASE, "mixtral", "is an MoE format"),
    (BASE, "gpt2", "GPT-2 uses LayerNorm"),
])
def test_refusals_name_what_cannot_be_represented(tmp_path, cfg, fmt, match):
    model = Transformer(cfg)
    with pytest.raises(ValueError, match=match):
        export_hf(model, tmp_path / "x", format=fmt)
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())


def test_unknown_format_is_named():
    with pytest.raises(ValueError, match="format='mistral' is not a Hugging Face format we write"):
        choose_format(BASE, "mistral")


# ----------------------------------------------------------------------------------------------- key maps, dtype


@pytest.mark.parametrize("keymap, prefix, cfg", [
    (LLAMA, "model.", BASE.replace(attn_bias="qkv", tie_embeddings=False)),
    (GPT2, "transformer.", get_preset("gpt3_125m").replace(vocab_size=V, n_layer=2, d_model=32, n_head=4, head_dim=None,
                                                           d_ff=48, max_seq_len=32)),
    (OPT, "model.", get_preset("opt_125m").replace(vocab_size=V, n_layer=2, d_model=32, n_head=4, d_ff=48, max_seq_len=32)),
    (GGUF_LLAMA, "", BASE),  # llama.cpp's Q/K row permutation, re-applied
    (MIXTRAL, "model.", moe_cfg("all")),
    (QWEN2_MOE, "model.", moe_cfg("every:2", num_shared_experts=1, shared_gate=True)),
])
def test_export_is_the_readers_keymap_inverted(keymap, prefix, cfg):
    state = model_state(build(cfg))
    theirs = invert_keymap(keymap, state, cfg, prefix=prefix)
    back = apply_keymap(keymap, DictSource(theirs), cfg, prefix=prefix)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_a_tensor_the_layout_has_no_place_for_is_named():
    cfg = moe_cfg("all", num_shared_experts=1)
    with pytest.raises(ValueError, match=r"mixtral layout has no place for \['blocks.0.ffn.shared.down.weight'"):
        invert_keymap(MIXTRAL, model_state(Transformer(cfg)), cfg, prefix="model.")


def test_bf16_writes_bf16(tmp_path):
    model = build(moe_cfg("every:2", num_shared_experts=1, shared_gate=True))
    out = export_hf(model, tmp_path / "hf", dtype=torch.bfloat16)
    config = json.loads((out / "config.json").read_text())
    assert (config["dtype"], config["torch_dtype"]) == ("bfloat16", "bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    ours = export_hf(model, tmp_path / "fp32")  # default: the model's own dtype
    assert json.loads((ours / "config.json").read_text())["dtype"] == "float32"


def test_default_dtype_is_the_models(tmp_path):
    model = build(BASE).to(torch.bfloat16)
    out = export_hf(model, tmp_path / "hf")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"


# ----------------------------------------------------------------------------------------------- routing agreement


def test_a_near_tie_is_reported_with_its_layer_token_count_and_margin():
    """Token 2 of layer 3: its 2nd and 3rd router logits differ by 1e-7, below fp32 round-off of a real forward pass,
    and the export took the other one. The report names the layer, one token of four and the 1e-7 margin."""
    from upcycle.export import chosen_mask, routing_agreement, topk_margin

    logits = {1: torch.tensor([[3.0, 1.0, 0.0, -1.0]] * 4),
              3: torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, -1.0], [1.0, 0.5 + 1e-7, 0.5, -1.0],
                               [-1.0, 0.0, 1.0, 2.0]])}
    ours = {i: chosen_mask(l.topk(2, dim=-1).indices, 4) for i, l in logits.items()}
    theirs = {1: ours[1].clone(), 3: chosen_mask(torch.tensor([[0, 1], [1, 2], [0, 2], [3, 2]]), 4)}
    report = {r.layer: r for r in routing_agreement(logits, ours, theirs, k=2)}
    assert (report[1].differ, report[1].min_margin_differ, report[1].min_margin) == (0, None, 1.0)
    assert report[3].differ == 1 and report[3].tokens == 4
    assert report[3].min_margin_differ == pytest.approx(1e-7, abs=3e-8)  # fp32: 0.5 + 1e-7 rounds to 0.50000012
    assert report[3].text().startswith("layer 3: 1 of 4 tokens route to other experts (smallest router margin among "
                                       "them 1.2e-07)")
    assert torch.isinf(topk_margin(logits[1], 4)).all()  # k = E: every expert chosen, nothing to tie


def test_an_exported_mixtral_routes_every_token_as_we_do(tmp_path):
    from experiments.export import export_routing, routing_lines
    from upcycle.export import our_routing, routing_agreement

    model = build(moe_cfg("all"))
    out = export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = ids_for(V, length=24, batch=1)
    ours, router_logits, our_choice = our_routing(model, ids)
    theirs, their_choice = export_routing(hf, ids, k=2, num_experts=4)
    assert sorted(their_choice) == sorted(our_choice) == [0, 1, 2, 3]
    assert all(m.sum(-1).eq(2).all() for m in their_choice.values())  # two experts per token
    report = routing_agreement(router_logits, our_choice, their_choice, k=2)
    assert [r.differ for r in report] == [0, 0, 0, 0] and (theirs - ours).abs().max() < TOL
    assert routing_lines(report)[0].startswith("verify: routing: in 4 sparse layers every token goes to the same")
    flipped = {**their_choice, 2: their_choice[2].clone()}
    flipped[2][5] = ~flipped[2][5]  # token 5 of layer 2 sent to the other two experts
    lines = routing_lines(routing_agreement(router_logits, our_choice, flipped, k=2))
    assert lines[1].startswith("verify: routing: layer 2: 1 of 24 tokens route to other experts")
