"""Autoregressive generation: a batch of prompts -> greedy or sampled continuations, with a KV cache.

Shape legend: B batch rows, S prompt width (the longest prompt; shorter ones are left-padded), n new tokens,
V vocabulary, M = model.max_seq_len.

With the cache (use_cache=True, the default) the prompts run through the model once (the prefill), then each
step runs only the B new tokens against the cached keys and values (moe.kv_cache). Without it every step re-runs
the whole window, the old path, kept for the equality tests and the benchmark. Both paths give the same tokens:

- Routing. Every forward of `generate` runs under routing.generation.generation(): each token is routed alone,
  without capacity (dropless token choice; expert choice takes its per-token fallback). So a step that routes
  B tokens routes them as the full-window forward does, and padding never takes a real token's expert slot.
- Padding. Prompts of different lengths are left-padded (attention_mask 0 on the padding, or `left_pad`): each
  row's positions start at its first real token (RoPE rotations, learned positions with model.position_offset)
  and the mask hides its padding, so a row continues as its prompt would alone.
- Past max_seq_len. The cache holds at most M slots, the positions the model was trained on. When a row's
  window is full, the remaining steps fall back to the no-cache path: re-run the last M tokens with positions
  from 0, as `idx[:, -M:]` always did. So the output equals the no-cache path at any length; only the steps past
  M are as slow as it is. A prompt longer than M starts in that fallback.
- The model runs in eval mode during generation (dropout off; the mode is restored afterwards).
- eos_id: a row that has produced it repeats it; generation stops when every row has.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
from torch import Tensor

from moe.kv_cache import KVCache
from routing.generation import generation

if TYPE_CHECKING:
    from moe.model import Transformer


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0,
             device: Optional[torch.device | str] = None) -> tuple[Tensor, Tensor]:
    """Token lists of any lengths -> (idx [B, S] long, each prompt right-aligned after pad_id padding;
    attention_mask [B, S] long, 1 on the prompt's tokens and 0 on the padding)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (encode an empty prompt as [eos_id])")
    S = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), S), dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, S - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[b, S - len(p):] = 1
    return idx.to(device), mask.to(device)


def padding_of(attention_mask: Tensor, shape: torch.Size) -> Tensor:
    """attention_mask [B, S] (1 real, 0 padding, padding on the left only) -> pad [B] long, the padding per row."""
    if attention_mask.shape != shape:
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not match the prompts "
                         f"idx {tuple(shape)}")
    m = attention_mask.long()
    # Left padding: each row is 0...0 1...1, so the mask never decreases along a row and has a 1 at the end.
    if not bool(((m == 0) | (m == 1)).all()) or bool((m[:, 1:] < m[:, :-1]).any()) or bool((m[:, -1] == 0).any()):
        raise ValueError("attention_mask must be 1 on each prompt's tokens and 0 on its padding, with the padding on "
                         "the left (right-aligned prompts, as moe.generation.left_pad builds) and at least one token "
                         "per row")
    return shape[1] - m.sum(dim=1)


def next_token(logits: Tensor, temperature: float, top_k: Optional[int],
               generator: Optional[torch.Generator]) -> Tensor:
    """logits [B, V] fp32 -> [B, 1]: the argmax for temperature <= 0, else a sample of the tempered top-k."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)


def window_logits(model: "Transformer", idx: Tensor, pad: Optional[Tensor]) -> Tensor:
    """The no-cache step: the last position's logits [B, V] of the window idx[:, -M:], positions from its start."""
    M = model.cfg.max_seq_len
    cut = max(0, idx.shape[1] - M)
    if pad is not None and cut:
        pad = (pad - cut).clamp(min=0)  # the window drops the oldest slots, padding first
    return model(idx[:, cut:], pad=pad).logits[:, -1].float()


@torch.no_grad()
def generate(model: "Transformer", idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, generator: Optional[torch.Generator] = None, eos_id: Optional[int] = None,
             attention_mask: Optional[Tensor] = None, use_cache: bool = True,
             on_token: Optional[Callable[[Tensor], None]] = None) -> Tensor:
    """Continues idx [B, S] by up to max_new_tokens -> [B, S + n], the prompts (padding included) then the new
    tokens. attention_mask [B, S]: 0 on the left padding of shorter prompts (None: no padding). on_token(tokens
    [B, 1]) is called as each step's tokens are chosen (streaming, or timing the first token)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    pad = padding_of(attention_mask, idx.shape) if attention_mask is not None else None
    if pad is not None and not bool(pad.any()):
        pad = None  # nothing padded: the unpadded path needs no mask (and no host check per step)
    M = model.cfg.max_seq_len
    was_training = model.training
    model.eval()
    try:
        with generation():
            cache = None
            if max_new_tokens == 0:
                return idx
            if use_cache and idx.shape[1] <= M:
                # Slots for the prompt and every new token but the last, which is never fed back.
                cache = KVCache(model.cfg, min(idx.shape[1] + max_new_tokens - 1, M), pad=pad)
                logits = model(idx, cache=cache).logits[:, -1].float()
            else:
                logits = window_logits(model, idx, pad)
            finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device) if eos_id is not None else None
            for step in range(max_new_tokens):
                nxt = next_token(logits, temperature, top_k, generator)  # [B, 1]
                if finished is not None:
                    nxt = nxt.masked_fill(finished, eos_id)  # a finished row repeats its eos
                    finished = finished | (nxt == eos_id)
                idx = torch.cat([idx, nxt], dim=1)
                if on_token is not None:
                    on_token(nxt)
                if step == max_new_tokens - 1 or (finished is not None and bool(finished.all())):
                    break
                if cache is not None and cache.length < cache.capacity:
                    logits = model(nxt, cache=cache).logits[:, -1].float()
                else:
                    cache = None  # full (or never used): re-run the window, as the no-cache path does
                    logits = window_logits(model, idx, pad)
            return idx
    finally:
        model.train(was_training)
