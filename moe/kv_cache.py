"""The key/value cache of incremental decoding, and the positions and attention mask of left-padded rows.

Shape legend: B batch rows, G key/value heads, L cache slots (its capacity, at most model.max_seq_len), P slots
already filled, S new tokens of a forward, hd head width.

Rows are left-padded so that one step writes one slot for every row: slot j holds the j-th token of the padded
batch in each row, and row b's real tokens start at slot pad[b]. Three things follow from the padding:
- positions: slot j of row b is position j - pad[b] (RoPE rotates by it, learned positions look it up), so a
  row's tokens sit where they would sit in the prompt alone; padded slots take position 0;
- the mask: a query attends to the real slots of its row up to itself (causal), never to padding. A padded
  query attends to itself only, so its row of scores is never all -inf (which would give NaN, and NaN in one
  token reaches every other through a one-hot einsum dispatch: 0 * NaN = NaN);
- routing: the padding goes through the MoE layers as ordinary tokens, so routing must not let tokens compete
  (routing.generation: dropless, expert choice per token) or padding would take real tokens' slots.

Without padding the mask is left to scaled_dot_product_attention: causal for a first forward (P = 0), none for
one new token (it sees every filled slot), so an unpadded batch pays nothing for this.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moe.config import ModelConfig


class LayerKV:
    """One attention layer's cache: keys and values [B, G, L, hd], of which the first `length` slots are filled.

    The buffers are allocated at the first append, in the dtype and device of the keys the layer computes (under
    autocast that is the autocast dtype, not the weights')."""

    def __init__(self, capacity: int):
        self.capacity = capacity  # L
        self.keys: Optional[Tensor] = None  # [B, G, L, hd]
        self.values: Optional[Tensor] = None  # [B, G, L, hd]
        self.length = 0  # slots filled (P), the same for every row

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Writes k, v [B, G, S, hd] at slots P..P+S-1 -> the filled keys and values [B, G, P+S, hd]."""
        end = self.length + k.shape[2]
        if end > self.capacity:  # KVCache.reserve refuses this first with the user's words; here it is a bug
            raise RuntimeError(f"KV cache of {self.capacity} slots cannot take slots {self.length}..{end - 1}")
        if self.keys is None:
            B, G, _, hd = k.shape
            self.keys = k.new_empty(B, G, self.capacity, hd)
            self.values = v.new_empty(B, G, self.capacity, hd)
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Every attention layer's LayerKV for a batch, and the rows' left padding.

    cfg: the model's config (layers and max_seq_len); capacity: slots L per row, at most model.max_seq_len (a
    prompt of S tokens and n new ones need S + n - 1); pad [B] long: left padding of each row, None: none."""

    def __init__(self, cfg: ModelConfig, capacity: int, pad: Optional[Tensor] = None):
        if not 1 <= capacity <= cfg.max_seq_len:
            raise ValueError(f"a KV cache of {capacity} slots must hold between 1 and model.max_seq_len="
                             f"{cfg.max_seq_len} tokens (positions past max_seq_len were never trained)")
        self.layers = [LayerKV(capacity) for _ in range(cfg.n_layer)]
        self.capacity = capacity
        self.pad = pad if pad is not None and bool(pad.any()) else None  # one host check here, none per step

    @property
    def length(self) -> int:
        """Slots filled (P): the padded batch's tokens so far."""
        return self.layers[0].length

    def reserve(self, new: int) -> None:
        """Refuses a forward of `new` tokens that would not fit, before any layer writes."""
        if self.length + new > self.capacity:
            raise ValueError(f"{new} more tokens do not fit in the KV cache: {self.length} of {self.capacity} slots "
                             f"are filled; build the cache with a larger capacity (at most model.max_seq_len)")


def positions_and_mask(pad: Optional[Tensor], past: int, new: int,
                       device: torch.device) -> tuple[Tensor, Optional[Tensor]]:
    """Positions and attention mask of `new` tokens after `past` filled slots, for rows left-padded by pad [B].

    -> (positions: [S] long when no row is padded, else [B, S];
        mask: None when scaled_dot_product_attention's own rule fits (no padding, and P = 0 (causal) or S = 1
        (every slot)), else [B, 1, S, P+S] bool, True where a query may attend).
    """
    slots = torch.arange(past, past + new, device=device)  # [S] slot of each new token
    if pad is None:
        if past == 0 or new == 1:
            return slots, None
        keys = torch.arange(past + new, device=device)
        return slots, (keys[None, :] <= slots[:, None])[None, None]  # [1, 1, S, P+S] causal after the past
    positions = (slots[None, :] - pad[:, None]).clamp(min=0)  # [B, S]
    keys = torch.arange(past + new, device=device)  # [P+S]
    causal = keys[None, :] <= slots[:, None]  # [S, P+S]
    real = keys[None, :] >= pad[:, None]  # [B, P+S] the row's own tokens, not its padding
    itself = keys[None, :] == slots[:, None]  # [S, P+S] a padded query keeps its own slot
    mask = causal[None] & (real[:, None, :] | itself[None])  # [B, S, P+S]
    return positions, mask[:, None]
