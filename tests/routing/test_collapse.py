"""The collapse monitor: fires once per episode when one expert hogs the tokens or experts stay dead."""
import torch

from routing.stats import CollapseMonitor


def test_hot_expert_fires_once_after_patience_and_rearms():
    mon = CollapseMonitor(patience=3, share=0.5)
    hot = torch.tensor([90.0, 5.0, 3.0, 2.0])
    fired = [mon.update(step, 0, hot) for step in range(1, 7)]
    assert [len(m) for m in fired] == [0, 0, 1, 0, 0, 0]
    assert "expert 0 took 90%" in fired[2][0] and "layer 0" in fired[2][0]
    assert mon.update(7, 0, torch.tensor([25.0, 25.0, 25.0, 25.0])) == []  # recovered: re-armed
    fired = [mon.update(step, 0, hot) for step in range(8, 11)]
    assert [len(m) for m in fired] == [0, 0, 1]


def test_dead_experts_reported_by_index_and_layers_are_independent():
    mon = CollapseMonitor(patience=2)
    dead = torch.tensor([10.0, 0.0, 10.0, 0.0])
    assert mon.update(1, 3, dead) == [] and mon.update(1, 5, torch.ones(4)) == []
    messages = mon.update(2, 3, dead)
    assert len(messages) == 1 and "dead experts [1, 3]" in messages[0] and "layer 3" in messages[0]
    assert mon.update(2, 5, torch.ones(4)) == []


def test_balanced_load_never_fires():
    mon = CollapseMonitor(patience=1)
    assert all(mon.update(s, 0, torch.tensor([30.0, 20.0, 26.0, 24.0])) == [] for s in range(20))


def test_top2_share_is_of_tokens_not_assignments():
    # 100 tokens, top-2: expert 0 is in every token's pair (100 of 200 assignments, all of the tokens)
    mon = CollapseMonitor(patience=1)
    counts = torch.tensor([100.0, 40.0, 30.0, 30.0])
    assert mon.update(1, 0, counts) == []  # 50% of assignments: not above half
    assert "took 100%" in CollapseMonitor(patience=1).update(1, 0, counts, num_tokens=100)[0]
