"""A `tokenizers.Tokenizer` rebuilt from a GGUF file's tokenizer.ggml.* metadata.

Supported: tokenizer.ggml.model = "gpt2", byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM, ...): the vocabulary
(tokenizer.ggml.tokens), the merges (tokenizer.ggml.merges), control tokens (token_type 3) as special added
tokens and user-defined ones (token_type 4) as plain added tokens, and the pre-tokenizer that
tokenizer.ggml.pre names (the split regex its merges were learned with).

Also tokenizer.ggml.model = "llama", SentencePiece-style (Llama 1/2, Gemma): tokens with scores
(tokenizer.ggml.scores) and types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte <0xXX>).
llama.cpp's SPM tokenizer merges, again and again, the adjacent pair of symbols whose concatenation is a token
of the highest score (the leftmost of equals), then spells a symbol that is not a token as its UTF-8 bytes. A
BPE whose merges are every split (left, right) of every token, ranked by the token's score, merges the same
pairs in the same order: that is the tokenizer built here (byte fallback on, spaces as "▁", a "▁" in front of
the text and after each special token when tokenizer.ggml.add_space_prefix, llama.cpp's default, is true;
Gemma writes it false). Other
models ("t5", ...) are not rebuilt: the reader returns no tokenizer and says so.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import tokenizers

    from upcycle.gguf_reader import GGUFFile

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's visible space, "▁"

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> how text is split before merging (llama.cpp's llama-vocab.cpp pre-tokenizer types).
PRE_TOKENIZERS = {
    "default": "gpt2", "gpt-2": "gpt2", "gpt2": "gpt2",
    "smollm": "digits+gpt2",  # SmolLM/SmolLM2: each digit alone, then GPT-2's split
    "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3", "smaug-bpe": "llama3", "dbrx": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2",
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level BPE vocabularies are spelled in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _pre_tokenizer(kind: str):
    from tokenizers import Regex, pre_tokenizers

    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    split = {"llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}[kind]
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def build_bpe_tokenizer(tokens: list[str], merges: list[str], token_types: Optional[list[int]],
                        pre: str = "default") -> tuple["tokenizers.Tokenizer", Optional[str]]:
    """A byte-level BPE tokenizer from llama.cpp-style vocabulary lists; returns (tokenizer, note or None)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, t in enumerate(tokens):
        # A token spelled outside the byte alphabet (a raw special token) is respelled so the model accepts it.
        vocab.setdefault(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")), i)
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"tokenizer.ggml.merges has a malformed merge {m!r}; expected 'left right'")
        pairs.append((parts[0], parts[1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    note = None
    kind = PRE_TOKENIZERS.get(pre)
    if kind is None:
        note = (f"tokenizer.ggml.pre={pre!r} is not known here; text is split GPT-2 style, which may tokenize some "
                f"text differently from llama.cpp (known: {sorted(PRE_TOKENIZERS)})")
        kind = "gpt2"
    tok.pre_tokenizer = _pre_tokenizer(kind)
    tok.decoder = decoders.ByteLevel()
    types = token_types or []
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
               if ty == CONTROL and set(t) <= alphabet]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    return tok, note


def build_spm_tokenizer(tokens: list[str], scores: list[float], token_types: Optional[list[int]],
                        add_space_prefix: bool = True) -> "tokenizers.Tokenizer":
    """A SentencePiece-style tokenizer (llama.cpp's "llama" vocabulary) from its token list, scores and types."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    if len(scores) != len(tokens):
        raise ValueError(f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    types = list(token_types) if token_types is not None else [NORMAL] * len(tokens)
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    ranked = []  # (-score of the merged token, its id, left id): the order llama.cpp merges in
    for t, i in vocab.items():
        if types[i] not in (NORMAL, USER_DEFINED) or len(t) < 2:
            continue
        for cut in range(1, len(t)):
            left, right = t[:cut], t[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[i]), i, vocab[left], left, right))
    ranked.sort()
    unk = next((t for t, ty in zip(tokens, types) if ty == UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(left, right) for *_, left, right in ranked], unk_token=unk,
                               byte_fallback=True, fuse_unk=True))
    # Spaces as "▁"; with the prefix, a "▁" before each stretch of text (llama.cpp prepends one to the text and to
    # every stretch after a special token; tokenizers normalizes each stretch between added tokens alone).
    replace = normalizers.Replace(" ", SPACE)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if add_space_prefix else replace
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    return tok


def gguf_tokenizer(f: "GGUFFile") -> tuple[Optional["tokenizers.Tokenizer"], dict[str, str], Optional[str], Optional[str]]:
    """(tokenizer or None, special tokens by name, chat template, note) from a GGUF file's metadata."""
    model = f.field("tokenizer.ggml.model", None)
    template = f.field("tokenizer.chat_template", None)
    if model is None:
        return None, {}, template, "the file carries no tokenizer (no tokenizer.ggml.model)"
    tokens = f.field("tokenizer.ggml.tokens", None)
    if tokens is None:
        raise ValueError(f"{f.path.name}: tokenizer.ggml.tokens is missing although tokenizer.ggml.model={model!r}")
    special: dict[str, str] = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):
        i: Any = f.field(f"tokenizer.ggml.{key}", None)
        if i is not None:
            if not 0 <= int(i) < len(tokens):
                raise ValueError(f"{f.path.name}: tokenizer.ggml.{key}={i} is outside the vocabulary of {len(tokens)}")
            special[name] = tokens[int(i)]
    if model == "llama":
        scores = f.field("tokenizer.ggml.scores", None)
        if scores is None:
            raise ValueError(f"{f.path.name}: tokenizer.ggml.scores is missing; a 'llama' (SentencePiece-style) "
                             f"tokenizer needs the score of every token")
        tok = build_spm_tokenizer(list(tokens), list(scores), f.field("tokenizer.ggml.token_type", None),
                                  bool(f.field("tokenizer.ggml.add_space_prefix", True)))
        return tok, special, template, None
    if model != "gpt2":
        return None, special, template, (f"tokenizer.ggml.model={model!r} is not rebuilt (supported: 'gpt2', "
                                         f"byte-level BPE, and 'llama', SentencePiece-style); the checkpoint is "
                                         f"written without a tokenizer")
    merges = f.field("tokenizer.ggml.merges", None)
    if merges is None:
        raise ValueError(f"{f.path.name}: tokenizer.ggml.merges is missing; a 'gpt2' (BPE) tokenizer needs its merges")
    tok, note = build_bpe_tokenizer(list(tokens), list(merges), f.field("tokenizer.ggml.token_type", None),
                                    f.field("tokenizer.ggml.pre", "default"))
    return tok, special, template, note
