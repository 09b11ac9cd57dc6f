"""How an upcycled layer's new router starts: random normal rows, made token-dependent by calibration.

Shape legend: B x S calibration token ids, T = B*S calibration tokens, d model width, E experts,
R distinct router rows (E / G: the G experts of a granular virtual group share one row).

  normal     rows ~ N(0, std^2), std = 0.02: Sparse Upcycling (Komatsuzaki et al. 2023) trains a new, randomly
             initialised router, and its codebase (flaxformer's RouterWeights) draws the kernel from a normal
             with stddev 2e-2.
  mean_free  (the default when calibration tokens are given) the same draw, then each row loses its component
             along m, the mean router input of the layer on the calibration tokens, and is scaled back to the
             norm it was drawn with (so its std stays the paper's; only one of d directions is removed).

Why mean_free. The router input of a released model is the post-attention norm's output, and it is far from
centred: on SmolLM2-135M the mean over tokens carries 18-68% of E|x|^2 (rising with depth; one channel's mean
reaches 7 at layer 29 against a per-channel spread of 0.19). A row w then scores every token with
x.w = m.w + (x - m).w, and the first term, the same for every token, decides the ranking: a couple of experts
win nearly everywhere and others receive nothing. With seed 0 and 8 experts top-2, the 107-token verification
text reached all 8 experts in only 13 of the 15 sparse layers, and over seeds 0-19 only 2 seeds reached all
experts in every layer. With the mean direction removed the logits are w.(x - m): they depend only on how the
token differs from the average, and every seed 0-19 reaches every expert of every layer (max load 1.2x the
mean instead of 2.4x; docs/upcycle_vs_dense/README.md has the table).

Exactness is untouched: under the renormalised orders the output of identical experts does not depend on the
router at all (upcycle.recipes), so any rows keep the step-0 check exact.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from moe.model import Transformer

ROUTER_INITS = ("mean_free", "normal")
ROUTER_INIT_STD = 0.02  # the default router std: flaxformer's router kernel init, which Sparse Upcycling used


@contextmanager
def ffn_inputs_seen(dense: Transformer, layers: Sequence[int], see: Callable[[int, Tensor], None]) -> Iterator[None]:
    """While active, every forward of `dense` calls see(i, h) with h [T, d] (fp32, detached), the input of block
    i's FFN (the normed hidden state an upcycled router there would see), for each i in layers. The hooks are
    removed on exit, so the model is left as it was."""
    def hook(i: int):
        def call(_module, args) -> None:
            see(i, args[0].detach().reshape(-1, args[0].shape[-1]).float())
        return call

    handles = [dense.blocks[i].ffn.register_forward_pre_hook(hook(i)) for i in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def router_input_means(dense: Transformer, tokens: Tensor, layers: Sequence[int]) -> dict[int, Tensor]:
    """Layer index -> [d] mean of that block's FFN input (the normed hidden state its router will see) over the
    calibration tokens [B, S], in fp32, from one forward of the dense model in evaluation mode."""
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise ValueError(f"calibration tokens must be a non-empty [batch, sequence] tensor of ids, got shape "
                         f"{tuple(tokens.shape)}")
    if tokens.shape[1] > dense.cfg.max_seq_len:
        raise ValueError(f"calibration sequence of {tokens.shape[1]} tokens exceeds the model's max_seq_len="
                         f"{dense.cfg.max_seq_len}; pass at most that many tokens per row")
    sums: dict[int, Tensor] = {}
    counts: dict[int, int] = {}

    def add(i: int, h: Tensor) -> None:  # h [T, d]
        sums[i] = sums[i] + h.sum(0) if i in sums else h.sum(0)
        counts[i] = counts.get(i, 0) + h.shape[0]

    mode = dense.training
    dense.eval()
    try:
        with ffn_inputs_seen(dense, layers, add):
            dense(tokens)
    finally:
        dense.train(mode)
    return {i: sums[i] / counts[i] for i in layers}


def draw_router_rows(rows: int, d: int, std: float, g: torch.Generator, mean: Optional[Tensor] = None) -> Tensor:
    """[R, d] router rows: N(0, std^2) (zeros for std = 0), then, with a mean [d], each row's component along the
    mean removed and the row scaled back to its drawn norm. Draws the same numbers whether or not mean is given,
    so `normal` and `mean_free` with one seed differ only by the projection."""
    if std == 0:
        return torch.zeros(rows, d)
    w = torch.randn(rows, d, generator=g) * std  # [R, d]
    if mean is None:
        return w
    m = mean.float().reshape(-1)
    if m.shape[0] != d:
        raise ValueError(f"the router-input mean has {m.shape[0]} entries, the router {d}")
    norm = m.norm()
    if norm == 0:  # a centred input: nothing to remove
        return w
    u = m / norm  # [d] unit mean direction
    centred = w - (w @ u)[:, None] * u[None, :]  # [R, d], orthogonal to u
    return centred * (w.norm(dim=1, keepdim=True) / centred.norm(dim=1, keepdim=True).clamp_min(1e-30))
