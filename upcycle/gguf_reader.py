"""GGUF files (llama.cpp's format) through the `gguf` package: metadata -> ModelConfig, tensors -> our state.

Architectures: `llama` (Llama, Mistral, SmolLM, SmolLM2 ... as llama.cpp converts them) and `qwen2`; `gemma`,
`gemma2`, `gemma3` and `bloom` through upcycle/gguf_families.py (GPT-Neo has no llama.cpp architecture: read it
from its Hugging Face directory). Encoder and encoder-decoder architectures (bert, t5, ...) are refused as out of
scope.
Tensor names follow llama.cpp (token_embd, blk.N.attn_q/k/v/output, blk.N.ffn_gate/up/down, blk.N.attn_norm,
blk.N.ffn_norm, output_norm, output); `output` absent means the head is tied to the embedding.

llama.cpp's convert_hf_to_gguf permutes the rows of Q and K for the llama architecture (its RoPE rotates
adjacent pairs, ours rotates the two halves of a head, as Hugging Face Llama does); the key map undoes that
permutation (upcycle.keymaps.llama_cpp_unpermute). qwen2 files are not permuted.

Tensor types: F32, F16 and BF16 are read directly; quantized types are dequantized to fp32 with
`gguf.quants.dequantize` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants, ...). A type the installed `gguf`
cannot dequantize raises a ValueError naming the tensor.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from moe.config import ModelConfig, MoEConfig
from upcycle.gguf_families import ENCODER_ARCHS, FAMILY_ARCHS, family_config
from upcycle.keymaps import GGUF_LLAMA, GGUF_QWEN2, KeyMap, apply_keymap
from upcycle.source import DenseSource

ARCHITECTURES: dict[str, KeyMap] = {"llama": GGUF_LLAMA, "qwen2": GGUF_QWEN2,
                                    **{arch: keymap for arch, (keymap, _) in FAMILY_ARCHS.items()}}


def _import_gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - the extra is installed in dev setups
        raise ImportError("reading GGUF files needs the `gguf` package: pip install 'switchyard-moe[upcycle]'") from None
    return gguf


class GGUFFile:
    """Metadata fields and tensors of one GGUF file (memory-mapped; tensors are dequantized on demand)."""

    def __init__(self, path: str | Path):
        gguf = _import_gguf()
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:
            raise ValueError(f"cannot read GGUF file {self.path}: {e}") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def field(self, key: str, default: Any = ...) -> Any:
        f = self.reader.fields.get(key)
        if f is None:
            if default is ...:
                raise ValueError(f"{self.path.name}: metadata field {key!r} is missing; a {self.architecture} "
                                 f"model needs it")
            return default
        return f.contents()

    @property
    def architecture(self) -> str:
        f = self.reader.fields.get("general.architecture")
        return f.contents() if f is not None else "?"

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> Tensor:
        gguf = _import_gguf()
        t = self.tensors[name]
        qtype = t.tensor_type
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        Q = gguf.GGMLQuantizationType
        if qtype == Q.F32:
            arr = np.array(t.data, dtype=np.float32)  # a copy: the file is memory-mapped read-only
        elif qtype == Q.F16:
            arr = np.asarray(t.data).view(np.float16).astype(np.float32)
        else:
            try:
                arr = gguf.quants.dequantize(t.data, qtype)
            except NotImplementedError:
                supported = sorted(q.name for q in Q if _can_dequantize(q))
                raise ValueError(f"{self.path.name}: tensor {name!r} has type {qtype.name}, which the installed "
                                 f"`gguf` package cannot dequantize; supported types: {supported}") from None
        arr = np.ascontiguousarray(arr).reshape(shape)
        return torch.from_numpy(arr.astype(np.float32, copy=False))

    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.reader.tensors:
            out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + 1
        return out


def _can_dequantize(qtype) -> bool:
    gguf = _import_gguf()
    Q = gguf.GGMLQuantizationType
    return qtype in (Q.F32, Q.F16) or qtype in getattr(gguf.quants, "_type_traits", {})


def gguf_model_config(f: GGUFFile) -> tuple[ModelConfig, KeyMap, list[str]]:
    arch = f.architecture
    if arch in ENCODER_ARCHS:
        raise ValueError(f"{f.path.name}: general.architecture={arch!r} is an {ENCODER_ARCHS[arch]}; Switchyard "
                         f"upcycles decoder-only causal language models, so it is out of scope (supported: "
                         f"{sorted(ARCHITECTURES)})")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{f.path.name}: general.architecture={arch!r} is not supported; supported: "
                         f"{sorted(ARCHITECTURES)} (GPT-Neo has no llama.cpp architecture: read its Hugging Face "
                         f"directory)")
    a = arch
    experts = f.field(f"{a}.expert_count", None)
    if experts is not None and int(experts) > 1:  # Mixtral-style files keep arch "llama" and say it here
        raise ValueError(f"{f.path.name}: {a}.expert_count={int(experts)}: a sparse Mixture-of-Experts model; only "
                         f"dense {arch} files are read")
    notes: list[str] = []
    d = int(f.field(f"{a}.embedding_length"))
    heads = int(f.field(f"{a}.attention.head_count"))
    kv = int(f.field(f"{a}.attention.head_count_kv", heads))
    head_dim = int(f.field(f"{a}.attention.key_length", d // heads))
    if int(f.field(f"{a}.attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"{f.path.name}: {a}.attention.value_length differs from key_length; not supported")
    rope_dim = int(f.field(f"{a}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"{f.path.name}: {a}.rope.dimension_count={rope_dim} rotates part of each head of "
                         f"{head_dim}; only full-head RoPE (dimension_count = head width) is supported")
    scaling = f.field(f"{a}.rope.scaling.type", "none")
    if scaling not in ("none", None, "linear"):
        raise ValueError(f"{f.path.name}: {a}.rope.scaling.type={scaling!r} is not supported; supported: 'none', "
                         f"'linear'")
    factor = float(f.field(f"{a}.rope.scaling.factor")) if scaling == "linear" else None
    factor = factor if factor != 1.0 else None
    embd = f.tensors.get("token_embd.weight")
    if embd is None:
        raise ValueError(f"{f.path.name}: tensor 'token_embd.weight' is missing; every {arch} model needs it")
    vocab = int(f.field(f"{a}.vocab_size", int(embd.shape[-1])))
    tied = "output.weight" not in f.tensors
    if arch in FAMILY_ARCHS:
        base = dict(vocab_size=vocab, n_layer=int(f.field(f"{a}.block_count")), d_model=d, n_head=heads,
                    n_kv_head=kv, head_dim=head_dim if head_dim * heads != d else None,
                    d_ff=int(f.field(f"{a}.feed_forward_length")), max_seq_len=int(f.field(f"{a}.context_length")),
                    tie_embeddings=tied, rope_linear_factor=factor, moe=MoEConfig(layers="none"))
        cfg, notes = family_config(f, arch, base)
        return cfg, ARCHITECTURES[arch], notes
    cfg = ModelConfig(
        vocab_size=vocab, n_layer=int(f.field(f"{a}.block_count")), d_model=d, n_head=heads, n_kv_head=kv,
        head_dim=head_dim if head_dim * heads != d else None, d_ff=int(f.field(f"{a}.feed_forward_length")),
        max_seq_len=int(f.field(f"{a}.context_length")), activation="silu", glu=True, norm="rmsnorm",
        norm_eps=float(f.field(f"{a}.attention.layer_norm_rms_epsilon")), position="rope",
        rope_theta=float(f.field(f"{a}.rope.freq_base", 10000.0)), attn_bias="qkv" if arch == "qwen2" else "none",
        ffn_bias=False, tie_embeddings=tied, rope_linear_factor=factor, moe=MoEConfig(layers="none"),
    )
    window = f.field(f"{a}.attention.sliding_window", None)
    if window is not None and int(window) < cfg.max_seq_len:
        notes.append(f"{a}.attention.sliding_window={window}: max_seq_len set to {window} (full causal attention "
                     f"equals sliding-window attention up to the window)")
        cfg = cfg.replace(max_seq_len=int(window))
    return cfg, ARCHITECTURES[arch], notes


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> DenseSource:
    from upcycle.gguf_tokenizer import gguf_tokenizer

    f = GGUFFile(path)
    cfg, keymap, notes = gguf_model_config(f)
    state = apply_keymap(keymap, f, cfg, dtype=dtype, where=f.path.name)
    types = f.type_counts()
    quantized = {k: v for k, v in types.items() if k not in ("F32", "F16", "BF16")}
    if quantized:
        notes.append(f"dequantized to fp32: {quantized} tensors (the MoE inherits the quantization error of the file)")
    tok, special, template, tok_note = gguf_tokenizer(f)
    if tok_note:
        notes.append(tok_note)
    name: Optional[str] = f.field("general.name", None)
    return DenseSource(config=cfg, state=state, tokenizer=tok, special_tokens=special, chat_template=template,
                       origin=f"gguf {f.architecture}" + (f" ({name})" if name else ""), notes=notes)
