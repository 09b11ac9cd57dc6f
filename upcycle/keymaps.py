"""Declarative key maps: how each dense family's tensors become Switchyard parameters.

A key map is a list of rules `ours <- theirs (ops)`. `{i}` stands for the layer index. The ops turn a source
tensor into ours, in order:

  t          transpose (GPT-2's Conv1D stores weights [in, out]; ours are nn.Linear [out, in])
  third:N    the N-th third along dim 0 (GPT-2's fused c_attn, llama.cpp's attn_qkv: q, k, v stacked)
  headthird:N  the N-th of q, k, v interleaved per head along dim 0 (BLOOM's query_key_value: [H, 3, hd])
  minus1     subtract 1 (llama.cpp stores Gemma's (1 + w) norm weights with the 1 added)
  unperm_q   undo llama.cpp's interleaving of Q rows (convert_hf_to_gguf permutes Q for its RoPE layout)
  unperm_k   the same for K, with the key/value head count

`{e}` in a source name stands for the expert index: the rule reads one source tensor per expert (each through the
ops) and stacks them into our [E, ...] expert bank (the MoE layouts of Mixtral and Qwen2-MoE).

`apply_keymap` expands the rules over the layers, keeps only the rules whose target the model config has
(biases, positions, an untied head), and then insists that every source tensor was used (or is on the
family's ignore list), that every parameter was filled, and that every shape fits. Each failure names the
tensor and says what was expected.

`invert_keymap` runs the same rules backwards: it is what export writes (upcycle/export.py), so a family's names
and layouts live here once, for reading and writing alike.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol

import torch
from torch import Tensor

from moe.config import ModelConfig


@dataclass(frozen=True)
class Rule:
    ours: str  # our parameter name; "{i}" is the layer index
    theirs: str  # the source tensor name; "{i}" is the layer index
    ops: tuple[str, ...] = ()  # transformations applied in order (see the module docstring)


@dataclass(frozen=True)
class KeyMap:
    family: str  # what the map reads, for messages
    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()  # regexes of source tensors that carry nothing we need (buffers, masks)


def _r(ours: str, theirs: str, *ops: str) -> Rule:
    return Rule(ours, theirs, tuple(ops))


def _norm_rules(ours: str, theirs: str) -> list[Rule]:
    return [_r(f"{ours}.weight", f"{theirs}.weight"), _r(f"{ours}.bias", f"{theirs}.bias")]


def _linear_rules(ours: str, theirs: str, *ops: str) -> list[Rule]:
    return [_r(f"{ours}.weight", f"{theirs}.weight", *ops), _r(f"{ours}.bias", f"{theirs}.bias")]


GPT2 = KeyMap(
    "gpt2",
    tuple(
        [_r("embed.weight", "wte.weight"), _r("pos_embed.weight", "wpe.weight")]
        + _norm_rules("blocks.{i}.attn_norm", "h.{i}.ln_1")
        + [_r(f"blocks.{{i}}.attn.{p}_proj.weight", "h.{i}.attn.c_attn.weight", "t", f"third:{n}") for n, p in enumerate("qkv")]
        + [_r(f"blocks.{{i}}.attn.{p}_proj.bias", "h.{i}.attn.c_attn.bias", f"third:{n}") for n, p in enumerate("qkv")]
        + _linear_rules("blocks.{i}.attn.o_proj", "h.{i}.attn.c_proj", "t")
        + _norm_rules("blocks.{i}.ffn_norm", "h.{i}.ln_2")
        + _linear_rules("blocks.{i}.ffn.up", "h.{i}.mlp.c_fc", "t")
        + _linear_rules("blocks.{i}.ffn.down", "h.{i}.mlp.c_proj", "t")
        + _norm_rules("norm", "ln_f")
        + [_r("lm_head.weight", "lm_head.weight")]
    ),
    ignore=(r"h\.\d+\.attn\.(bias|masked_bias)",),  # the causal-mask buffers older checkpoints saved
)

OPT = KeyMap(
    "opt",
    tuple(
        [_r("embed.weight", "decoder.embed_tokens.weight"), _r("pos_embed.weight", "decoder.embed_positions.weight")]
        + _norm_rules("blocks.{i}.attn_norm", "decoder.layers.{i}.self_attn_layer_norm")
        + [rule for p, q in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "out"))
           for rule in _linear_rules(f"blocks.{{i}}.attn.{p}_proj", f"decoder.layers.{{i}}.self_attn.{q}_proj")]
        + _norm_rules("blocks.{i}.ffn_norm", "decoder.layers.{i}.final_layer_norm")
        + _linear_rules("blocks.{i}.ffn.up", "decoder.layers.{i}.fc1")
        + _linear_rules("blocks.{i}.ffn.down", "decoder.layers.{i}.fc2")
        + _norm_rules("norm", "decoder.final_layer_norm")
        + [_r("lm_head.weight", "lm_head.weight")]
    ),
)

LLAMA = KeyMap(  # Llama, Mistral, Qwen2, SmolLM (the Hugging Face Llama layout)
    "llama",
    tuple(
        [_r("embed.weight", "embed_tokens.weight")]
        + [_r("blocks.{i}.attn_norm.weight", "layers.{i}.input_layernorm.weight")]
        + [rule for p in "qkvo" for rule in _linear_rules(f"blocks.{{i}}.attn.{p}_proj", f"layers.{{i}}.self_attn.{p}_proj")]
        + [_r("blocks.{i}.ffn_norm.weight", "layers.{i}.post_attention_layernorm.weight")]
        + [rule for ours, theirs in (("up", "up_proj"), ("gate", "gate_proj"), ("down", "down_proj"))
           for rule in _linear_rules(f"blocks.{{i}}.ffn.{ours}", f"layers.{{i}}.mlp.{theirs}")]
        + [_r("norm.weight", "norm.weight"), _r("lm_head.weight", "lm_head.weight")]
    ),
    ignore=(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),  # a buffer some older checkpoints saved
)

# The Llama layout without its dense MLP rules: embedding, attention, norms, head (Mixtral has no dense slot).
_LLAMA_BODY = tuple(r for r in LLAMA.rules if not r.ours.startswith("blocks.{i}.ffn."))


def _expert_rules(theirs: str, names: tuple[tuple[str, str], ...]) -> list[Rule]:
    """One rule per expert matrix: ours is the stacked bank [E, in, out], theirs one nn.Linear weight [out, in] per
    expert ({e}), hence the transpose."""
    return [_r(f"blocks.{{i}}.ffn.experts.w_{ours}", f"{theirs}.experts.{{e}}.{name}.weight", "t") for ours, name in names]


MIXTRAL = KeyMap(  # every FFN slot sparse: w1 = gate_proj, w3 = up_proj, w2 = down_proj of each expert
    "mixtral",
    _LLAMA_BODY[:1]
    + tuple([_r("blocks.{i}.ffn.router.gate.weight", "layers.{i}.block_sparse_moe.gate.weight")]
            + _expert_rules("layers.{i}.block_sparse_moe", (("gate", "w1"), ("up", "w3"), ("down", "w2"))))
    + _LLAMA_BODY[1:],
)

QWEN2_MOE = KeyMap(  # dense slots as Llama's mlp, sparse ones as router + experts + one shared expert with its gate
    "qwen2_moe",
    LLAMA.rules[:1]
    + tuple([_r("blocks.{i}.ffn.router.gate.weight", "layers.{i}.mlp.gate.weight")]
            + _expert_rules("layers.{i}.mlp", (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")))
            + [_r(f"blocks.{{i}}.ffn.shared.{ours}.weight", f"layers.{{i}}.mlp.shared_expert.{theirs}.weight")
               for ours, theirs in (("up", "up_proj"), ("gate", "gate_proj"), ("down", "down_proj"))]
            + [_r("blocks.{i}.ffn.shared_gate.weight", "layers.{i}.mlp.shared_expert_gate.weight")])
    + LLAMA.rules[1:],
)

GGUF_LLAMA = KeyMap(  # llama.cpp's names for the llama architecture (Q and K rows permuted by the converter)
    "gguf llama",
    tuple(
        [_r("embed.weight", "token_embd.weight"), _r("blocks.{i}.attn_norm.weight", "blk.{i}.attn_norm.weight")]
        + [_r("blocks.{i}.attn.q_proj.weight", "blk.{i}.attn_q.weight", "unperm_q"),
           _r("blocks.{i}.attn.k_proj.weight", "blk.{i}.attn_k.weight", "unperm_k"),
           _r("blocks.{i}.attn.v_proj.weight", "blk.{i}.attn_v.weight"),
           _r("blocks.{i}.attn.o_proj.weight", "blk.{i}.attn_output.weight")]
        + [_r("blocks.{i}.ffn_norm.weight", "blk.{i}.ffn_norm.weight"),
           _r("blocks.{i}.ffn.up.weight", "blk.{i}.ffn_up.weight"),
           _r("blocks.{i}.ffn.gate.weight", "blk.{i}.ffn_gate.weight"),
           _r("blocks.{i}.ffn.down.weight", "blk.{i}.ffn_down.weight")]
        + [_r("norm.weight", "output_norm.weight"), _r("lm_head.weight", "output.weight")]
    ),
)

GGUF_QWEN2 = KeyMap(  # llama.cpp's qwen2 architecture: q/k/v biases, and no Q/K permutation
    "gguf qwen2",
    tuple(
        [_r("embed.weight", "token_embd.weight"), _r("blocks.{i}.attn_norm.weight", "blk.{i}.attn_norm.weight")]
        + [rule for p in "qkv" for rule in _linear_rules(f"blocks.{{i}}.attn.{p}_proj", f"blk.{{i}}.attn_{p}")]
        + [_r("blocks.{i}.attn.o_proj.weight", "blk.{i}.attn_output.weight")]
        + [_r("blocks.{i}.ffn_norm.weight", "blk.{i}.ffn_norm.weight"),
           _r("blocks.{i}.ffn.up.weight", "blk.{i}.ffn_up.weight"),
           _r("blocks.{i}.ffn.gate.weight", "blk.{i}.ffn_gate.weight"),
           _r("blocks.{i}.ffn.down.weight", "blk.{i}.ffn_down.weight")]
        + [_r("norm.weight", "output_norm.weight"), _r("lm_head.weight", "output.weight")]
    ),
)


# ----------------------------------------------------------------------------------------------- ops


def llama_cpp_permute(w: Tensor, n_head: int) -> Tensor:
    """What convert_hf_to_gguf does to Q/K rows: within each head, the two rotate-half halves are interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w: Tensor, n_head: int) -> Tensor:
    """The inverse of llama_cpp_permute: back to the Hugging Face (rotate-half) layout our RoPE uses."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _third(t: Tensor, n: int, name: str) -> Tensor:
    if t.shape[0] % 3:
        raise ValueError(f"{name}: a fused q/k/v tensor needs a first dimension divisible by 3, got {tuple(t.shape)}")
    return t.chunk(3, dim=0)[n]


def _head_third(t: Tensor, n: int, heads: int, name: str) -> Tensor:
    """Rows [H * 3 * hd, ...] as [H, 3, hd, ...] (BLOOM's per-head q, k, v) -> piece n, [H * hd, ...]."""
    if t.shape[0] % (3 * heads):
        raise ValueError(f"{name}: {t.shape[0]} rows do not split into {heads} heads of q, k and v; check n_head")
    return t.reshape(heads, 3, t.shape[0] // (3 * heads), *t.shape[1:])[:, n].reshape(-1, *t.shape[1:])


def fuse_pieces(pieces: list[Tensor], kind: str, heads: int) -> Tensor:
    """The inverse of taking `third` (kind "third") or `headthird` pieces: q, k, v back into one tensor."""
    if kind == "third":
        return torch.cat(pieces, dim=0)
    return torch.stack([p.reshape(heads, -1, *p.shape[1:]) for p in pieces], dim=1).reshape(-1, *pieces[0].shape[1:])


def _unperm(t: Tensor, heads: int, name: str) -> Tensor:
    if t.shape[0] % (2 * heads):
        raise ValueError(f"{name}: {t.shape[0]} rows do not split into {heads} heads of an even width; "
                         f"check the head counts in the metadata")
    return llama_cpp_unpermute(t, heads)


def apply_ops(t: Tensor, ops: Iterable[str], cfg: ModelConfig, name: str) -> Tensor:
    for op in ops:
        if op == "t":
            t = t.t()
        elif op.startswith("third:"):
            t = _third(t, int(op.split(":")[1]), name)
        elif op.startswith("headthird:"):
            t = _head_third(t, int(op.split(":")[1]), cfg.n_head, name)
        elif op == "minus1":
            t = t - 1
        elif op == "unperm_q":
            t = _unperm(t, cfg.n_head, name)
        elif op == "unperm_k":
            t = _unperm(t, cfg.kv_heads, name)
        else:  # a typo in a key map is a bug, not a user error
            raise AssertionError(f"unknown key-map op {op!r}")
    return t


def undo_ops(t: Tensor, ops: Iterable[str], cfg: ModelConfig) -> Tensor:
    """The inverse of apply_ops for the ops that act on one tensor (undone last to first); a `third` has no
    one-tensor inverse (invert_keymap concatenates the three pieces), so it must not be among `ops`."""
    for op in reversed(tuple(ops)):
        if op == "t":
            t = t.t()
        elif op == "unperm_q":
            t = llama_cpp_permute(t, cfg.n_head)
        elif op == "unperm_k":
            t = llama_cpp_permute(t, cfg.kv_heads)
        elif op == "minus1":
            t = t + 1
        else:  # "third:N" is handled by the caller; anything else is a typo in a key map
            raise AssertionError(f"key-map op {op!r} has no one-tensor inverse")
    return t


# ----------------------------------------------------------------------------------------------- mapping


class TensorSource(Protocol):
    """Named tensors read on demand (a safetensors file, a torch pickle, a GGUF file)."""

    def keys(self) -> list[str]: ...

    def get(self, name: str) -> Tensor: ...


class DictSource:
    def __init__(self, tensors: Mapping[str, Tensor]):
        self._t = dict(tensors)

    def keys(self) -> list[str]:
        return list(self._t)

    def get(self, name: str) -> Tensor:
        return self._t[name]


def _source_name(rule: Rule, i: int | None, prefix: str, e: int | None = None) -> str:
    name = rule.theirs.format(i=i, e=e) if i is not None else rule.theirs
    # A Hugging Face head sits beside the body ("lm_head.weight"), not under its prefix ("model.").
    return name if name.startswith("lm_head.") else prefix + name


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a dense Switchyard model of this config stores, with its shape (built on the meta device)."""
    from moe.checkpoint import model_state
    from moe.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in model_state(model).items()}


def apply_keymap(
    keymap: KeyMap,
    source: TensorSource,
    cfg: ModelConfig,
    prefix: str = "",
    dtype: torch.dtype = torch.float32,
    where: str = "the checkpoint",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Tensor]:
    """Our state dict for `cfg`, read from `source` through `keymap`. `prefix` is prepended to every source
    name (e.g. "model." for a Hugging Face *ForCausalLM checkpoint)."""
    want = expected_shapes(cfg)
    tied_head = "lm_head.weight" not in want
    state: dict[str, Tensor] = {}
    used: set[str] = set()
    available = set(source.keys())
    for rule in keymap.rules:
        layers = range(cfg.n_layer) if "{i}" in rule.ours else (None,)
        for i in layers:
            ours = rule.ours.format(i=i) if i is not None else rule.ours
            theirs = _source_name(rule, i, prefix, 0)
            if ours not in want:
                continue  # a tensor this config does not have (a bias, a tied head): if the source has it, it is unexpected
            if theirs not in available and "{e}" not in rule.theirs:
                raise ValueError(
                    f"{where} has no tensor {theirs!r} (needed for {ours} of a {keymap.family} model with "
                    f"{cfg.n_layer} layers); the file is incomplete or its config does not match it"
                )
            if "{e}" in rule.theirs:  # one source tensor per expert, stacked into our bank
                names = [_source_name(rule, i, prefix, e) for e in range(cfg.moe.num_experts)]
                absent = [n for n in names if n not in available]
                if absent:
                    raise ValueError(f"{where} has no tensor {absent[0]!r} (needed for {ours} of a {keymap.family} "
                                     f"model with {cfg.moe.num_experts} experts); the config does not match the weights")
                t = torch.stack([apply_ops(source.get(n), rule.ops, cfg, n) for n in names])
                used.update(names[1:])
            else:
                t = apply_ops(source.get(theirs), rule.ops, cfg, theirs)
            if tuple(t.shape) != want[ours]:
                raise ValueError(
                    f"{where}: tensor {theirs!r} has shape {tuple(t.shape)} after mapping, but {ours} needs "
                    f"{want[ours]} for the config read beside it; the weights and the config disagree"
                )
            state[ours] = t.to(dtype).contiguous()
            used.add(theirs)
            if progress is not None:
                progress(ours)
    ignore = [re.compile(prefix.replace(".", r"\.") + p) for p in keymap.ignore]
    unused = sorted(k for k in available - used if not any(p.fullmatch(k) for p in ignore))
    heads = [_source_name(r, None, prefix) for r in keymap.rules if r.ours == "lm_head.weight"]
    for head in heads if tied_head else ():
        if head in unused:  # a tied head saved anyway: accept it only when it is the embedding
            emb = state["embed.weight"]
            head_t = source.get(head).to(dtype)
            if head_t.shape != emb.shape or not torch.equal(head_t, emb):
                raise ValueError(f"{where}: the config ties the output head to the embedding, but {head!r} differs "
                                 f"from the embedding; set tie_word_embeddings=false in its config")
            unused.remove(head)
    if unused:
        raise ValueError(
            f"{where} has tensor(s) a {keymap.family} model of this config does not use: {unused[:8]}"
            f"{' ...' if len(unused) > 8 else ''}; the config does not match the weights (biases, layer count, "
            f"an untied head) or the architecture has parts Switchyard does not support"
        )
    missing = sorted(set(want) - set(state))
    assert not missing, f"key map {keymap.family} leaves {missing} unfilled"
    return state


def invert_keymap(keymap: KeyMap, state: Mapping[str, Tensor], cfg: ModelConfig, prefix: str = "") -> dict[str, Tensor]:
    """The source tensors that `apply_keymap(keymap, ., cfg, prefix)` reads back as `state` (our names -> theirs):
    every rule run backwards, its ops undone last to first. A transpose is its own inverse, the llama.cpp
    permutation is re-applied, the three `third:N` (`headthird:N`) pieces of a fused tensor are concatenated in N
    order (interleaved per head), and a
    stacked expert bank ({e}) is split into one tensor per expert.

    Rules whose target the state lacks are skipped (a bias this config does not have, a tied head, a dense slot's
    MLP in a sparse layer), exactly as apply_keymap skips them. A tensor of `state` that no rule maps is a part the
    family's layout has no place for: it is named in a ValueError rather than left out of the file."""
    out: dict[str, Tensor] = {}
    # theirs -> (ops before the third + the third's kind, pieces)
    fused: dict[str, tuple[tuple[str, ...], dict[int, Tensor]]] = {}
    used: set[str] = set()
    for rule in keymap.rules:
        for i in range(cfg.n_layer) if "{i}" in rule.ours else (None,):
            ours = rule.ours.format(i=i) if i is not None else rule.ours
            if ours not in state:
                continue
            used.add(ours)
            t = state[ours]
            if "{e}" in rule.theirs:  # ours [E, ...]: expert e's tensor is row e, through the inverse ops
                for e in range(t.shape[0]):
                    out[_source_name(rule, i, prefix, e)] = undo_ops(t[e], rule.ops, cfg)
                continue
            theirs = _source_name(rule, i, prefix)
            thirds = [n for n, op in enumerate(rule.ops) if op.startswith(("third:", "headthird:"))]
            if not thirds:
                out[theirs] = undo_ops(t, rule.ops, cfg)
                continue
            at = thirds[0]  # forward: ops[:at], then take a third, then ops[at + 1:]
            before, piece = rule.ops[:at], undo_ops(t, rule.ops[at + 1:], cfg)
            kind, n = rule.ops[at].split(":")
            fused.setdefault(theirs, (before + (kind,), {}))[1][int(n)] = piece
    for theirs, (before, pieces) in fused.items():
        assert sorted(pieces) == [0, 1, 2], f"key map {keymap.family}: {theirs} has pieces {sorted(pieces)} of 3"
        whole = fuse_pieces([pieces[n] for n in range(3)], before[-1], cfg.n_head)
        out[theirs] = undo_ops(whole, before[:-1], cfg)
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"the {keymap.family} layout has no place for {left[:8]}{' ...' if len(left) > 8 else ''}; "
                         f"this model has parts the format cannot hold")
    return out
