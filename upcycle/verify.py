"""The step-0 check: an upcycled model against its dense source, on one text sample, before any training.

It reports max and mean |Δ logit|, both next-token losses, whether the recipe was expected to preserve
the output exactly (upcycle.recipes.exactness), and the routing at step 0: how many experts of each sparse layer
receive a token of the sample and how uneven the load is (a zero router sends every token to the same k experts;
see upcycle.recipes and upcycle.router_init). For an exact recipe the difference must be fp32 round-off:
at most `tolerance` = 1e-5 x max(1, max |dense logit|) (the products and sums of a 30-layer model change
order when tokens are split over experts, so the bound scales with the logits). An inexact recipe reports its
gap as it is measured; nothing is rounded or hidden.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from moe.model import Transformer

# A neutral English sample for models that bring a tokenizer (the first lines of a public-domain text).
SAMPLE_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters. The capital of France is Paris, and the "
    "river that runs through it is the Seine; water boils at 100 degrees Celsius at sea level."
)
RELATIVE_TOLERANCE = 1e-5


@dataclass
class StepZeroReport:
    recipe: str  # the recipe that made the MoE
    tokens: int  # tokens in the sample (batch x sequence)
    max_abs_diff: float  # max |logit_moe - logit_dense| over every position and vocabulary entry
    mean_abs_diff: float  # mean of the same
    max_abs_logit: float  # max |logit_dense|: the scale the difference is measured against
    dense_loss: float  # next-token cross-entropy of the dense model on the sample (nats)
    moe_loss: float  # the same for the MoE
    expected_exact: bool  # the recipe and router preserve the output by construction
    reason: str  # why (not)
    tolerance: float  # what counts as fp32 round-off for this sample
    # sparse layer index -> assignments per expert on the sample ([E] counts; T*k in all for dropless top-k)
    tokens_per_expert: dict[int, list[int]] = field(default_factory=dict)

    @property
    def experts_used(self) -> dict[int, int]:
        """Sparse layer index -> how many of its experts receive at least one token of the sample."""
        return {i: sum(1 for c in counts if c > 0) for i, counts in self.tokens_per_expert.items()}

    @property
    def max_load(self) -> dict[int, float]:
        """Sparse layer index -> the busiest expert's assignments over the mean per expert (1.0: perfectly even)."""
        return {i: max(c) * len(c) / max(1, sum(c)) for i, c in self.tokens_per_expert.items()}

    @property
    def all_experts_used(self) -> bool:
        return all(n == len(self.tokens_per_expert[i]) for i, n in self.experts_used.items())

    @property
    def within_roundoff(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    @property
    def passed(self) -> bool:
        """An exact recipe must be within round-off; an inexact one passes by reporting its gap."""
        return self.within_roundoff or not self.expected_exact

    def to_dict(self) -> dict:
        return {**asdict(self), "within_roundoff": self.within_roundoff, "passed": self.passed,
                "experts_used": self.experts_used, "max_load": self.max_load}

    def routing_text(self) -> list[str]:
        """One line per sparse layer: experts used and the assignments per expert."""
        if not self.tokens_per_expert:
            return []
        used, load = self.experts_used, self.max_load
        lines = [f"  routing at step 0 (experts used per sparse layer on the {self.tokens} tokens; the busiest "
                 f"expert's load over the mean; assignments per expert):"]
        for i, counts in sorted(self.tokens_per_expert.items()):
            lines.append(f"    layer {i:>3}: {used[i]}/{len(counts)}  max/mean {load[i]:.2f}  {counts}")
        if not self.all_experts_used:
            dead = sum(len(self.tokens_per_expert[i]) - n for i, n in used.items())
            short = sum(1 for i, n in used.items() if n < len(self.tokens_per_expert[i]))
            chosen = {tuple(c > 0 for c in counts) for counts in self.tokens_per_expert.values()}
            why = (": every layer sends every token to the same experts, as a zero router (router_init_std=0) does"
                   if len(chosen) == 1 and len(used) > 1 else "")
            lines.append(f"  note: {dead} experts in {short} of {len(used)} sparse layers receive no token of the "
                         f"sample{why}")
        return lines

    def text(self) -> str:
        lines = [
            f"step-0 check, recipe={self.recipe}, {self.tokens} tokens",
            f"  max |Δ logit|  {self.max_abs_diff:.3e}   (mean {self.mean_abs_diff:.3e}; max |logit| {self.max_abs_logit:.2f})",
            f"  LM loss        dense {self.dense_loss:.6f}   moe {self.moe_loss:.6f}   gap {self.moe_loss - self.dense_loss:+.3e}",
        ]
        if self.expected_exact and self.within_roundoff:
            verdict = f"EXACT: equal to the dense model within fp32 round-off (<= {self.tolerance:.1e}); {self.reason}"
        elif self.expected_exact:
            verdict = (f"FAILED: an exact recipe differs by {self.max_abs_diff:.3e} > {self.tolerance:.1e} "
                       f"(fp32 round-off); {self.reason}")
        else:
            verdict = f"INEXACT (as expected): {self.reason}; the gap above is the honest step-0 cost"
        return "\n".join(lines + ["  " + verdict] + self.routing_text())


def sample_tokens(vocab_size: int, tokenizer=None, max_len: int = 128, text: Optional[str] = None,
                  seed: int = 0) -> Tensor:
    """[1, S] token ids: the sample text through the tokenizer, or deterministic random ids without one."""
    if tokenizer is not None:
        enc = tokenizer.encode(text or SAMPLE_TEXT)
        ids: Sequence[int] = enc.ids if hasattr(enc, "ids") else enc
        ids = list(ids)[:max_len]
        if len(ids) >= 2:
            return torch.tensor([ids])
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, max(2, max_len)), generator=g)


@torch.no_grad()
def step0_check(dense: Transformer, moe: Transformer, tokens: Tensor, recipe: str, expected_exact: bool,
                reason: str = "") -> StepZeroReport:
    """Runs both models (eval mode, fp32) on tokens [B, S] and compares logits and losses."""
    dense_mode, moe_mode = dense.training, moe.training
    dense.eval(), moe.eval()
    try:
        x, y = tokens[:, :-1], tokens[:, 1:]
        a = dense(x, y)
        b = moe(x, y)
    finally:
        dense.train(dense_mode), moe.train(moe_mode)
    diff = (b.logits.float() - a.logits.float()).abs()
    scale = float(a.logits.abs().max())
    return StepZeroReport(
        recipe=recipe, tokens=int(x.numel()), max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
        max_abs_logit=scale, dense_loss=float(a.loss), moe_loss=float(b.loss), expected_exact=expected_exact,
        reason=reason, tolerance=RELATIVE_TOLERANCE * max(1.0, scale),
        tokens_per_expert={i: [int(c) for c in st["tokens_per_expert"].tolist()] for i, st in sorted(b.stats.items())
                           if "tokens_per_expert" in st},
    )
