"""Hash routing: a fixed token-id -> expert table, no gate, no learned routing at all.

Shape legend: T tokens, d model width, E experts, V vocabulary, k = 1 choice per token, N = T plan rows.

Roller et al. 2021, "Hash Layers For Large Sparse Models" (NeurIPS 2021). Each token goes to the one expert its
id hashes to, whatever its hidden state, with combine weight 1 (times model.moe.router.scale): there is nothing to learn
and nothing to balance, so no auxiliary loss, no capacity (dropless) and no router parameters. The hash is the
paper's random hash made balanced over the vocabulary: a permutation of the V ids drawn from model.moe.router.hash_seed and
the layer's block index (layer_seed: each layer its own hash, as in the paper, not one table shared by all) is
dealt round-robin to the experts, so expert loads over the vocabulary differ by at most one id (balance over
real text then depends on token frequencies; the paper also studies frequency-balanced, bigram and clustered
hashes, not built here). The table is a persistent buffer: it travels in checkpoints, so a resumed or reloaded
model keeps its routing even if the seed or the code that draws the permutation changes: checkpoints written
before tables were per layer load their one shared table into every layer and route as they were trained.

Only k = 1 is built: the paper's multi-hash variant splits each expert's input into several heads, each with
its own hash, which is a different layer, not k choices of the same layer.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from routing.capacity import choice_plan
from routing.config import RouterConfig
from routing.plan import RoutingPlan
from routing.router import TORCH_KERNELS, Router, RouterKernels


# Seeds of consecutive layers are this far apart, so (seed, layer) pairs with seed < LAYER_SEED_STRIDE never collide.
LAYER_SEED_STRIDE = 1_000_003


def layer_seed(seed: int, layer: int) -> int:
    """The generator seed of block `layer`'s table; layer 0 keeps `seed`, so its table is the one of before."""
    return seed + LAYER_SEED_STRIDE * layer


def hash_table(vocab_size: int, num_experts: int, seed: int, layer: int = 0) -> Tensor:
    """[V] long: a seeded permutation of the vocabulary dealt round-robin to the E experts (balanced to +-1)."""
    perm = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(layer_seed(seed, layer)))
    table = torch.empty(vocab_size, dtype=torch.long)
    table[perm] = torch.arange(vocab_size) % num_experts
    return table


class HashRouter(Router):
    """Routes token id v to expert table[v] with weight 1."""

    needs_gate = False  # the base class builds no gate and passes logits=None
    per_layer = True  # build_router passes the block index: one table per layer

    def __init__(self, d_model: int, num_experts: int, cfg: RouterConfig, vocab_size: Optional[int] = None,
                 layer: int = 0):
        if cfg.top_k != 1:
            raise ValueError(
                f"model.moe.router.top_k={cfg.top_k} but hash routing sends every token to exactly one expert; "
                f"set model.moe.router.top_k=1"
            )
        if vocab_size is None or vocab_size < 1:
            raise ValueError(
                f"hash routing needs the vocabulary size to build its token-id -> expert table, got "
                f"vocab_size={vocab_size}; build the router with vocab_size=model.vocab_size"
            )
        super().__init__(d_model, num_experts, cfg, vocab_size)
        self.vocab_size = vocab_size
        self.layer = layer  # the block index the table was drawn for
        self.register_buffer("table", hash_table(vocab_size, num_experts, cfg.hash_seed, layer), persistent=True)

    def route(self, x: Tensor, logits: Optional[Tensor], token_ids: Optional[Tensor], seq_len: int,
              kernels: RouterKernels = TORCH_KERNELS) -> RoutingPlan:
        T, E = x.shape[0], self.num_experts
        if token_ids is None:
            raise ValueError(
                "hash routing needs token ids: call the router (or MoELayer) with token_ids, the model's input ids"
            )
        if token_ids.shape != (T,):
            raise ValueError(f"hash routing got token_ids of shape {tuple(token_ids.shape)} for {T} tokens")
        expert = self.table[token_ids]  # [T]
        weight = torch.full((T, 1), self.cfg.scale, dtype=torch.float32, device=x.device)  # no gate: constant
        probs = F.one_hot(expert, E).float()  # the hash is certain: entropy 0, top-1 probability 1
        return choice_plan(expert[:, None], weight, probs, E, None, False, "position", {})
