"""Tokenizers for the experiments: raw bytes, or byte-level BPE trained on the corpus.

Both kinds share one small surface (`Tokenizer`): encode/decode, a vocabulary size, an end-of-text id and
`save(path)`. A training run saves its tokenizer next to its checkpoints so `generate` can restore it with
`load_tokenizer` without knowing which kind it was.

Byte-level BPE (the GPT-2 scheme) maps every byte to a printable character before merging, so any unicode
text encodes without an unknown token and decodes back to exactly the same string.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Protocol, Sequence, runtime_checkable

from moe.atomic import write_text

if TYPE_CHECKING:  # the library is imported lazily, only where BPE is used
    import tokenizers

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_KINDS = ("bpe", "byte")
# Bump when the way a BPE tokenizer is built changes, so stale cached tokenizers are not reused.
_BPE_RECIPE_VERSION = "bpe-bytelevel-v1"
# The smallest useful BPE vocabulary: the 256 byte symbols plus the end-of-text token.
MIN_BPE_VOCAB = 257


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, the trainer and `generate` need from a tokenizer."""

    @property
    def name(self) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, path: str | os.PathLike) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255) plus `<|endoftext|>` as id 256. Needs no training."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        # Bytes between end-of-text tokens are decoded as one run, so multi-byte characters survive;
        # a sampled sequence can contain invalid UTF-8, which becomes U+FFFD rather than an exception.
        parts: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
            elif i == self.eos_id:
                parts.append(run.decode("utf-8", errors="replace"))
                parts.append(EOS_TOKEN)
                run = bytearray()
            else:
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocabulary (0..256)")
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def save(self, path: str | os.PathLike) -> None:
        # Nothing is learned, so the kind alone restores it.
        write_text(Path(path), json.dumps({"kind": "byte", "version": 1}) + "\n")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257)"


