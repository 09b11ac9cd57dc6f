"""Routing statistics: a fixed schema of detached numbers per MoE layer.

Shape legend: T tokens, E experts, k choices per token.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from routing.generation import generating

STAT_KEYS = ("tokens_per_expert", "max_load", "dropped_fraction", "router_entropy", "top1_prob", "dead_experts")


@torch.no_grad()
def routing_stats(probs: Tensor, counts: Tensor, kept: Tensor, entropy: Optional[Tensor] = None,
                  top1_prob: Optional[Tensor] = None) -> dict[str, Tensor]:
    """probs [T, E] router probabilities, counts [E] rows per expert after capacity, kept [T, k] bool.
    entropy [T], top1_prob [T]: each token's router entropy and largest probability, where the router has them
    from its own passes (routing.topk.TopKRouter: lse - sum(p * logit), and the chosen first expert's
    probability); None: computed here from probs (a log over [T, E] and a reduction along the expert axis).

    max_load is the busiest expert's share relative to a perfectly even split (1.0 = balanced, E = collapsed).
    While generating (routing.generation) there are none: nothing logs them, and a decode step would spend a
    third of its routing time on them.
    """
    if generating():
        return {}
    # Each input is read once, by the cheapest reduction that gives the logged value: on CPU a reduction over the
    # short expert axis costs more than the arithmetic (amax, without max's indices, halves the top-1 read);
    # the entropy keeps the per-token-then-mean order, so its value is the one the records have always held.
    counts = counts.float()  # [E]
    total = counts.sum().clamp(min=1.0)
    if entropy is None:
        entropy = -(probs * torch.log(probs.clamp(min=1e-20))).sum(-1)
    if top1_prob is None:
        top1_prob = probs.amax(-1)
    return {
        "tokens_per_expert": counts,
        "max_load": counts.amax() * counts.numel() / total,
        "dropped_fraction": 1.0 - kept.sum() / kept.numel(),
        "router_entropy": entropy.mean(),
        "top1_prob": top1_prob.mean(),
        "dead_experts": (counts == 0).sum().float(),
    }


class CollapseMonitor:
    """Watches tokens-per-expert over training steps and reports a collapsed layer once per episode.

    A layer has collapsed when one expert receives more than `share` of the tokens, or when some expert
    receives nothing, for `patience` consecutive steps. Plain Python state: the trainer owns it and prints
    what `report` returns; nothing is stored globally.

    A training step only `observe`s: the step's counts stay on their device, held until `report` reads the
    steps since the last report in one transfer per layer and replays them in order, so the messages (their
    steps, experts and shares) are those a per-step check would have given, only read at the next record.
    `update` is observe and report in one call.
    """

    def __init__(self, patience: int = 50, share: float = 0.5):
        self.patience, self.share = patience, share
        self._hot: dict[int, int] = {}  # layer -> consecutive steps with one expert above `share`
        self._dead: dict[int, int] = {}  # layer -> consecutive steps with at least one empty expert
        self._reported: set[tuple[int, str]] = set()
        # layer -> the observed steps not yet reported: (step, tokens_per_expert [E] as given, num_tokens)
        self._pending: dict[int, list[tuple[int, Tensor, Optional[int]]]] = {}

    def observe(self, step: int, layer: int, tokens_per_expert: Tensor, num_tokens: Optional[int] = None) -> None:
        """Holds one step's counts (no host read; the tensor is kept, not copied, so it must not be changed in
        place before the report: the trainer's are fresh each step). num_tokens: tokens routed this step (with top-k an expert's
        share is of tokens, not of the k*T assignments, so a top-2 expert can exceed one half); None: the
        assignments' total."""
        self._pending.setdefault(layer, []).append((step, tokens_per_expert.detach(), num_tokens))

    def report(self) -> list[str]:
        """The messages of every step observed since the last report, in step order per layer."""
        messages = []
        for layer, pending in sorted(self._pending.items()):
            counts = torch.stack([c.float() for _, c, _ in pending]).cpu()  # [steps, E]: one read per layer
            for (step, _, num_tokens), row in zip(pending, counts):
                messages += self._check(step, layer, row, num_tokens)
        self._pending.clear()
        return messages

    def update(self, step: int, layer: int, tokens_per_expert: Tensor, num_tokens: Optional[int] = None) -> list[str]:
        """observe and report: the messages up to this step (see observe for num_tokens)."""
        self.observe(step, layer, tokens_per_expert, num_tokens)
        return self.report()

    def _check(self, step: int, layer: int, counts: Tensor, num_tokens: Optional[int]) -> list[str]:
        """One step of one layer on host counts [E]: moves the streaks, returns the messages it completes."""
        total = float(num_tokens) if num_tokens is not None else float(counts.sum())
        messages = []
        for kind, bad, streaks in (
            ("hot", total > 0 and float(counts.max()) > self.share * total, self._hot),
            ("dead", bool((counts == 0).any()), self._dead),
        ):
            streaks[layer] = streaks.get(layer, 0) + 1 if bad else 0
            if not bad:
                self._reported.discard((layer, kind))
            elif streaks[layer] >= self.patience and (layer, kind) not in self._reported:
                self._reported.add((layer, kind))
                if kind == "hot":
                    e = int(counts.argmax())
                    messages.append(
                        f"step {step}: MoE layer {layer} has collapsed: expert {e} took {float(counts[e]) / total:.0%} of "
                        f"the tokens for {streaks[layer]} steps; raise model.moe.router.aux_loss_coef, add router jitter, or "
                        f"lower the learning rate"
                    )
                else:
                    dead = (counts == 0).nonzero().flatten().tolist()
                    messages.append(
                        f"step {step}: MoE layer {layer} has dead experts {dead} (no tokens for {streaks[layer]} steps)"
                    )
        return messages
