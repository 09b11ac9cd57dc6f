import json
import random

import pytest

from experiments import tokenizer as tokmod
from experiments.tokenizer import (
    EOS_TOKEN,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    bpe_fingerprint,
    build_tokenizer,
    load_tokenizer,
)

SAMPLES = {
    "ascii": "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "unicode": "héllo wörld — naïve café 日本語のテキスト 🎉🦀 Ελληνικά русский \u200b\u00a0end",
    "whitespace": "  \n\n\t\tindented\r\n   trailing   \n\n\n \t \u3000 x  \n",
    "with_eos_text": f"first{EOS_TOKEN}second <|endoftext| >",
    "empty": "",
}


def _corpus(n_words: int = 6000, seed: int = 0) -> list[str]:
    """Synthetic documents from a small word list: enough repeated pairs for a few hundred merges."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(400)]
    docs = []
    for _ in range(8):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n_words // 60)]
        docs.append("\n".join(lines) + "\n")
    return docs


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(_corpus(), vocab_size=400)


# ------------------------------------------------------------------------------------------------ byte


def test_byte_ids_are_utf8_bytes():
    tok = ByteTokenizer()
    for text in SAMPLES.values():
        assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.encode("é") == [0xC3, 0xA9]
    assert (tok.vocab_size, tok.eos_id, tok.name) == (257, 256, "byte")


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_byte_round_trip(kind):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(SAMPLES[kind])) == SAMPLES[kind]


def test_byte_decode_eos_and_invalid_bytes():
    tok = ByteTokenizer()
    assert tok.decode([104, 105, 256, 0xC3, 0xA9]) == "hi" + EOS_TOKEN + "é"
    # A window cut in the middle of a multi-byte character decodes with a replacement character.
    assert tok.decode([0xC3]) == "\ufffd"
    with pytest.raises(ValueError, match="outside the byte tokenizer's vocabulary"):
        tok.decode([257])


# ------------------------------------------------------------------------------------------------- bpe


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_bpe_round_trip(bpe, kind):
    # Includes characters never seen in training (the byte alphabet covers them).
    assert bpe.decode(bpe.encode(SAMPLES[kind])) == SAMPLES[kind]


def test_bpe_round_trip_training_text_and_compression(bpe):
    doc = _corpus()[0]
    ids = bpe.encode(doc)
    assert bpe.decode(ids) == doc
    assert len(ids) < 0.8 * len(doc.encode())  # the 143 learned merges compress it (measured: 0.69)


def test_bpe_vocab_size_and_eos(bpe):
    assert bpe.vocab_size == 400
    assert bpe.name == "bpe"
    assert bpe.encode(EOS_TOKEN) == [bpe.eos_id]
    assert max(max(bpe.encode(t) or [0]) for t in SAMPLES.values()) < 400
    assert isinstance(bpe, Tokenizer) and isinstance(ByteTokenizer(), Tokenizer)


def test_bpe_vocab_too_small():
    with pytest.raises(ValueError, match="data.vocab_size=100 is too small"):
        BPETokenizer.train(["abc"], vocab_size=100)


def test_bpe_training_is_deterministic():
    a = BPETokenizer.train(_corpus(), 300)
    b = BPETokenizer.train(_corpus(), 300)
    text = SAMPLES["ascii"] + _corpus(seed=1)[0]
    assert a.encode(text) == b.encode(text)


# ----------------------------------------------------------------------------------- build, save, load


def test_build_tokenizer_caches_bpe(tmp_path, monkeypatch):
    texts = _corpus()
    first = build_tokenizer("bpe", texts, 300, tmp_path)
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [f"bpe-300-{bpe_fingerprint(texts, 300)[:20]}.json"]  # no temp files left
    mtime = files[0].stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been loaded, not retrained")

    monkeypatch.setattr(tokmod.BPETokenizer, "train", no_training)
    second = build_tokenizer("bpe", texts, 300, tmp_path)
    assert files[0].stat().st_mtime_ns == mtime
    sample = SAMPLES["unicode"] + texts[1]
    assert second.encode(sample) == first.encode(sample)
    assert second.vocab_size == first.vocab_size == 300
    # Different texts or vocabulary size: a different cache entry (so a retrain, which is now blocked).
    with pytest.raises(AssertionError, match="should have been loaded"):
        build_tokenizer("bpe", texts[:-1], 300, tmp_path)
    with pytest.raises(AssertionError, match="should have been loaded"):
        build_tokenizer("bpe", texts, 301, tmp_path)


def test_fingerprint_separates_document_boundaries():
    assert bpe_fingerprint(["ab", "c"], 300) != bpe_fingerprint(["a", "bc"], 300)
    assert bpe_fingerprint(["ab"], 300) != bpe_fingerprint(["ab"], 301)


def test_build_tokenizer_byte_and_unknown(tmp_path):
    assert isinstance(build_tokenizer("byte", [], 4096, tmp_path), ByteTokenizer)
    assert list(tmp_path.iterdir()) == []  # nothing to cache
    with pytest.raises(ValueError, match=r"data.tokenizer='wordpiece'.*\['bpe', 'byte'\]"):
        build_tokenizer("wordpiece", [], 4096, tmp_path)


def test_save_and_load_both_kinds(tmp_path, bpe):
    ByteTokenizer().save(tmp_path / "byte.json")
    assert json.loads((tmp_path / "byte.json").read_text())["kind"] == "byte"
    assert isinstance(load_tokenizer(tmp_path / "byte.json"), ByteTokenizer)

    run_dir = tmp_path / "run"
    bpe.save(run_dir / "tokenizer.json")  # creates the folder
    restored = load_tokenizer(run_dir)  # a directory: reads its tokenizer.json
    assert isinstance(restored, BPETokenizer)
    assert (restored.vocab_size, restored.eos_id) == (bpe.vocab_size, bpe.eos_id)
    for text in SAMPLES.values():
        assert restored.encode(text) == bpe.encode(text)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(ValueError, match="not a tokenizer json"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"kind": "sentencepiece"}')
    with pytest.raises(ValueError, match="neither a byte tokenizer"):
        load_tokenizer(tmp_path / "other.json")
