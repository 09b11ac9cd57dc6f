"""Activation recomputation: whether the forward that is running now is a checkpoint's replay in the backward.

Activation checkpointing (moe.model.Transformer.set_activation_checkpointing) keeps only a block's inputs and
runs the block's forward a second time in the backward to rebuild what the gradients need. The replay must give
the same tensors (torch's checkpoint restores the RNG state, so jitter, GShard's random second choice and dropout
draw the same numbers) and run the same collectives on every rank, but it must not repeat the forward's side
effects on Python or buffer state: a router that counts its selections for an update after the optimizer step
(routing.bias_balanced) would count every token twice (torchtitan's aux-loss-free balancing had this bug).
Code with such a side effect skips it when `recomputing()` is true.

The flag is set by the recompute context of `checkpoint_contexts`, which callers pass to
torch.utils.checkpoint.checkpoint(..., use_reentrant=False, context_fn=checkpoint_contexts). It is thread-local:
the autograd engine replays a checkpoint on the thread that runs the backward of that device (on CUDA a worker
thread of its own), and the context is entered on that same thread around the replay. A depth counter, so that
nested checkpoints leave it set until the outermost replay ends.
"""
from __future__ import annotations

import contextlib

from routing.thread_flag import ThreadFlag

_REPLAY = ThreadFlag()


def recomputing() -> bool:
    """True while a checkpointed forward is being replayed in the backward (this thread)."""
    return _REPLAY.is_set()


def recomputation() -> contextlib.AbstractContextManager:
    """Marks the forward run inside it as a replay: side effects guarded by `recomputing()` are skipped."""
    return _REPLAY.set()


def checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """The `context_fn` of torch.utils.checkpoint.checkpoint: (around the first forward: nothing, around the replay:
    `recomputation()`)."""
    return contextlib.nullcontext(), recomputation()
