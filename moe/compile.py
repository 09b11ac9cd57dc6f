"""torch.compile for a Transformer: every block compiled on its own (inductor by default), dense and MoE alike.

Why per block and not the whole model: the blocks are where the time goes, a block's graph is small enough to
compile in seconds on a CPU, and identical blocks share one compiled code (dynamo caches by code object, so a
4-layer model compiles each block kind once, not four times).

The routing plan's data-dependent sizes: a dropless top-k plan has N = T * k rows whatever the routing, so
its shapes are static; what is data is the per-expert split of those rows. The grouped matmul's per-expert loop
(moe.segment_matmul) reads the splits on the host and therefore runs eagerly behind a graph break, so a step never
specialises on them; torch's grouped_mm takes the offsets as a tensor and is traced on CUDA (on CPU, torch
2.13's fake-tensor rule for it demands bf16, so compiled CPU code takes the loop). Plans whose N is data
(capacity drops, expert choice, random second choices) recompile once with dynamic sizes (dynamo's automatic
dynamic shapes) and then stay put. tests/moe/test_compile.py checks that further steps after warm-up add no
compilation and that losses equal eager ones within fp32 round-off.
"""
from __future__ import annotations

from typing import Optional

from torch import nn


def compile_blocks(model: nn.Module, *, backend: str = "inductor", mode: Optional[str] = None,
                   dynamic: Optional[bool] = None) -> str:
    """Compile every block of `model` (a moe.Transformer: model.blocks) in place with torch.compile; returns one
    line for the run's log saying what was compiled.

    backend: torch.compile's backend ("inductor"; "eager" or "aot_eager" to debug a graph without code
    generation); mode: inductor's mode (None, "reduce-overhead", "max-autotune"); dynamic: None lets dynamo mark
    sizes dynamic when they change (automatic dynamic shapes), True/False forces them."""
    from moe.layer import MoELayer  # late: moe.layer imports the dispatchers

    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ValueError(f"compile_blocks needs a Transformer with blocks (model.blocks), got {type(model).__name__}")
    for block in blocks:
        block.compile(backend=backend, mode=mode, dynamic=dynamic)  # nn.Module.compile: in place, state_dict unchanged
    sparse = sum(isinstance(b.ffn, MoELayer) for b in blocks)
    dense = len(blocks) - sparse
    return (f"torch.compile: {len(blocks)} blocks ({sparse} sparse, {dense} dense) with backend={backend}"
            f"{f', mode={mode}' if mode else ''}, dynamic={dynamic}; the expert loop runs eagerly between graphs")
