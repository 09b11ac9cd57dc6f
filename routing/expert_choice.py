"""Expert-choice routing: every expert picks its top-C tokens, instead of every token picking its top-k experts.

Shape legend: T tokens, d model width, E experts, k = model.moe.router.top_k (the nominal experts per token), B sequences
of S tokens (T = B * S, token t = b * S + s), P groups of G tokens each (P * G = T), C capacity (tokens each
expert takes from each group), N = P * E * C plan rows.

Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing" (NeurIPS 2022). The router scores S = softmax
over experts of the token's logits (fp32); each expert takes the C tokens with the highest score for it, with
C = ceil(capacity_factor * G * k / E) (at least model.moe.router.min_capacity, at most G), so on average a token is
processed by capacity_factor * k experts. The combine weight of a (token, expert) row is the token's score for
that expert (times model.moe.router.scale). Every expert receives exactly C tokens per group: load balance holds by
construction, so no balancing loss is used (model.moe.router.aux_loss_coef is ignored); the ST-MoE z-loss is added when
model.moe.router.z_loss_coef > 0. Some tokens may be picked by no expert (they pass through the residual only); the
`dropped_fraction` statistic is the fraction of such tokens.

Which tokens compete (model.moe.router.ec_mode):
- "batch": as in the paper, one group of all T tokens. In a decoder this leaks the future: whether an expert
  takes token (b, s) depends on the scores of later tokens of the same sequence (and of every other sequence),
  so training can use information the model will not have when it generates, and the loss is not a faithful
  next-token loss. Use it for encoders or to reproduce the paper.
- "per_position" (the default, decoder-safe): token t = b * S + s competes only with the B tokens at the same
  position s of the other sequences of the batch (P = S groups of G = B tokens); C is computed for a group of B
  tokens. A token's routing then depends only on tokens at its own position in other sequences, whose hidden
  states see only their own prefixes, never on a later position. This is the remedy the paper itself suggests
  for auto-regressive decoding (route groups made of different sequences). It is exactly causal when the
  sequences of a batch are independent; windows cut from one stream that overlap (a random-window sampler on a
  short corpus) can still pass a sliver of a sequence's future through the competition.

Small groups. Experts can only choose when the group holds enough tokens: the fractional capacity is
capacity_factor * G * k / E, and below one slot (G < E / (capacity_factor * k)) rounding C up to 1 gives every
token more experts than in training, up to all E of them when G = 1 (generation with one sequence in
per_position mode). So at evaluation (not self.training), when capacity_factor * G * k < E, the router falls
back to token choice: each token takes its top-round(capacity_factor * k) experts by score, with the same
weights (its scores), dropless. That keeps the compute per token and the weight scale of training, and makes a
token's output independent of the rest of its batch. In training the expert-choice rule is always applied (it
is what keeps the experts balanced); with groups that small every expert takes every token, so per_position
training needs batches of at least E / (capacity_factor * k) sequences (a warning says so).

Generation (routing.generation.generating(), set by moe.generation for every forward of `generate`) always takes
that token-choice fallback, whatever the group size: a new token is routed on its own, so a prompt continues the
same alone or in a batch, with or without the KV cache, and ec_mode=batch cannot see the future. This is the
evaluation rule of batch-1 per_position (the old generate at batch 1 routed the same way); it is not the
training-time competition, which a decoder cannot run causally token by token.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from routing.capacity import choice_plan, expert_capacity
from routing.counts import count_ids
from routing.generation import generating
from routing.losses import router_z_loss
from routing.plan import RoutingPlan
from routing.recompute import recomputing
from routing.router import TORCH_KERNELS, Router, RouterKernels
from routing.stats import routing_stats
from routing.topk import select_topk


def group_members(num_tokens: int, seq_len: int, mode: str, device: Optional[torch.device] = None) -> Tensor:
    """[P, G] long: the tokens of each competition group ("batch": one group of T; "per_position": S groups of B)."""
    tokens = torch.arange(num_tokens, device=device)
    if mode == "batch":
        return tokens.view(1, num_tokens)
    if seq_len < 1 or num_tokens % seq_len:
        raise ValueError(
            f"expert_choice with model.moe.router.ec_mode=per_position needs T = B * S tokens; got T={num_tokens} tokens "
            f"for sequences of {seq_len}: pass the router x [B*S, d] with seq_len=S, or use model.moe.router.ec_mode=batch"
        )
    return tokens.view(num_tokens // seq_len, seq_len).t()  # [S, B]: group s holds tokens b * S + s


def eval_top_k(capacity_factor: float, top_k: int, num_experts: int) -> int:
    """Experts per token of the evaluation fallback: training's average, capacity_factor * k, rounded."""
    return min(num_experts, max(1, round(capacity_factor * top_k)))


