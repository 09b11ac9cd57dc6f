"""GGUF: a tiny file written as llama.cpp's converter writes it (Q/K permuted, F32 + Q8_0) reads back equal;
the tokenizer metadata becomes the same tokenizer; every bad input names its tensor or field."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.upcycle.conftest import TINY, hf_logits, ids_for, make_hf, write_gguf
from upcycle import read_dense
from upcycle.keymaps import llama_cpp_permute, llama_cpp_unpermute

gguf = pytest.importorskip("gguf")


def test_permutation_roundtrip():
    w = torch.randn(3 * 8, 5)
    assert torch.equal(llama_cpp_unpermute(llama_cpp_permute(w, 3), 3), w)
    assert not torch.equal(llama_cpp_permute(w, 3), w)


def test_gguf_reads_back_equal(tmp_path):
    hf = make_hf("llama", tmp_path / "hf")
    written = write_gguf(tmp_path / "m.gguf", hf, quantize=("blk.0.ffn_up.weight",))
    src = read_dense(tmp_path / "m.gguf")
    assert src.origin.startswith("gguf llama") and any("Q8_0" in n for n in src.notes)
    # Every F32 tensor is exact; the Q8_0 one equals its dequantized bytes.
    assert torch.equal(src.state["blocks.0.ffn.up.weight"], torch.from_numpy(written["blk.0.ffn_up.weight"]))
    sd = hf.state_dict()
    assert torch.equal(src.state["blocks.1.attn.q_proj.weight"], sd["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(src.state["blocks.1.attn.k_proj.weight"], sd["model.layers.1.self_attn.k_proj.weight"])
    c = src.config
    assert (c.n_kv_head, c.rope_theta, c.norm_eps, c.tie_embeddings) == (2, 50000.0, pytest.approx(1e-6), False)
    # Logits: equal to transformers running the same weights with the Q8_0 tensor dequantized.
    with torch.no_grad():
        sd["model.layers.0.mlp.up_proj.weight"].copy_(torch.from_numpy(written["blk.0.ffn_up.weight"]))
    ids = ids_for(TINY["vocab"])
    with torch.no_grad():
        diff = (src.build_model()(ids).logits - hf_logits(hf, ids)).abs().max().item()
    assert diff < 2e-5


def test_gguf_qwen2(tmp_path):
    hf = make_hf("qwen2", tmp_path / "hf")
    write_gguf(tmp_path / "q.gguf", hf, quantize=(), arch="qwen2")
    src = read_dense(tmp_path / "q.gguf")
    assert src.config.attn_bias == "qkv"
    ids = ids_for(TINY["vocab"])
    with torch.no_grad():
        assert (src.build_model()(ids).logits - hf_logits(hf, ids)).abs().max() < 2e-5


def test_gguf_tied_head(tmp_path):
    hf = make_hf("llama", tmp_path / "hf", tie_word_embeddings=True)
    write_gguf(tmp_path / "m.gguf", hf, quantize=(), drop=("output.weight",))
    src = read_dense(tmp_path / "m.gguf")
    assert src.config.tie_embeddings and "lm_head.weight" not in src.state


def _tiny_bpe(vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20, "hello world, 123 numbers"], trainer)
    doc = json.loads(tok.to_str())
    vocab = doc["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]]
    types = [3 if t in ("<|endoftext|>", "<|im_end|>") else 1 for t in tokens]
    return tok, tokens, merges, types


def test_gguf_tokenizer(tmp_path):
    ref, tokens, merges, types = _tiny_bpe()
    hf = make_hf("llama", tmp_path / "hf", vocab_size=len(tokens))
    write_gguf(tmp_path / "m.gguf", hf, tokenizer=(tokens, merges, types, tokens.index("<|im_end|>")))
    src = read_dense(tmp_path / "m.gguf")
    assert src.eos_token == "<|im_end|>"
    text = "the lazy fox says hello<|im_end|> 42 wörld"
    assert src.tokenizer.encode(text).ids == ref.encode(text).ids
    assert src.tokenizer.decode(src.tokenizer.encode(text).ids, skip_special_tokens=False) == text


# ------------------------------------------------------------------------------------------- bad inputs


def test_bad_gguf_inputs(tmp_path):
    hf = make_hf("llama", tmp_path / "hf")
    write_gguf(tmp_path / "arch.gguf", hf, arch="falcon")
    with pytest.raises(ValueError, match=r"general\.architecture='falcon'.*supported: \['bloom', 'gemma', 'gemma2', 'gemma3', 'llama', 'qwen2'\]"):
        read_dense(tmp_path / "arch.gguf")
    write_gguf(tmp_path / "missing.gguf", hf, drop=("blk.2.ffn_gate.weight",))
    with pytest.raises(ValueError, match=r"no tensor 'blk\.2\.ffn_gate\.weight'"):
        read_dense(tmp_path / "missing.gguf")
    write_gguf(tmp_path / "extra.gguf", hf, extra_tensors={"rope_freqs.weight": np.ones(4, np.float32)})
    with pytest.raises(ValueError, match=r"does not use: \['rope_freqs\.weight'\]"):
        read_dense(tmp_path / "extra.gguf")
    write_gguf(tmp_path / "shape.gguf", hf, meta_overrides={"feed_forward_length": 48})
    with pytest.raises(ValueError, match=r"tensor 'blk\.0\.ffn_up\.weight' has shape \(64, 32\).*needs \(48, 32\)"):
        read_dense(tmp_path / "shape.gguf")
    write_gguf(tmp_path / "field.gguf", hf, meta_overrides={"block_count": None})
    with pytest.raises(ValueError, match=r"metadata field 'llama\.block_count' is missing"):
        read_dense(tmp_path / "field.gguf")
    # Q8_1 is a type the gguf package cannot dequantize: 32-value blocks of 40 bytes (GGML_QUANT_SIZES).
    rows, cols = 64, 32
    raw = np.zeros((rows, cols // 32 * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1][1]), dtype=np.uint8)
    write_gguf(tmp_path / "q81.gguf", hf, quantize=(),
               raw_types={"blk.1.ffn_up.weight": (gguf.GGMLQuantizationType.Q8_1, raw)})
    with pytest.raises(ValueError, match=r"tensor 'blk\.1\.ffn_up\.weight' has type Q8_1.*supported types: \[.*'Q8_0'"):
        read_dense(tmp_path / "q81.gguf")
