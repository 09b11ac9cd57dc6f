"""Gemma 1, 2 and 3, BLOOM and GPT-Neo: tiny random transformers models read from their Hugging Face directories
(and GGUF files as llama.cpp writes them) give transformers' logits (fp32, <= 1e-4), upcycle exactly at step 0,
and encoders / encoder-decoders are refused as out of scope."""
from __future__ import annotations

import json

import pytest
import torch

from tests.upcycle.conftest import hf_logits, ids_for, perturb
from tests.upcycle.family_models import SEQ, V, make_family, write_family_gguf
from upcycle import UpcycleConfig, exactness, read_dense, step0_check, upcycle

transformers = pytest.importorskip("transformers")
TOL = 1e-4
FAMILIES = ("gemma", "gemma2", "gemma3", "bloom", "gpt_neo")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """kind -> (transformers model, its saved directory), built once per module."""
    built = {}

    def get(kind):
        if kind not in built:
            path = tmp_path_factory.mktemp(kind)
            built[kind] = (make_family(kind, path), path)
        return built[kind]
    return get


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", FAMILIES)
def test_hf_family_equals_transformers(family, kind):
    hf, path = family(kind)
    src = read_dense(path)
    ids = ids_for(V, length=24)  # longer than every test model's window (5): local blocks really are local
    diff = (_logits(src.build_model(), ids) - hf_logits(hf, ids)).abs().max().item()
    assert diff <= TOL, f"{kind}: max |Δ logit| {diff:.2e}"
    assert src.origin == f"hf {hf.config.model_type}" and not src.config.is_moe


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "bloom", "gpt_neo"])
def test_left_padded_rows_equal_transformers(family, kind):
    """A row left-padded by 5 (our pad=, their attention_mask): windows count slots of real tokens, ALiBi's distances
    and RoPE / learned positions start at the first real token, as transformers' masks and positions do."""
    hf, path = family(kind)
    ids, pad = ids_for(V, length=16), torch.tensor([0, 5])
    mask = (torch.arange(16)[None] >= pad[:, None]).long()
    # transformers derives positions from the mask only in generate(); a plain forward is given them
    positions = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if kind in ("gpt_neo", "gemma2", "gemma3") else {}
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, **positions).logits
        ours = read_dense(path).build_model()(ids, pad=pad).logits
    diff = (ours - ref)[mask.bool()].abs().max().item()
    assert diff <= TOL, f"{kind} left-padded: max |Δ logit| {diff:.2e}"


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_older_gemma_configs(tmp_path, family, kind):
    """config.json as the Hub's Gemma 2 / 3 files were written before layer_types and per-layer-type
    rope_parameters: the pattern and both RoPE bases come from the older fields."""
    hf, path = family(kind)
    c = json.loads((path / "config.json").read_text())
    rope = c.pop("rope_parameters")
    c.pop("layer_types")
    if kind == "gemma3":
        c.update(rope_theta=rope["full_attention"]["rope_theta"], rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
                 sliding_window_pattern=3, rope_scaling=None)
    else:
        c.update(rope_theta=rope["rope_theta"])
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps(c))
    (old / "model.safetensors").symlink_to(path / "model.safetensors")
    src = read_dense(old)
    assert src.config == read_dense(path).config
    ids = ids_for(V, length=24)
    assert (_logits(src.build_model(), ids) - hf_logits(hf, ids)).abs().max() <= TOL


LINEAR = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 50000.0},
          "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}


def test_linear_rope_scaling_of_global_blocks(tmp_path):
    """Gemma 3 4B+ scale the global blocks' RoPE linearly (factor 8), HF and GGUF alike; Llama's rope_type linear
    scales every block."""
    from tests.upcycle.conftest import make_hf

    hf = make_family("gemma3", tmp_path / "g", rope_parameters=LINEAR)
    write_family_gguf(tmp_path / "g.gguf", hf, "gemma3")
    ids = ids_for(V, length=40)  # positions well past 8, where position / 8 differs
    for source in (tmp_path / "g", tmp_path / "g.gguf"):
        src = read_dense(source)
        assert (src.config.rope_linear_factor, src.config.rope_local_theta) == (8.0, 500.0)
        assert (_logits(src.build_model(), ids) - hf_logits(hf, ids)).abs().max() <= TOL
    hf = make_hf("llama", tmp_path / "l", rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 5e4})
    src = read_dense(tmp_path / "l")
    assert src.config.rope_linear_factor == 4.0 and src.config.family_options() == ["model.rope_linear_factor=4.0"]
    ids = ids_for(96, length=40)
    assert (_logits(src.build_model(), ids) - hf_logits(hf, ids)).abs().max() <= TOL


