"""The kernel variants the check runs beside the default launch: split-K weight gradients, the persistent grid
with its device-side tile table, and TMA descriptors (issue 20 items 2-3; all off by default, none measured on a
GPU before this check).

Shape legend: T tokens, d model width, f expert hidden width, E experts, N plan rows, S split-K chunk rows.

Each variant is the default tiles with one option switched on, passed as `blocks=` to every kernel of the layer
(moe.kernels.expert_mlp.grouped_expert_mlp), so a difference from the default run is that option's alone:
  split_k     WgradBlocks.split_rows = S: both weight gradients cut each expert's rows into chunks of S, the
              fp32 partials summed per expert by combine.segment_sum (the skewed load's tail is what it is for)
  persistent  GemmBlocks.persistent: ~one program per SM looping over the row tiles, read from the tile table
              (moe.kernels.tile_table) built once per layer call
  tma         GemmBlocks.tma: weights and contiguous row blocks (h, grad u, grad g) through TMA tensor
              descriptors where the device and Triton allow them (else the kernels fall back to pointer loads:
              `uses_tma` says which happened)
The probe (experiments.gpu_check.probe) runs each against the fp32 reference and twice bitwise; kernel_info
compiles them at the probe's sizes (same Triton cache entries) and reads their resources.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Callable, Optional, Sequence

if TYPE_CHECKING:  # torch only where a variant runs: the runner imports VARIANTS (experiments.gpu_check.targets)
    import torch
    from torch import Tensor

    from routing.plan import RoutingPlan

VARIANTS = ("split_k", "persistent", "tma")


def base_blocks(dry_run: bool):
    """The tiles every variant starts from: the kernels' bf16 defaults on the GPU (what a call without a tuned
    table runs); in a dry run the interpreter's large row and column tiles (its cost grows with the programs)
    with 16-row reduction chunks, so that split-K chunks of 16 rows cut the tiny layer's busiest expert, and 1024
    elements per segment-sum program, so that the split's second pass runs several column blocks per expert."""
    import torch

    from moe.kernels.gemm_tiles import INTERPRETER_BLOCKS
    from moe.kernels.tile_configs import default_blocks

    if dry_run:
        return replace(INTERPRETER_BLOCKS, block_k=16, block_elementwise=1024)
    return default_blocks(torch.bfloat16)


def split_chunk(expert_rows: Sequence[int], block_k: int) -> int:
    """S for the split-K variant: the autotuner's first split candidate for these loads (the power of two at or
    above the mean rows per expert, where the busiest expert spans two chunks or more), else the largest multiple
    of block_k that still cuts the busiest expert in two (a tiny dry-run layer), at least block_k."""
    from moe.kernels.tile_configs import split_candidates

    found = split_candidates(expert_rows, block_k)
    if found:
        return found[0]
    return block_k * max(1, max(expert_rows) // (2 * block_k))


def variant_blocks(base, expert_rows: Sequence[int]) -> dict:
    """variant name -> the blocks of that variant (base with one option on)."""
    from moe.kernels.tile_configs import WgradBlocks

    return {"split_k": WgradBlocks(**asdict(base), split_rows=split_chunk(expert_rows, base.block_k)),
            "persistent": replace(base, persistent=True), "tma": replace(base, tma=True)}


def describe_variant(name: str, blocks, expert_rows: Sequence[int], bank, device: "torch.device") -> dict:
    """What the variant does at this plan: split-K chunk rows and the busiest expert's chunks, the persistent
    programs, whether TMA descriptors were made for the weights (or the kernels fell back to pointer loads)."""
    from moe.kernels.gemm_tiles import persistent_programs, weight_operand

    out = {"block_m": blocks.block_m, "block_n": blocks.block_n, "block_k": blocks.block_k}
    if name == "split_k":
        s = blocks.split_rows
        out.update(split_rows=s, busiest_expert_chunks=-(-max(expert_rows) // s))
    elif name == "persistent":
        out["programs"] = persistent_programs(device)
    elif name == "tma":
        out["uses_tma"] = bool(weight_operand(bank.w_up.detach(), blocks, False)[1])
    return out


def triton_with(blocks) -> "Callable[[Tensor, RoutingPlan, object], Tensor]":
    """A dispatcher with the triton dispatcher's contract (moe.dispatch.triton) whose kernels all run with
    `blocks` (the dispatcher itself takes the tuned or default tiles per kernel)."""

    def dispatch(x: "Tensor", plan: "RoutingPlan", experts) -> "Tensor":
        from moe.dispatch.triton import token_order
        from moe.kernels.expert_mlp import grouped_expert_mlp

        w_up, w_gate, w_down = experts._weights(x.dtype)

        def bias(b: "Optional[Tensor]") -> "Optional[Tensor]":
            return None if b is None else b.to(x.dtype)

        y = grouped_expert_mlp(x, plan.token_index, plan.offsets, plan.weight.float(), w_up, w_gate,
                               bias(experts.b_up), bias(experts.b_gate), w_down, bias(experts.b_down),
                               experts.activation, blocks=blocks, token_order=token_order(plan))
        return y.to(x.dtype)

    return dispatch
