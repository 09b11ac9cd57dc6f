"""Generation: whether the forward that is running now decodes new tokens, so that routing is per token.

At training and evaluation a router may make tokens compete: a capacity (capacity_factor > 0, or a cap < 0) drops
the assignments past an expert's slots, and expert choice lets every expert pick its tokens from a group. Both
make a token's output depend on the other tokens of its batch, which generation cannot have:

- with a KV cache, each step routes only the B new tokens (one per row), so a capacity computed for T = B tokens
  would be a different capacity from the full-window forward's, and tokens would drop or survive differently;
- a batch of prompts of different lengths would route a row's tokens against the left padding and the other
  prompts, so a prompt would not continue as it does alone.

So while `generating()` is true (moe.generation sets it around every forward of `generate`, with and without the
cache), routers route each token on its own:
- token choice with a capacity (topk, sinkhorn, bias_balanced): dropless, every token keeps its k choices;
- expert choice: its evaluation fallback to token choice (each token its top round(capacity_factor * k) experts
  by score, weighted by those scores), which the router already uses at evaluation for groups too small to
  choose from; at batch 1 in per_position mode that is what evaluation does anyway. Generation therefore does not
  reproduce expert choice's batch competition (which is not causal in ec_mode=batch and couples the rows of a
  batch in per_position mode), and says so in its docstring;
- hash, BASE (greedy top-1 at evaluation) and sinkhorn's evaluation top-k are per token already.

Routers also return no balancing loss and no routing statistics while generating (routing.topk.standard_losses,
routing.stats.routing_stats): nothing trains on or logs them, the loss's all-reduce over a data-parallel group
would make a rank that generates alone wait for the others, and they were a third of a decode step's routing time.

A per-thread flag (routing.thread_flag), like routing.recompute.
"""
from __future__ import annotations

import contextlib

from routing.thread_flag import ThreadFlag

_GENERATING = ThreadFlag()


def generating() -> bool:
    """True while a generation forward runs on this thread: route every token alone, without capacity."""
    return _GENERATING.is_set()


def generation() -> contextlib.AbstractContextManager:
    """Marks the forwards run inside it as decoding: routers drop no token and make no token compete."""
    return _GENERATING.set()


def routing_capacity_factor(cfg, training: bool) -> float:
    """The capacity factor a token-choice router applies now: 0 (dropless) while generating; otherwise
    cfg.eval_capacity_factor at evaluation when it is set, else cfg.capacity_factor."""
    return 0.0 if generating() else cfg.capacity_factor_at(training)
