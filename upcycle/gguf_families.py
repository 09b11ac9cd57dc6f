"""GGUF metadata of llama.cpp's gemma, gemma2, gemma3 and bloom architectures -> our ModelConfig.

What llama.cpp keeps in code rather than in the file, and how it is taken here (llama.cpp's llama-model.cpp):
- Gemma's attention scale: 1/sqrt(key_length), except the 27B models (gemma2 with 46 blocks, gemma3 with 62),
  whose query_pre_attn_scalar is d_model / head_count; {arch}.attention.scale, when a file has it, wins.
- The local/global pattern: gemma2 alternates (local first, "LG"), gemma3 has five local blocks then a global
  one ("LLLLLG"); {arch}.attention.sliding_window_pattern (a period n: n - 1 local then one global; or one
  flag per block, true for local) wins.
- {arch}.rope.scaling.type linear (Gemma 3 4B+: factor 8) scales the global blocks only; llama.cpp keeps the
  local blocks unscaled.
- Gemma 3's local RoPE base: {arch}.rope.freq_base_swa, else llama.cpp's fixed 10000 (rope.freq_base is the
  global blocks').
- Norm weights are stored as 1 + w (the key map's `minus1`); embeddings are stored unscaled (sqrt(d) at run time).
- BLOOM's converter writes the embedding a second time as `output.weight`; an exact copy is read as a tied head.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from moe.config import ModelConfig
from upcycle.hf_families import pattern_of
from upcycle.keymaps import KeyMap
from upcycle.keymaps_families import GGUF_BLOOM, GGUF_GEMMA, GGUF_GEMMA2

if TYPE_CHECKING:
    from upcycle.gguf_reader import GGUFFile

# architecture -> (key map, what the reader notes about it)
FAMILY_ARCHS: dict[str, tuple[KeyMap, str]] = {
    "gemma": (GGUF_GEMMA, "Gemma 1"), "gemma2": (GGUF_GEMMA2, "Gemma 2"), "gemma3": (GGUF_GEMMA2, "Gemma 3 text"),
    "bloom": (GGUF_BLOOM, "BLOOM"),
}
# llama.cpp architectures that are not causal decoders: named in the refusal as out of scope
ENCODER_ARCHS = {name: "encoder" for name in ("bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert",
                                               "jina-bert-v2", "jina-bert-v3", "eurobert", "t5encoder")}
ENCODER_ARCHS.update({"t5": "encoder-decoder model"})
_LARGE_GEMMA = {"gemma2": 46, "gemma3": 62}  # block counts of the 27B models (llama.cpp's LLM_TYPE_27B)
_DEFAULT_PATTERN = {"gemma2": "LG", "gemma3": "LLLLLG"}


def _pattern(f: "GGUFFile", arch: str, n_layer: int) -> str:
    value: Any = f.field(f"{arch}.attention.sliding_window_pattern", None)
    if value is None:
        return _DEFAULT_PATTERN[arch]
    if isinstance(value, (list, tuple)):
        if len(value) != n_layer:
            raise ValueError(f"{f.path.name}: {arch}.attention.sliding_window_pattern lists {len(value)} flags for "
                             f"{n_layer} blocks")
        return pattern_of(["L" if v else "G" for v in value])
    n = int(value)
    return "L" if n == 0 else "L" * (n - 1) + "G"  # llama.cpp: block i is local when i % n < n - 1


def _gemma(f: "GGUFFile", arch: str, base: dict) -> tuple[ModelConfig, list[str]]:
    a, notes = arch, []
    later = arch != "gemma"
    d, heads, hd = base["d_model"], base["n_head"], base["head_dim"] or base["d_model"] // base["n_head"]
    scale = f.field(f"{a}.attention.scale", None)
    if scale is None and later:
        large = base["n_layer"] == _LARGE_GEMMA[arch]
        scale = (d / heads) ** -0.5 if large else hd ** -0.5
        notes.append(f"{arch}: attention scale 1/sqrt({d / heads if large else hd:g}) (query_pre_attn_scalar is not "
                     f"stored in GGUF; llama.cpp's rule by model size)")
    pattern = _pattern(f, a, base["n_layer"]) if later else "G"
    window = f.field(f"{a}.attention.sliding_window", None)
    if "L" in pattern and window is None:
        raise ValueError(f"{f.path.name}: metadata field '{a}.attention.sliding_window' is missing; a {arch} model "
                         f"with local blocks needs it")
    theta = float(f.field(f"{a}.rope.freq_base", 10000.0))
    local_theta = float(f.field(f"{a}.rope.freq_base_swa", 10000.0)) if arch == "gemma3" else None
    cfg = ModelConfig(
        **base, activation="gelu_tanh", glu=True, norm="rmsnorm",
        norm_eps=float(f.field(f"{a}.attention.layer_norm_rms_epsilon")), position="rope", rope_theta=theta,
        attn_bias="none", ffn_bias=False, embed_scale=True, norm_unit_offset=True, qk_norm=arch == "gemma3",
        post_norms=later, attention_pattern=pattern, sliding_window=int(window) if "L" in pattern else None,
        rope_local_theta=local_theta if "L" in pattern and local_theta != theta else None,
        attn_scale=float(scale) if scale is not None else None,
        attn_softcap=_opt_float(f.field(f"{a}.attn_logit_softcapping", None)),
        logit_softcap=_opt_float(f.field(f"{a}.final_logit_softcapping", None)),
    )
    return cfg, notes


def _opt_float(value: Any) -> float | None:
    return None if value is None or float(value) == 0 else float(value)


def _bloom(f: "GGUFFile", base: dict) -> tuple[ModelConfig, list[str]]:
    notes = []
    if not base["tie_embeddings"] and torch.equal(f.get("output.weight"), f.get("token_embd.weight")):
        base = {**base, "tie_embeddings": True}
        notes.append("bloom: output.weight is a copy of token_embd.weight (llama.cpp's converter duplicates it); "
                     "read as a tied head")
    cfg = ModelConfig(
        **base, activation="gelu_tanh", glu=False, norm="layernorm",
        norm_eps=float(f.field("bloom.attention.layer_norm_epsilon")), position="alibi", attn_bias="all",
        ffn_bias=True, embed_norm=True,
    )
    return cfg, notes


def family_config(f: "GGUFFile", arch: str, base: dict) -> tuple[ModelConfig, list[str]]:
    """base: the fields every architecture stores alike (sizes, context length, tied head)."""
    if arch == "bloom":
        return _bloom(f, base)
    return _gemma(f, arch, base)