def test_multimodal_gemma3_reads_its_text_model(tmp_path):
    """Gemma3ForConditionalGeneration (text + a tiny SigLIP tower): the text model's logits on text, the vision
    tensors left out, and the Hub-style text_config (only the fields that differ from the defaults) completed."""
    text = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=SEQ, sliding_window=5,
                sliding_window_pattern=3, query_pre_attn_scalar=8, rope_scaling={"rope_type": "linear", "factor": 8.0})
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=V - 1, boi_token_index=V - 3, eoi_token_index=V - 2)
    cfg._attn_implementation = "eager"
    hf = perturb(transformers.Gemma3ForConditionalGeneration(cfg), 0, std=0.2)
    hf.save_pretrained(str(tmp_path / "mm"))
    c = json.loads((tmp_path / "mm" / "config.json").read_text())
    c["text_config"] = {"model_type": "gemma3_text", **text}  # as the Hub writes it: the rest are defaults
    (tmp_path / "mm" / "config.json").write_text(json.dumps(c))
    src = read_dense(tmp_path / "mm")
    assert any("vision tower" in n for n in src.notes) and src.config.rope_linear_factor == 8.0
    c = src.config  # Gemma 3's default bases: 1e6 global, 1e4 local
    assert (c.attention_pattern, c.qk_norm, c.rope_theta, c.rope_local_theta) == ("LLG", True, 1e6, 1e4)
    ids = ids_for(V - 3, length=24)  # no image tokens
    assert (_logits(src.build_model(), ids) - hf_logits(hf, ids)).abs().max() <= TOL


def test_family_options_read(family):
    c = read_dense(family("gemma2")[1]).config
    assert (c.attention_pattern, c.sliding_window, c.attn_softcap, c.logit_softcap) == ("LG", 5, 2.0, 3.0)
    assert (c.embed_scale, c.norm_unit_offset, c.post_norms, c.qk_norm, c.head_dim) == (True, True, True, False, 16)
    assert c.attn_scale == pytest.approx(24 ** -0.5) and c.activation == "gelu_tanh" and c.glu
    c = read_dense(family("gemma3")[1]).config
    assert (c.attention_pattern, c.rope_theta, c.rope_local_theta, c.qk_norm) == ("LLG", 50000.0, 500.0, True)
    assert c.attn_softcap is None and c.logit_softcap is None
    c = read_dense(family("bloom")[1]).config
    assert (c.position, c.embed_norm, c.norm, c.attn_bias, c.tie_embeddings) == ("alibi", True, "layernorm", "all", True)
    c = read_dense(family("gpt_neo")[1]).config
    assert (c.attention_pattern, c.sliding_window, c.attn_scale, c.attn_bias) == ("GL", 5, 1.0, "o")


@pytest.mark.parametrize("kind, change", [
    ("gemma2", dict(attention_pattern="G", sliding_window=None)),  # the window matters at 24 tokens
    ("gemma2", dict(attn_softcap=None)),  # so does the cap
    ("gemma3", dict(rope_local_theta=None)),  # and the local RoPE base
    ("gpt_neo", dict(attn_scale=None)),  # GPT-Neo's scores are unscaled
])
def test_each_option_is_exercised(family, kind, change):
    src = read_dense(family(kind)[1])
    ids = ids_for(V, length=24)
    src.config = src.config.replace(**change)
    diff = (_logits(src.build_model(), ids) - hf_logits(family(kind)[0], ids)).abs().max().item()
    assert diff > 1e-3, f"{kind} without {change}: the test would not notice the option ({diff:.1e})"


