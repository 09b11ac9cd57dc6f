"""torch.compile for a Transformer: every block compiled on its own (inductor by default), dense and MoE alike.

Why per block and not the whole model: the blocks are where the time goes, a block's graph is small enough to
compile in seconds on a CPU, and identical blocks share one compiled code (dynamo caches by code object, so a
4-layer model compiles each block kind once, not four times).

The routing plan's data-dependent sizes: a dropless top-k plan has N = T * k rows whatever the routing, so
its shapes are static; what is data is the per-expert split of those rows. The expert GEMMs are therefore custom
operators to the compiler (switchyard::segment_mm, the per-expert loop with its own backward operator, in
moe.segment_matmul; switchyard::cpu_grouped_mm for CPU grouped_mm, in grouped_matmul and moe.grouped_glu's fused
path): dynamo and inductor see only their output shapes, the splits are read inside them, and nothing
specialises on them. The router's expert counts
have a static size (routing.counts), so an MoE block is one graph (before issue 16's fix a demo twin's block was 12
graphs, cut at every projection and count). Plans whose N is data (capacity drops, expert choice, random second
choices) recompile once with dynamic sizes (dynamo's automatic dynamic shapes) and then stay put.
tests/moe/test_compile.py checks that an MoE block is one graph, that further steps after warm-up add no
compilation and that losses equal eager ones within fp32 round-off.

Every model compiled in one process adds one entry to the block code's cache (its parameter shapes differ), and
dynamo stops compiling a code object after torch._dynamo.config.recompile_limit entries (8): the step benchmark
compiles six models, a sweep in one process more. compile_blocks raises the limit to RECOMPILE_LIMIT.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

RECOMPILE_LIMIT = 64  # compiled block variants per process (models x dispatchers), above torch's default 8


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
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # its older name
    setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
    for block in blocks:
        if isinstance(block.ffn, MoELayer):
            # The layer picks its dispatcher on the first call and caches the choice; picked here, the first compiled
            # call does not see it change and compile every block a second time.
            block.ffn.resolved_dispatcher(next(block.parameters()).device)
        block.compile(backend=backend, mode=mode, dynamic=dynamic)  # nn.Module.compile: in place, state_dict unchanged
    sparse = sum(isinstance(b.ffn, MoELayer) for b in blocks)
    dense = len(blocks) - sparse
    return (f"torch.compile: {len(blocks)} blocks ({sparse} sparse, {dense} dense) with backend={backend}"
            f"{f', mode={mode}' if mode else ''}, dynamic={dynamic}; the expert GEMMs are custom operators in each block's graph")