class ExpertChoiceRouter(Router):
    """Each expert takes its top-C tokens per group; token-choice fallback at evaluation for tiny groups."""

    def route(self, x: Tensor, logits: Tensor, token_ids: Optional[Tensor], seq_len: int,
              kernels: RouterKernels = TORCH_KERNELS) -> RoutingPlan:
        cfg = self.cfg
        T, E = logits.shape
        scores = torch.softmax(logits, dim=-1)  # [T, E] fp32, differentiable: the gate learns through the weights
        cf = cfg.capacity_factor_at(self.training)
        members = group_members(T, seq_len, cfg.ec_mode, logits.device)  # [P, G]
        P, G = members.shape
        aux = {"router_z_loss": cfg.z_loss_coef * router_z_loss(logits)} if cfg.z_loss_coef > 0 else {}
        too_small = cf * G * cfg.top_k < E  # fewer tokens per group than one whole slot per expert
        # Generation (routing.generation) always takes the fallback: a new token must not compete with the other
        # rows of its batch, nor, in ec_mode=batch, with tokens after it.
        if generating() or (too_small and not self.training):
            return self._token_choice(logits, scores, eval_top_k(cf, cfg.top_k, E), aux)
        if too_small and not recomputing():  # warned in the forward already, not again in a checkpoint's replay
            warnings.warn(
                f"expert_choice: groups of {G} tokens give each of the {E} experts less than one slot "
                f"(capacity_factor * G * top_k = {cf * G * cfg.top_k:g} < E), so every expert takes a token; use "
                f"a batch of at least {E / (cf * cfg.top_k):g} sequences with model.moe.router.ec_mode=per_position",
                stacklevel=3,
            )

        C = min(expert_capacity(G, E, cfg.top_k, cf, cfg.min_capacity), G)
        # Each expert ranks the tokens of each group by its score for them: [P, E, G] -> top C along G.
        group_scores = scores[members].transpose(1, 2)  # [P, E, G]
        # Each expert's scores over tokens are not monotonic in one row's logits, so this ranks the scores; the
        # lowest member slot wins a tie, as in token choice.
        top_g = select_topk(group_scores.reshape(P * E, G), C).reshape(P, E, C)  # [P, E, C] member slots
        top_w = group_scores.gather(2, top_g)  # [P, E, C] their scores, differentiable
        top_token = members[:, None, :].expand(P, E, G).gather(2, top_g)  # [P, E, C] token ids
        # Rows sorted by expert: expert-major, then group, then the expert's ranking within the group.
        token_index = top_token.permute(1, 0, 2).reshape(-1)  # [N]
        weight = top_w.permute(1, 0, 2).reshape(-1) * cfg.scale  # [N]
        expert_index = torch.arange(E, device=logits.device).repeat_interleave(P * C)  # [N]
        counts = torch.full((E,), P * C, dtype=torch.long, device=logits.device)
        # routing_stats takes a [T, k] mask of surviving choices; expert choice has no per-token choices, so it gets
        # [T, 1] "picked by at least one expert", and dropped_fraction is the fraction of tokens no expert took.
        routed = (count_ids(token_index, T) > 0)[:, None]
        return RoutingPlan(
            token_index=token_index,
            expert_index=expert_index,
            weight=weight,
            counts=counts,
            num_tokens=T,
            capacity=P * C,  # a fixed layout: every expert has exactly P * C rows
            aux_losses=aux,
            stats=routing_stats(scores.detach(), counts, routed),
        )

    def _token_choice(self, logits: Tensor, scores: Tensor, k: int, aux: dict[str, Tensor]) -> RoutingPlan:
        """Evaluation fallback: each token's top-k experts by score, weighted by those scores (not renormalised,
        as in expert choice), dropless. Selected on the logits: the same ranking as the softmax scores, without
        the ties of scores that underflow to 0."""
        T, E = scores.shape
        expert_idx = select_topk(logits, k)  # [T, k]
        weight = scores.gather(1, expert_idx)
        return choice_plan(expert_idx, weight * self.cfg.scale, scores, E, None, False, "position", aux)
