"""GGUF's SentencePiece-style ("llama") vocabulary rebuilt as a tokenizer: the same ids as llama.cpp's SPM
algorithm (re-implemented below as the oracle: merge the adjacent pair whose concatenation is the best-scored
token, leftmost first; spell what is not a token in <0xXX> bytes), on Gemma's conventions (no space prefix,
control tokens) and Llama's (a space prefix)."""
from __future__ import annotations

import random

import pytest
import torch

from tests.upcycle.conftest import hf_logits, ids_for
from tests.upcycle.family_models import make_family, write_family_gguf
from upcycle import read_dense
from upcycle.gguf_tokenizer import build_spm_tokenizer

SP = "\u2581"
CORPUS = "the quick brown fox jumps over the lazy dog; the dog sleeps, the fox runs 123 times"
TEXTS = ["the lazy fox", " the quick  brown dog", "foxes run über 42 dogs", "the<start_of_turn>dog sleeps<eos>",
         "zzz qqq jumps", "over\nthe  lazy\tdog"]


def _vocab(seed=0):
    """<pad> <eos> <bos> <unk>, 256 byte tokens, a control token, the corpus' characters and many of its
    substrings (with and without a leading ▁), with distinct random scores."""
    rng = random.Random(seed)
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + ["<start_of_turn>"]
    types = [3, 3, 3, 2] + [6] * 256 + [3]
    text = CORPUS.replace(" ", SP)
    pieces = sorted(set(text) | {text[i:i + n] for n in range(2, 7) for i in range(len(text) - n + 1)})
    pieces = [p for p in pieces if rng.random() < 0.6 or len(p) == 1]
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * (len(tokens) - len(pieces)) + rng.sample(range(-10 * len(pieces), 0), len(pieces))
    return tokens, [float(s) for s in scores], types


def _spm_reference(text, tokens, scores, types, add_space_prefix):
    vocab = {t: i for i, t in enumerate(tokens)}
    specials = [t for t, ty in zip(tokens, types) if ty == 3]
    ids = []
    while text:  # cut at the first special token; the text before it is tokenized alone
        hits = [(text.find(s), s) for s in specials if s in text]
        at, special = min(hits) if hits else (len(text), None)
        piece, text = text[:at], text[at + len(special):] if special else ""
        if piece:
            # llama.cpp prefixes the text, and each stretch after a special token, with a space
            symbols = list((SP if add_space_prefix else "") + piece.replace(" ", SP))
            while True:
                best = None
                for i in range(len(symbols) - 1):
                    t = symbols[i] + symbols[i + 1]
                    if t in vocab and (best is None or scores[vocab[t]] > best[0]):
                        best = (scores[vocab[t]], i)
                if best is None:
                    break
                i = best[1]
                symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
            for s in symbols:
                ids += [vocab[s]] if s in vocab else [vocab[f"<0x{b:02X}>"] for b in s.encode("utf-8")]
        if special:
            ids.append(vocab[special])
    return ids


@pytest.mark.parametrize("add_space_prefix", [False, True])
def test_spm_tokenizer_equals_llama_cpp_algorithm(add_space_prefix):
    tokens, scores, types = _vocab()
    tok = build_spm_tokenizer(tokens, scores, types, add_space_prefix)
    for text in TEXTS:
        want = _spm_reference(text, tokens, scores, types, add_space_prefix)
        got = tok.encode(text).ids
        assert got == want, (text, got, want)
        if not add_space_prefix or "<" not in text:  # the prefixes after special tokens do not decode away
            assert tok.decode(got, skip_special_tokens=False) == text
    assert any(t.startswith("<0x") for t in tok.encode("über").tokens)  # ü is no token: bytes


def test_gemma_gguf_with_spm_tokenizer(tmp_path):
    tokens, scores, types = _vocab()
    hf = make_family("gemma2", tmp_path / "hf", vocab_size=len(tokens), query_pre_attn_scalar=16)
    write_family_gguf(tmp_path / "g.gguf", hf, "gemma2", tokenizer=dict(tokens=tokens, scores=scores, types=types))
    src = read_dense(tmp_path / "g.gguf")
    assert (src.special_tokens["bos_token"], src.eos_token) == ("<bos>", "<eos>")
    text = "the<start_of_turn>lazy fox über"
    assert src.tokenizer.encode(text).ids == _spm_reference(text, tokens, scores, types, False)
    ids = ids_for(len(tokens), length=20)
    with torch.no_grad():
        assert (src.build_model()(ids).logits - hf_logits(hf, ids)).abs().max() <= 1e-4


def test_upcycle_app_on_gemma3_gguf(tmp_path):
    """experiments.upcycle from a gemma3 GGUF: exact at step 0, and the checkpoint keeps the rebuilt tokenizer."""
    from experiments.tokenizer import load_tokenizer
    from experiments.upcycle import run_upcycle
    from moe.checkpoint import load_model
    from tests.upcycle.test_app import compose_upcycle

    tokens, scores, types = _vocab()
    hf = make_family("gemma3", tmp_path / "hf", vocab_size=len(tokens))
    write_family_gguf(tmp_path / "g.gguf", hf, "gemma3", tokenizer=dict(tokens=tokens, scores=scores, types=types))
    res = run_upcycle(compose_upcycle(f"source={tmp_path / 'g.gguf'}", f"out={tmp_path / 'moe'}", "num_experts=4"))
    assert res["report"].max_abs_diff < 1e-5 and res["report"].passed
    tok, model = load_tokenizer(tmp_path / "moe"), load_model(tmp_path / "moe")
    assert tok.encode("the lazy fox") == _spm_reference("the lazy fox", tokens, scores, types, False)
    assert model.cfg.qk_norm and model.cfg.attention_pattern == "LLG" and model.cfg.is_moe
