"""The attention mask of each kind of block: global (full causal) and local (a sliding window), with ALiBi's bias.

Shape legend: B batch rows, H query heads, S new tokens, P cached slots (keys are P+S slots).

moe.kv_cache.positions_and_mask gives the base mask: None where scaled_dot_product_attention's own rule fits
(causal for a first forward, every slot for one new token), else [B or 1, 1, S, P+S] bool (causal after a past,
left padding hidden). A sliding window and ALiBi need more:
- local blocks keep key slot j for query slot i only when i - W < j <= i (W = model.sliding_window: the query and
  the W - 1 slots before it, as transformers' sliding_window_overlay and GPT-Neo's local attention). Slots, not
  positions: a left-padded row's real tokens are contiguous, so the two distances agree;
- ALiBi adds -m_h * (i - j) (moe.alibi), so its mask is a float tensor [B or 1, H, S, P+S] with -inf where the
  base mask is False.
A window that covers every key (P + S <= W) changes nothing, and the local mask is then the global one (None
stays None, so a short training sequence pays nothing for a window).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moe.alibi import alibi_bias


def causal_mask(past: int, new: int, device: torch.device) -> Tensor:
    """[1, 1, S, P+S] bool: query slot i sees key slots j <= i (what the base mask None stands for)."""
    slots = torch.arange(past, past + new, device=device)
    keys = torch.arange(past + new, device=device)
    return (keys[None, :] <= slots[:, None])[None, None]


def window_mask(mask: Optional[Tensor], window: int, past: int, new: int, device: torch.device) -> Optional[Tensor]:
    """The base mask restricted to the sliding window; None when the window covers every key."""
    if past + new <= window:
        return mask
    slots = torch.arange(past, past + new, device=device)
    keys = torch.arange(past + new, device=device)
    inside = (keys[None, :] > slots[:, None] - window)[None, None]  # [1, 1, S, P+S]
    return (mask if mask is not None else causal_mask(past, new, device)) & inside


def with_alibi(mask: Optional[Tensor], slopes: Tensor, past: int, new: int) -> Tensor:
    """The bool mask as an additive float mask carrying ALiBi's bias: [B or 1, H, S, P+S] fp32."""
    if mask is None:
        mask = causal_mask(past, new, slopes.device)
    bias = alibi_bias(slopes, past, new)[None]  # [1, H, S, P+S]
    return bias.masked_fill(~mask, float("-inf"))


def block_masks(mask: Optional[Tensor], *, window: Optional[int], slopes: Optional[Tensor], past: int, new: int,
                device: torch.device) -> dict[str, Optional[Tensor]]:
    """{"G": global blocks' mask, "L": local blocks' mask} (None: scaled_dot_product_attention's own rule)."""
    out = {"G": mask, "L": window_mask(mask, window, past, new, device) if window is not None else mask}
    if slopes is not None:
        out = {kind: with_alibi(m, slopes, past, new) for kind, m in out.items()}
    return out
