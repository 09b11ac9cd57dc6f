"""Which experts of a sparse layer one rank holds under expert parallelism, and the one check that ep fits E.

Shape legend: E experts of the layer in all, P = ep_size ranks per expert-parallel group, E_l = E / P experts per
rank. Rank p of the group holds experts [p * E_l, (p + 1) * E_l). A bank (moe.experts.Experts) is built with
its shard and never changes it: moe.parallel makes the shard, Experts.sharded builds the bank of its slice.
Imports nothing but the standard library, so moe.config can check settings with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def check_expert_parallel(num_experts: int, expert_parallel: int) -> None:
    """ep must be at least 1 and divide E: every rank of an expert-parallel group holds the same number of
    experts. Named as the model config's fields (moe.config.MoEConfig, model.moe.*), which set both."""
    if expert_parallel < 1:
        raise ValueError(f"model.moe.expert_parallel={expert_parallel} must be at least 1")
    if num_experts % expert_parallel:
        raise ValueError(
            f"model.moe.expert_parallel={expert_parallel} does not divide model.moe.num_experts={num_experts}: "
            f"every rank of an expert-parallel group holds the same number of experts"
        )


@dataclass(frozen=True)
class ExpertShard:
    """A rank's slice of one sparse layer's experts (the whole bank when ep_size is 1)."""

    num_global_experts: int  # E: the layer's experts over all ranks
    ep_size: int = 1  # P: ranks of the expert-parallel group
    ep_rank: int = 0  # this rank's place in the group, the shard it holds
    group: Any = None  # the expert-parallel process group (all-to-all, checkpoint gathers); None when P == 1
    layer_name: str = ""  # the MoE layer's module path, named in collective errors

    def __post_init__(self):
        check_expert_parallel(self.num_global_experts, self.ep_size)
        if not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank={self.ep_rank} must be in [0, ep_size={self.ep_size})")

    @property
    def num_experts(self) -> int:
        """E_l: the experts this rank holds."""
        return self.num_global_experts // self.ep_size

    @property
    def first_expert(self) -> int:
        """The global index of this rank's first expert."""
        return self.ep_rank * self.num_experts


__all__ = ["ExpertShard", "check_expert_parallel"]