class BPETokenizer:
    """Byte-level BPE from the `tokenizers` library (ByteLevel pre-tokenizer and decoder, no normalizer).

    `vocab_size` is the size of the trained vocabulary, which includes the 256 byte symbols and
    `<|endoftext|>`. It equals the requested size unless the training text offers fewer merges than asked.
    """

    name = "bpe"

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token: str = EOS_TOKEN) -> None:
        eos = tokenizer.token_to_id(eos_token)
        if eos is None:
            raise ValueError(f"this tokenizer has no {eos_token} token; train it with BPETokenizer.train")
        self._tok = tokenizer
        self._eos_token = eos_token
        self._eos_id = int(eos)
        self._vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        """Train on `texts` (each a document; no merge crosses a document boundary)."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < MIN_BPE_VOCAB:
            raise ValueError(
                f"data.vocab_size={vocab_size} is too small for byte-level BPE: it needs at least "
                f"{MIN_BPE_VOCAB} (256 bytes + {EOS_TOKEN}); raise it or use data.tokenizer=byte"
            )
        # No unk token: the 256-symbol byte alphabet covers every possible input.
        tok = HFTokenizer(models.BPE())
        # add_prefix_space=False keeps decode(encode(s)) == s (GPT-2 style would add a leading space).
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            # Seed the vocabulary with all 256 byte symbols, even ones absent from the training text,
            # so text seen later (other languages, emoji) still encodes.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # the library raises a bare Exception on malformed json
            raise ValueError(f"could not read the BPE tokenizer {path} ({e}); delete it to retrain") from e

    def save(self, path: str | os.PathLike) -> None:
        write_text(Path(path), self._tok.to_str())

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # The library encodes a batch on several threads.
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        # Keep special tokens: dropping them would break the round trip for text that contains them.
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


class PretrainedTokenizer(BPETokenizer):
    """A released model's own tokenizer (a `tokenizers` json file, e.g. written by `experiments.upcycle`), whose
    end-of-text token is not `<|endoftext|>`: it is named in `tokenizer_config.json` beside the tokenizer file
    (the Hugging Face convention: {"eos_token": "<|im_end|>", ...}), which `save` writes too."""

    name = "pretrained"
    CONFIG_FILE = "tokenizer_config.json"

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict) -> None:
        eos = config.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if not eos:
            raise ValueError(f"{self.CONFIG_FILE} names no eos_token; the tokenizer needs an end-of-text token")
        super().__init__(tokenizer, eos_token=eos)
        self.config = dict(config)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PretrainedTokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        side = path.with_name(cls.CONFIG_FILE)
        try:
            config = json.loads(side.read_text(encoding="utf-8"))
            return cls(HFTokenizer.from_file(str(path)), config)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"could not read the tokenizer {path} with {side.name} ({e})") from e
        except Exception as e:  # the library raises a bare Exception on malformed json
            if isinstance(e, ValueError):
                raise
            raise ValueError(f"could not read the tokenizer {path} ({e})") from e

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        write_text(path, self._tok.to_str())
        write_text(path.with_name(self.CONFIG_FILE), json.dumps(self.config, indent=1) + "\n")

    def __repr__(self) -> str:
        return f"PretrainedTokenizer(vocab_size={self.vocab_size}, eos={self._eos_token!r})"


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """sha256 of what a tokenizer maps text to: its kind, end-of-text id and (for BPE) its serialized model."""
    h = hashlib.sha256(f"{tok.name}\0{tok.eos_id}\0{tok.vocab_size}\0".encode())
    inner = getattr(tok, "_tok", None)
    if inner is not None:
        h.update(inner.to_str().encode("utf-8"))
    return h.hexdigest()


def bpe_fingerprint(texts: Iterable[str], vocab_size: int) -> str:
    """sha256 over the recipe version, the vocabulary size and the texts (length-prefixed, so
    ["ab", "c"] and ["a", "bc"] differ)."""
    h = hashlib.sha256()
    h.update(f"{_BPE_RECIPE_VERSION}\0{vocab_size}\0".encode())
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def check_tokenizer_kind(kind: str) -> None:
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"data.tokenizer={kind!r} is not a known tokenizer; use one of {list(TOKENIZER_KINDS)}")


def build_tokenizer(kind: str, train_texts: list[str], vocab_size: int, cache_dir: Path) -> Tokenizer:
    """The tokenizer of `kind` for a corpus. BPE is trained once per (training texts, vocab size) and cached
    in `cache_dir` as `bpe-{vocab_size}-{fingerprint}.json`; later calls load that file."""
    check_tokenizer_kind(kind)
    if kind == "byte":
        return ByteTokenizer()
    fp = bpe_fingerprint(train_texts, vocab_size)
    path = Path(cache_dir) / f"bpe-{vocab_size}-{fp[:20]}.json"
    if path.is_file():
        return BPETokenizer.load(path)
    # The one slow set-up step of a first run (about 15 s on the embedded corpus): say so before, and after.
    chars = sum(len(t) for t in train_texts)
    print(f"training a BPE tokenizer of vocabulary {vocab_size} on {len(train_texts)} documents ({chars:,} characters; "
          f"first use, cached in {path})", flush=True)
    t0 = time.perf_counter()
    tok = BPETokenizer.train(train_texts, vocab_size)
    tok.save(path)
    print(f"trained the BPE tokenizer in {time.perf_counter() - t0:.1f} s", flush=True)
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Restore a tokenizer written by `save`, whichever kind. `path` is the file, or a directory holding
    `tokenizer.json` (a run or checkpoint directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}; training runs save one as tokenizer.json")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a tokenizer json file ({e})") from e
    if isinstance(doc, dict) and doc.get("kind") == "byte":
        return ByteTokenizer()
    if isinstance(doc, dict) and "model" in doc:  # the `tokenizers` library's own format
        if path.with_name(PretrainedTokenizer.CONFIG_FILE).is_file():  # a released model's tokenizer
            return PretrainedTokenizer.load(path)
        return BPETokenizer.load(path)
    raise ValueError(f"{path} is neither a byte tokenizer ({{\"kind\": \"byte\"}}) nor a tokenizers json file")


# ----------------------------------------------------------------------------------------------- Hugging Face export

HF_TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # reads tokenizer.json as it is; AutoTokenizer picks it by this name


def _byte_level_chars() -> list[str]:
    """The character each byte becomes under the `tokenizers` ByteLevel pre-tokenizer (GPT-2's scheme), by byte.

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 (controls, space, the
    non-breaking space, the soft hyphen) take the characters from U+0100 on, in byte order. Checked against the
    library's own alphabet, so a change there fails here rather than shifting every id."""
    from tokenizers import pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    chars, spare = [], 256
    for b in range(256):
        if chr(b) in alphabet:  # the spare characters are all above U+00FF, so this is a byte standing for itself
            chars.append(chr(b))
        else:
            chars.append(chr(spare))
            spare += 1
    assert set(chars) == alphabet, "the tokenizers ByteLevel alphabet is not GPT-2's byte-to-character map"
    return chars


def byte_tokenizer_as_hf() -> "tokenizers.Tokenizer":
    """ByteTokenizer as a `tokenizers` tokenizer with the same ids: a BPE model with no merges over the 256 byte
    characters (id = byte value) and `<|endoftext|>` as the special token 256, behind ByteLevel pre-tokenization and
    decoding (no prefix space, no regex split: every byte is its own token). One difference: a text that spells out
    `<|endoftext|>` encodes to the special id here (as every Hugging Face tokenizer does) and to its 13 bytes in
    ByteTokenizer."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    vocab = {c: b for b, c in enumerate(_byte_level_chars())}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
    assert tok.token_to_id(EOS_TOKEN) == ByteTokenizer.eos_id
    return tok


def hf_tokenizer_files(tok: Tokenizer, model_max_length: int | None = None,
                       chat_template: str | None = None) -> tuple["tokenizers.Tokenizer", dict]:
    """(tokenizer.json's tokenizer, tokenizer_config.json) for a Hugging Face directory, so that AutoTokenizer
    encodes as `tok` does: any kind (byte, bpe, a released model's), its end-of-text token as eos_token, the chat
    template it carries (a pretrained tokenizer's tokenizer_config.json) or `chat_template` in its place."""
    if isinstance(tok, ByteTokenizer):
        inner, config = byte_tokenizer_as_hf(), {"eos_token": EOS_TOKEN}
    elif isinstance(tok, PretrainedTokenizer):
        inner, config = tok._tok, dict(tok.config)
    elif isinstance(tok, BPETokenizer):
        inner, config = tok._tok, {"eos_token": tok._eos_token}
    else:
        raise ValueError(f"cannot export a {type(tok).__name__} as a Hugging Face tokenizer")
    config["tokenizer_class"] = HF_TOKENIZER_CLASS  # tokenizer.json is the whole tokenizer (a slow class is not)
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    if chat_template is not None:
        config["chat_template"] = chat_template
    return inner, config
