"""The decoder-only Transformer shared by dense models and their sparse twins.

Block: x + Attention(norm(x)); x + FFN(norm(x)), where FFN is a DenseFFN or an MoELayer by config.
Shape legend: B batch, S sequence (new tokens), P cached slots, d model width, V vocabulary.

Generation (`Transformer.generate`, the loop in moe/generation.py) runs the same forward with a KVCache
(moe/kv_cache.py): the new tokens' keys and values are appended per layer, their positions continue each row's
prompt, and left-padded rows get an attention mask that hides their padding.

Family options (moe.config): Gemma scales the embeddings by sqrt(d), norms with (1 + w), adds post-branch norms
("sandwich": x + norm(attn(norm(x)))), mixes local (sliding-window) and global blocks with a RoPE base per kind
and soft-caps its logits; BLOOM norms the embeddings and uses ALiBi instead of positions. Each block takes the
rotary table and the mask of its kind (moe.attention_masks).

Activation checkpointing (`Transformer.set_activation_checkpointing`) is a run-time choice, not a ModelConfig field:
it trades compute for memory and leaves the weights, the outputs and the gradients as they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moe.alibi import alibi_slopes
from moe.attention import Attention
from moe.attention_masks import block_masks
from moe.config import ModelConfig
from moe.experts import Experts
from moe.ffn import DenseFFN
from moe.generation import generate
from moe.kv_cache import KVCache, LayerKV, positions_and_mask
from moe.layer import MoELayer
from moe.norms import RMSNorm, make_norm
from moe.rope import RotaryEmbedding
from routing.recompute import checkpoint_contexts


@dataclass
class ModelOutput:
    logits: Tensor  # [B, S, V]
    loss: Optional[Tensor] = None  # mean next-token cross-entropy when targets were given (no aux losses)
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # name -> sum over sparse layers, already scaled
    stats: dict[int, dict[str, Tensor]] = field(default_factory=dict)  # sparse layer index -> routing statistics

    @property
    def total_loss(self) -> Tensor:
        """What training minimises: the language-model loss plus every auxiliary loss."""
        assert self.loss is not None, "total_loss needs targets"
        return self.loss + sum(self.aux_losses.values(), torch.zeros((), device=self.loss.device))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, sparse: bool, layer: int = 0):
        super().__init__()
        norm = lambda: make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_unit_offset)  # noqa: E731
        self.attn_norm = norm()
        self.attn = Attention(cfg)
        self.ffn_norm = norm()
        # Gemma's post-branch norms (post_attention_layernorm, post_feedforward_layernorm); None elsewhere
        self.attn_post_norm = norm() if cfg.post_norms else None
        self.ffn_post_norm = norm() if cfg.post_norms else None
        self.kind = "L" if cfg.is_local(layer) else "G"  # local (sliding window) or global attention
        # layer: this block's index, so that hash routers draw one table per layer (routing.hash)
        self.ffn = MoELayer(cfg, layer) if sparse else DenseFFN(cfg.d_model, cfg.d_ff, cfg.activation, cfg.glu, cfg.ffn_bias)
        self.dropout = nn.Dropout(cfg.dropout)
        # Activation checkpointing (set by Transformer.set_activation_checkpointing): keep only this block's inputs in
        # training and recompute its activations in the backward.
        self.checkpointed = False

    def forward(self, x: Tensor, rope, token_ids: Optional[Tensor], kv: Optional[LayerKV] = None,
                mask: Optional[Tensor] = None):
        if self.checkpointed and kv is None and self.training and torch.is_grad_enabled():
            # Inside forward, so that hooks on the Block itself (FSDP2's fully_shard per block) run once, outside the
            # replayed region, as with torchtitan's checkpoint_wrapper. Non-reentrant: the forward runs with autograd,
            # so the outputs may be a (Tensor, RoutingPlan) pair whose aux losses carry gradients; preserve_rng_state
            # makes the replay draw the same jitter, random second choices and dropout masks; context_fn marks the
            # replay (routing.recompute) so routers do not repeat side effects such as counting their tokens.
            # A mask (sliding window, ALiBi) is an input like x; generation (kv) has no autograd to save.
            return checkpoint(self._forward, x, rope, token_ids, None, mask, use_reentrant=False,
                              preserve_rng_state=True, context_fn=checkpoint_contexts)
        return self._forward(x, rope, token_ids, kv, mask)

    def _forward(self, x: Tensor, rope, token_ids: Optional[Tensor], kv: Optional[LayerKV] = None,
                 mask: Optional[Tensor] = None):
        a = self.attn(self.attn_norm(x), rope, kv, mask)
        if self.attn_post_norm is not None:
            a = self.attn_post_norm(a)
        x = x + self.dropout(a)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoELayer):
            y, plan = self.ffn(h, token_ids)
        else:
            y, plan = self.ffn(h), None
        if self.ffn_post_norm is not None:
            y = self.ffn_post_norm(y)
        return x + self.dropout(y), plan


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len + cfg.position_offset, cfg.d_model) if cfg.position == "learned" else None
        # BLOOM's word_embeddings_layernorm; None elsewhere
        self.embed_norm = (make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_unit_offset) if cfg.embed_norm
                           else None)
        self.rotary, self.rotary_local = rotary_tables(cfg)
        sparse = set(cfg.sparse_layers)
        self.blocks = nn.ModuleList(Block(cfg, i in sparse, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_unit_offset)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.activation_checkpointing = 0  # every n-th block checkpointed; 0 off (set_activation_checkpointing)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def set_activation_checkpointing(self, every: int) -> None:
        """Recompute block activations in the backward instead of keeping them: 0 off, 1 every block, n the blocks
        i with i % n == 0. Applies only to training forwards with autograd on (evaluation and generation are
        unchanged); loss, aux losses, routing statistics, router state and gradients are those of every = 0."""
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"activation checkpointing every={every!r} must be an int >= 0 "
                             f"(0 off, 1 every block, n every n-th block)")
        for i, block in enumerate(self.blocks):
            block.checkpointed = every > 0 and i % every == 0
        self.activation_checkpointing = every

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # GPT-2: residual output projections scaled by 1/sqrt(2L) so the residual stream's variance stays put.
        out_std = std / math.sqrt(2 * self.cfg.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                residual_out = name.endswith(("o_proj", "down"))
                nn.init.normal_(module.weight, 0.0, out_std if residual_out else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Experts):
                module.reset_parameters(std, down_std=out_std)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.reset_parameters()

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None, *, cache: Optional[KVCache] = None,
                pad: Optional[Tensor] = None) -> ModelOutput:
        """idx [B, S] -> logits [B, S, V] (and the loss for targets [B, S]).

        cache: idx are the next S tokens after the cache's filled slots; their keys and values are appended.
        pad [B] long: row b is left-padded by pad[b] slots (positions start at its first real token, the padding
        is masked); with a cache, the cache holds the padding instead (KVCache(pad=...)).
        """
        B, S = idx.shape
        past = 0
        if cache is not None:
            if pad is not None:
                raise ValueError("pass the left padding to the KVCache (KVCache(..., pad=pad)), not to forward")
            cache.reserve(S)  # refuses, naming the cache's capacity, before a layer writes
            past, pad = cache.length, cache.pad
        elif S > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {S} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        # positions [S] (or [B, S] for padded rows); mask None unless padding or a cache needs one
        positions, mask = positions_and_mask(pad, past, S, idx.device)
        x = self.embed(idx)
        if self.cfg.embed_scale:  # Gemma: sqrt(d) as a tensor of the embedding's dtype, as transformers rounds it
            x = x * torch.tensor(self.cfg.d_model ** 0.5, dtype=x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions + self.cfg.position_offset)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        ropes = {"G": _rope(self.rotary, positions)}  # the rotary table of each kind of block
        ropes["L"] = ropes["G"] if self.rotary_local is self.rotary else _rope(self.rotary_local, positions)
        slopes = alibi_slopes(self.cfg.n_head, idx.device) if self.cfg.position == "alibi" else None
        masks = block_masks(mask, window=self.cfg.sliding_window, slopes=slopes, past=past, new=S, device=idx.device)
        x = self.dropout(x)
        aux: dict[str, Tensor] = {}
        stats: dict[int, dict[str, Tensor]] = {}
        for i, block in enumerate(self.blocks):
            kv = cache.layers[i] if cache is not None else None
            x, plan = block(x, ropes[block.kind], idx, kv, masks[block.kind])
            if plan is not None:
                for name, value in plan.aux_losses.items():
                    aux[name] = aux[name] + value if name in aux else value
                stats[i] = plan.stats
        logits = self.lm_head(self.norm(x))
        if self.cfg.logit_softcap is not None:  # Gemma 2: c * tanh(logits / c)
            logits = torch.tanh(logits / self.cfg.logit_softcap) * self.cfg.logit_softcap
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return ModelOutput(logits=logits, loss=loss, aux_losses=aux, stats=stats)

    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, eos_id: Optional[int] = None, *,
                 attention_mask: Optional[Tensor] = None, use_cache: bool = True, on_token=None) -> Tensor:
        """Continues idx [B, S] (left-padded when attention_mask [B, S] marks padding with 0) by max_new_tokens;
        temperature 0 is greedy. With the KV cache by default; use_cache=False re-runs the window for every token.
        See moe.generation.generate for the rules (routing, padding, max_seq_len, eos)."""
        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                        eos_id=eos_id, attention_mask=attention_mask, use_cache=use_cache, on_token=on_token)


def rotary_tables(cfg: ModelConfig) -> tuple[Optional[RotaryEmbedding], Optional[RotaryEmbedding]]:
    """(global blocks' RoPE table, local blocks' table): None without RoPE; the local one is the global one
    unless model.rope_local_theta gives local blocks their own base (Gemma 3) or model.rope_linear_factor scales
    the global blocks' positions only (Gemma 3 4B+). Buffers derived from the config, so a model built on the
    meta device rebuilds them with this."""
    if cfg.position != "rope":
        return None, None
    factor = cfg.rope_linear_factor or 1.0
    table = RotaryEmbedding(cfg.dim_per_head, cfg.rope_theta, factor)
    local = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
    if local == cfg.rope_theta and factor == 1.0:
        return table, table
    return table, RotaryEmbedding(cfg.dim_per_head, local)


def _rope(table: Optional[RotaryEmbedding], positions: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """cos, sin [S, hd], or [B, 1(H), S, hd] for per-row positions [B, S]; None without RoPE."""
    if table is None:
        return None
    cos, sin = table(positions)
    return (cos, sin) if positions.dim() == 1 else (cos[:, None], sin[:, None])
