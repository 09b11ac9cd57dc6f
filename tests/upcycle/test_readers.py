"""Readers: our dense model loaded from a Hugging Face directory equals transformers' logits, per family;
every bad input raises with the tensor or field named."""
from __future__ import annotations

import json

import pytest
import torch

from moe.checkpoint import save_checkpoint
from moe.model import Transformer
from moe.presets import get_preset
from tests.upcycle.conftest import TINY, hf_logits, ids_for, make_hf
from upcycle import read_dense

TOL = 2e-5


def _ours(path, ids):
    src = read_dense(path)
    with torch.no_grad():
        return src, src.build_model()(ids).logits


@pytest.mark.parametrize("kind", ["gpt2", "opt", "llama", "qwen2", "mistral"])
def test_dense_load_equals_transformers(tmp_path, kind):
    hf = make_hf(kind, tmp_path)
    ids = ids_for(TINY["vocab"])
    src, ours = _ours(tmp_path, ids)
    diff = (ours - hf_logits(hf, ids)).abs().max().item()
    assert diff < TOL, f"{kind}: max |Δ logit| {diff:.2e}"
    assert src.origin == f"hf {kind}" and not src.config.is_moe


def test_family_details(tmp_path):
    make_hf("gpt2", tmp_path / "gpt2")
    c = read_dense(tmp_path / "gpt2").config
    assert (c.activation, c.position, c.attn_bias, c.ffn_bias, c.tie_embeddings) == ("gelu_tanh", "learned", "all", True, True)
    make_hf("opt", tmp_path / "opt")
    c = read_dense(tmp_path / "opt").config
    assert (c.activation, c.position_offset) == ("relu", 2)
    make_hf("llama", tmp_path / "llama")
    c = read_dense(tmp_path / "llama").config
    assert (c.n_kv_head, c.rope_theta, c.norm, c.glu, c.attn_bias, c.tie_embeddings) == (2, 50000.0, "rmsnorm", True, "none", False)
    make_hf("qwen2", tmp_path / "qwen2")
    assert read_dense(tmp_path / "qwen2").config.attn_bias == "qkv"


def test_sharded_and_bin_weights(tmp_path):
    hf = make_hf("llama", tmp_path / "sharded", save_kwargs={"max_shard_size": "20KB"})
    assert list((tmp_path / "sharded").glob("*.index.json")), "the test model should be sharded"
    ids = ids_for(TINY["vocab"])
    _, ours = _ours(tmp_path / "sharded", ids)
    assert (ours - hf_logits(hf, ids)).abs().max() < TOL
    hf = make_hf("gpt2", tmp_path / "bin")
    # transformers 5 writes safetensors only; a pickled pytorch_model.bin is what older checkpoints hold.
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "bin" / "model.safetensors"))
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    _, ours = _ours(tmp_path / "bin", ids)
    assert (ours - hf_logits(hf, ids)).abs().max() < TOL


def test_mistral_sliding_window_clamps_max_seq_len(tmp_path):
    make_hf("mistral", tmp_path, sliding_window=16)
    src = read_dense(tmp_path)
    assert src.config.max_seq_len == 16 and any("sliding_window=16" in n for n in src.notes)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        src.build_model()(torch.zeros(1, 17, dtype=torch.long))


def test_switchyard_checkpoint_source(tmp_path):
    cfg = get_preset("tiny_dense").replace(vocab_size=64, max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    save_checkpoint(tmp_path / "ckpt", model)
    src = read_dense(tmp_path / "ckpt")
    ids = ids_for(64)
    with torch.no_grad():
        assert torch.equal(src.build_model()(ids).logits, model(ids).logits)
    assert src.origin == "switchyard" and src.tokenizer is None


# ------------------------------------------------------------------------------------------- bad inputs


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, match", [
    ({"do_layer_norm_before": False}, "do_layer_norm_before"),
    ({"word_embed_proj_dim": 16}, "word_embed_proj_dim"),
])
def test_opt_unsupported_variants(tmp_path, changes, match):
    make_hf("opt", tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        read_dense(tmp_path)


def test_bad_hf_inputs(tmp_path):
    make_hf("llama", tmp_path / "m")
    m = tmp_path / "m"
    _edit_config(m, model_type="falcon")
    with pytest.raises(ValueError, match=r"model_type='falcon'.*supported"):
        read_dense(m)
    _edit_config(m, model_type="llama", rope_parameters={"rope_type": "llama3", "rope_theta": 5e5})
    with pytest.raises(ValueError, match="RoPE type 'llama3' of rope_parameters / rope_scaling is not supported"):
        read_dense(m)
    _edit_config(m, rope_parameters={"rope_type": "default", "rope_theta": 5e4}, num_hidden_layers=5)
    with pytest.raises(ValueError, match=r"no tensor 'model\.layers\.4\.input_layernorm\.weight'"):
        read_dense(m)
    _edit_config(m, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"does not use: \['model\.layers\.3\."):
        read_dense(m)
    _edit_config(m, num_hidden_layers=4, intermediate_size=48)
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight' has shape \(64, 32\)"):
        read_dense(m)
    _edit_config(m, intermediate_size=64, attention_bias=True)
    with pytest.raises(ValueError, match=r"no tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        read_dense(m)
    (m / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        read_dense(m)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_dense(tmp_path / "nowhere")
    (tmp_path / "x.bin").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_dense(tmp_path / "x.bin")


def test_moe_checkpoint_is_refused(tmp_path):
    cfg = get_preset("tiny_moe").replace(vocab_size=64, max_seq_len=32)
    save_checkpoint(tmp_path / "moe", Transformer(cfg))
    with pytest.raises(ValueError, match="already a sparse model"):
        read_dense(tmp_path / "moe")
