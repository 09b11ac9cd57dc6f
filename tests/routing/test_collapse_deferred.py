"""The collapse monitor read once per record: observing steps and reporting later gives the messages (steps,
experts, shares, dead lists) a per-step check gives, in the same order per layer, and holds nothing after the
report."""
from __future__ import annotations

import torch

from routing.stats import CollapseMonitor


def _counts(steps: int, experts: int, seed: int = 0) -> list[torch.Tensor]:
    """Per-step tokens-per-expert with episodes of collapse (expert 2 hot) and of dead experts between balanced
    stretches, so that streaks start, reach patience, end and start again."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(steps):
        c = torch.randint(5, 15, (experts,), generator=g).float()
        if 3 <= s % 11 <= 8:
            c[2] = 200.0  # one expert above half of the tokens
        if s % 7 in (1, 2, 3, 4):
            c[0] = 0.0  # an empty expert
        out.append(c)
    return out


def test_report_after_observing_equals_checking_every_step():
    steps, layers = 60, (0, 3)
    every_step, deferred = CollapseMonitor(patience=3), CollapseMonitor(patience=3)
    expected, got = [], []
    for s, counts in enumerate(_counts(steps, 6), 1):
        for layer in layers:
            c = counts.roll(layer)  # the layers differ
            expected += every_step.update(s, layer, c, num_tokens=300)
            deferred.observe(s, layer, c, num_tokens=300)
        if s % 10 == 0:  # a record every 10 steps
            got += deferred.report()
    # per layer, the same messages in the same order (a report gives one layer's, then the next's)
    assert sorted(got) == sorted(expected)
    for layer in layers:
        tag = f"MoE layer {layer} "
        assert [m for m in got if tag in m] == [m for m in expected if tag in m]
    assert len(expected) >= 8 and any("took" in m for m in expected) and any("dead experts [" in m for m in expected)
    assert deferred.report() == [] and deferred._pending == {}


def test_the_message_names_the_step_it_happened_not_the_report():
    mon = CollapseMonitor(patience=2)
    hot = torch.tensor([90.0, 5.0, 5.0, 0.0])
    for step in (1, 2, 3, 4):
        mon.observe(step, 0, hot, num_tokens=100)
    assert mon.report() == [
        "step 2: MoE layer 0 has collapsed: expert 0 took 90% of the tokens for 2 steps; raise "
        "model.moe.router.aux_loss_coef, add router jitter, or lower the learning rate",
        "step 2: MoE layer 0 has dead experts [3] (no tokens for 2 steps)",
    ]