@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3", "bloom"])
def test_gguf_family_equals_transformers(tmp_path, family, kind):
    hf, _ = family(kind)
    write_family_gguf(tmp_path / "m.gguf", hf, kind)
    src = read_dense(tmp_path / "m.gguf")
    ids = ids_for(V, length=24)
    diff = (_logits(src.build_model(), ids) - hf_logits(hf, ids)).abs().max().item()
    assert src.origin.startswith(f"gguf {kind}")
    if kind == "gemma2":  # query_pre_attn_scalar (24) is not in GGUF: llama.cpp scales by 1/sqrt(head_dim = 16)
        assert src.config.attn_scale == pytest.approx(16 ** -0.5) and diff > 1e-3
        hf2 = make_family(kind, tmp_path / "hf16", query_pre_attn_scalar=16)
        write_family_gguf(tmp_path / "m16.gguf", hf2, kind)
        src, hf = read_dense(tmp_path / "m16.gguf"), hf2
        diff = (_logits(src.build_model(), ids) - hf_logits(hf, ids)).abs().max().item()
    assert diff <= TOL, f"gguf {kind}: max |Δ logit| {diff:.2e}"
    if kind == "bloom":
        assert src.config.tie_embeddings and any("copy of token_embd" in n for n in src.notes)


@pytest.mark.parametrize("kind", FAMILIES)
def test_upcycle_step0_exact(family, kind):
    dense = read_dense(family(kind)[1]).build_model()
    cfg = UpcycleConfig(recipe="copy", layers="all", num_experts=4, router_init_std=0.5)
    moe = upcycle(dense, cfg)
    report = step0_check(dense, moe, ids_for(V, length=33), cfg.recipe, *exactness(cfg))
    assert report.expected_exact and report.max_abs_diff < 1e-5, report.text()
    assert moe.cfg.family_options() == dense.cfg.family_options() != []


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "bloom", "gpt_neo"])
def test_upcycle_with_the_default_calibrated_router_is_exact(family, kind):
    """The app's default router (mean-free rows, calibrated on the sample) through each family's backbone: exact,
    and every row orthogonal to its layer's mean router input (Gemma's router input is the pre-FFN norm's output,
    before the post-FFN norm)."""
    from upcycle.router_init import router_input_means

    dense = read_dense(family(kind)[1]).build_model()
    ids = ids_for(V, length=33)
    cfg = UpcycleConfig(recipe="copy", num_experts=4)  # every:2, router_init=mean_free
    moe = upcycle(dense, cfg, calibration=ids[:, :-1])
    means = router_input_means(dense, ids[:, :-1], moe.cfg.sparse_layers)
    for i, m in means.items():
        assert float((moe.blocks[i].ffn.router.gate.weight.detach() @ (m / m.norm())).abs().max()) < 1e-7
    report = step0_check(dense, moe, ids, cfg.recipe, *exactness(cfg))
    assert report.expected_exact and report.max_abs_diff < 1e-5, report.text()


# ------------------------------------------------------------------------------------------- refusals


def _save(path, config):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("config, match", [
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, r"model_type='bert' is an encoder.*out of scope"),
    ({"model_type": "roberta"}, r"encoder.*out of scope"),
    ({"model_type": "t5", "is_encoder_decoder": True}, r"model_type='t5' is an encoder-decoder.*out of scope"),
    ({"model_type": "bart"}, r"encoder-decoder.*out of scope"),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, r"encoder.*out of scope"),
    ({"model_type": "gemma3"}, r"model_type='gemma3' needs a text_config"),
    ({"model_type": "bloom", "apply_residual_connection_post_layernorm": True}, "apply_residual_connection"),
])
def test_hf_refusals(tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        read_dense(_save(tmp_path / "m", config))


def test_gguf_encoder_and_gpt_neo_refusals(tmp_path):
    gguf = pytest.importorskip("gguf")
    for arch, match in (("bert", r"'bert' is an encoder;.*out of scope"), ("t5", r"'t5' is an encoder-decoder"),
                        ("gptneox", r"not supported.*GPT-Neo has no llama\.cpp architecture")):
        w = gguf.GGUFWriter(str(tmp_path / f"{arch}.gguf"), arch)
        w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(ValueError, match=match):
            read_dense(tmp_path / f"{arch}.gguf")


def test_export_refuses_family_options(family):
    from upcycle.export import choose_format

    dense = read_dense(family("gemma2")[1]).build_model()
    moe = upcycle(dense, UpcycleConfig(recipe="copy", layers="all", num_experts=4))
    with pytest.raises(ValueError, match=r"mixtral: model\.embed_scale=True \(mixtral has no such option\)"):
        choose_format(moe.cfg)
    assert SEQ == dense.cfg.max_seq_len
