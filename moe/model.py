"""The decoder-only Transformer shared by dense models and their sparse twins.

Block: x + Attention(norm(x)); x + FFN(norm(x)), where FFN is a DenseFFN or an MoELayer by config.
Shape legend: B batch, S sequence (new tokens), P cached slots, d model width, V vocabulary.

Generation (`Transformer.generate`, the loop in moe/generation.py) runs the same forward with a KVCache
(moe/kv_cache.py): the new tokens' keys and values are appended per layer, their positions continue each row's
prompt, and left-padded rows get an attention mask that hides their padding.

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

from moe.attention import Attention
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
        self.attn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        # layer: this block's index, so that hash routers draw one table per layer (routing.hash)
        self.ffn = MoELayer(cfg, layer) if sparse else DenseFFN(cfg.d_model, cfg.d_ff, cfg.activation, cfg.glu, cfg.ffn_bias)
        self.dropout = nn.Dropout(cfg.dropout)
        # Activation checkpointing (set by Transformer.set_activation_checkpointing): keep only this block's inputs in
        # training and recompute its activations in the backward.
        self.checkpointed = False

    def forward(self, x: Tensor, rope, token_ids: Optional[Tensor], kv: Optional[LayerKV] = None,
                mask: Optional[Tensor] = None):
        if kv is not None or mask is not None:  # generation (no autograd, eval): nothing to checkpoint
            return self._forward(x, rope, token_ids, kv, mask)
        if self.checkpointed and self.training and torch.is_grad_enabled():
            # Inside forward, so that hooks on the Block itself (FSDP2's fully_shard per block) run once, outside the
            # replayed region, as with torchtitan's checkpoint_wrapper. Non-reentrant: the forward runs with autograd,
            # so the outputs may be a (Tensor, RoutingPlan) pair whose aux losses carry gradients; preserve_rng_state
            # makes the replay draw the same jitter, random second choices and dropout masks; context_fn marks the
            # replay (routing.recompute) so routers do not repeat side effects such as counting their tokens.
            return checkpoint(self._forward, x, rope, token_ids, use_reentrant=False, preserve_rng_state=True,
                              context_fn=checkpoint_contexts)
        return self._forward(x, rope, token_ids)

    def _forward(self, x: Tensor, rope, token_ids: Optional[Tensor], kv: Optional[LayerKV] = None,
                 mask: Optional[Tensor] = None):
        x = x + self.dropout(self.attn(self.attn_norm(x), rope, kv, mask))
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoELayer):
            y, plan = self.ffn(h, token_ids)
        else:
            y, plan = self.ffn(h), None
        return x + self.dropout(y), plan


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len + cfg.position_offset, cfg.d_model) if cfg.position == "learned" else None
        self.rotary = RotaryEmbedding(cfg.dim_per_head, cfg.rope_theta) if cfg.position == "rope" else None
        sparse = set(cfg.sparse_layers)
        self.blocks = nn.ModuleList(Block(cfg, i in sparse, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
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
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions + self.cfg.position_offset)
        rope = None
        if self.rotary is not None:
            cos, sin = self.rotary(positions)  # [S, hd] or [B, S, hd]
            rope = (cos, sin) if positions.dim() == 1 else (cos[:, None], sin[:, None])  # [B, 1(H), S, hd]
        x = self.dropout(x)
        aux: dict[str, Tensor] = {}
        stats: dict[int, dict[str, Tensor]] = {}
        for i, block in enumerate(self.blocks):
            kv = cache.layers[i] if cache is not None else None
            x, plan = block(x, rope, idx, kv, mask)
            if plan is not None:
                for name, value in plan.aux_losses.items():
                    aux[name] = aux[name] + value if name in aux else value
                stats[i] = plan.stats
        logits = self.lm_head(self.norm(x))
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
