"""Expert-choice routing: per-group top-C selection, weights, per_position causality, the evaluation fallback.

Also holds the MoE-layer helpers that test_hash and test_gshard share: an einsum/sorted pair of MoELayers with
the same weights, their comparison forward and backward, and one training step of a tiny Transformer.
"""
import math
import warnings
from typing import Optional

import pytest
import torch

from moe.config import ModelConfig, MoEConfig
from moe.dispatch import DISPATCHERS
from moe.layer import MoELayer
from moe.model import Transformer
from routing import RouterConfig, build_router
from routing.expert_choice import ExpertChoiceRouter, eval_top_k, group_members
from tests.routing.test_topk import check_plan_invariants

B, S, D, E, VOCAB = 6, 5, 8, 4, 32  # T = B * S = 30 tokens
T = B * S
TOL = dict(rtol=1e-5, atol=1e-5)


def _ec(seed: int = 0, num_experts: int = E, **cfg) -> ExpertChoiceRouter:
    cfg = {"name": "expert_choice", "capacity_factor": 1.0, "min_capacity": 1, "z_loss_coef": 0.0, **cfg}
    torch.manual_seed(seed)
    router = build_router(D, num_experts, RouterConfig(**cfg))
    torch.nn.init.normal_(router.gate.weight, 0.0, 1.0)  # spread the scores so rankings are well separated
    return router


def _x(seed: int = 1, t: int = T) -> torch.Tensor:
    return torch.randn(t, D, generator=torch.Generator().manual_seed(seed))


def _scores(router, x):
    return torch.softmax(x @ router.gate.weight.t(), -1)


def _group_of_rows(plan, mode: str, seq_len: int) -> torch.Tensor:
    return plan.token_index % seq_len if mode == "per_position" else torch.zeros_like(plan.token_index)


# ---------------------------------------------------------------- groups and capacity

def test_group_members():
    assert group_members(6, 3, "per_position").tolist() == [[0, 3], [1, 4], [2, 5]]  # t = b * S + s
    assert group_members(6, 3, "batch").tolist() == [[0, 1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="ec_mode=per_position needs T = B \\* S"):
        group_members(7, 3, "per_position")


@pytest.mark.parametrize("mode", ["per_position", "batch"])
@pytest.mark.parametrize("k,cf", [(1, 1.0), (2, 1.0), (1, 2.0), (2, 0.5)])
def test_every_expert_takes_exactly_C_per_group(mode, k, cf):
    router = _ec(top_k=k, capacity_factor=cf, ec_mode=mode)
    x = _x()
    plan = router(x, seq_len=S)
    check_plan_invariants(plan, T, E)
    G, P = (B, S) if mode == "per_position" else (T, 1)
    C = min(math.ceil(cf * G * k / E), G)
    assert plan.capacity == P * C
    assert plan.counts.tolist() == [P * C] * E
    group = _group_of_rows(plan, mode, S)
    per_group = torch.zeros(P, E, dtype=torch.long)
    per_group.index_put_((group, plan.expert_index), torch.ones_like(group), accumulate=True)
    assert per_group.tolist() == [[C] * E] * P
    # each expert took exactly its top-C tokens of each group
    scores = _scores(router, x)
    members = group_members(T, S, mode)
    for p in range(P):
        for e in range(E):
            ref = members[p][scores[members[p], e].topk(C).indices]
            got = plan.token_index[(group == p) & (plan.expert_index == e)]
            assert sorted(got.tolist()) == sorted(ref.tolist())


def test_capacity_is_clipped_to_the_group():
    # min_capacity 10 asks for more than the B = 6 tokens of a per-position group: every expert takes all 6
    plan = _ec(min_capacity=10)(_x(), seq_len=S)
    assert plan.counts.tolist() == [T] * E and plan.capacity == T
    assert torch.equal(torch.bincount(plan.token_index, minlength=T), torch.full((T,), E))


def test_batch_mode_capacity_known_value():
    # one group of 30 tokens, k 2, cf 1: C = ceil(30 * 2 / 4) = 15
    plan = _ec(top_k=2, ec_mode="batch")(_x(), seq_len=S)
    assert plan.counts.tolist() == [15] * E


# ---------------------------------------------------------------- weights, losses, statistics

@pytest.mark.parametrize("mode", ["per_position", "batch"])
def test_weights_are_softmax_scores(mode):
    router = _ec(top_k=2, ec_mode=mode, scale=1.0)
    x = _x()
    plan = router(x, seq_len=S)
    scores = _scores(router, x)
    torch.testing.assert_close(plan.weight, scores[plan.token_index, plan.expert_index], rtol=1e-6, atol=1e-7)
    scaled = _ec(top_k=2, ec_mode=mode, scale=2.5)(x, seq_len=S)
    assert torch.equal(scaled.token_index, plan.token_index)
    torch.testing.assert_close(scaled.weight, 2.5 * plan.weight)


def test_weights_are_differentiable():
    router = _ec(top_k=2)
    plan = router(_x(), seq_len=S)
    (plan.weight * torch.arange(plan.weight.numel()).float()).sum().backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def test_no_balancing_loss_and_z_loss_by_coefficient():
    x = _x()
    plan = _ec(aux_loss_coef=0.5, z_loss_coef=0.0)(x, seq_len=S)
    assert plan.aux_losses == {}  # balanced by construction: the Switch loss is never added
    router = _ec(aux_loss_coef=0.5, z_loss_coef=0.01)
    plan = router(x, seq_len=S)
    assert set(plan.aux_losses) == {"router_z_loss"}
    ref = 0.01 * torch.logsumexp(x @ router.gate.weight.t(), -1).square().mean()
    assert plan.aux_losses["router_z_loss"].item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("cf", [0.5, 1.0])
def test_stats_dropped_fraction_is_tokens_without_expert(cf):
    router = _ec(top_k=1, capacity_factor=cf, ec_mode="batch")
    x = _x()
    plan = router(x, seq_len=S)
    untouched = (torch.bincount(plan.token_index, minlength=T) == 0).float().mean().item()
    assert plan.stats["dropped_fraction"].item() == pytest.approx(untouched, abs=1e-6)
    assert plan.stats["tokens_per_expert"].tolist() == [float(c) for c in plan.counts.tolist()]
    assert plan.stats["max_load"].item() == pytest.approx(1.0)
    if cf == 0.5:  # E * C = 4 * 4 = 16 rows for 30 tokens: at least 14 tokens got no expert
        assert untouched >= 14 / 30


# ---------------------------------------------------------------- causality of per_position, leakage of batch

def _rows_before(plan, s0: int, seq_len: int) -> list[tuple[int, int, float]]:
    keep = plan.token_index % seq_len < s0
    rows = zip(plan.token_index[keep].tolist(), plan.expert_index[keep].tolist(), plan.weight[keep].tolist())
    return sorted(rows)


def _ec_layer(mode: str, k: int = 1, dispatcher: str = "einsum", seed: int = 0) -> MoELayer:
    router = RouterConfig(name="expert_choice", top_k=k, capacity_factor=1.0, min_capacity=1, ec_mode=mode,
                          z_loss_coef=0.0)
    torch.manual_seed(seed)
    layer = MoELayer(model_cfg(router, dispatcher))
    _spread(layer)
    return layer


def test_per_position_plan_and_layer_ignore_later_positions():
    s0 = 3
    layer = _ec_layer("per_position")
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(3))
    x2 = x.clone()
    x2[:, s0:] = 5.0 * layer.router.gate.weight[0] + torch.randn(B, S - s0, D)  # later positions all want expert 0
    y, plan = layer(x)
    y2, plan2 = layer(x2)
    assert _rows_before(plan, s0, S) == _rows_before(plan2, s0, S)
    torch.testing.assert_close(y[:, :s0], y2[:, :s0], rtol=0, atol=1e-6)
    assert not torch.allclose(y[:, s0:], y2[:, s0:])


def test_batch_mode_lets_later_positions_change_earlier_routing():
    """The same change as above, in the paper's batch mode: later tokens now crowd earlier ones out of expert 0."""
    s0 = 3
    layer = _ec_layer("batch")
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(3))
    x2 = x.clone()
    x2[:, s0:] = 5.0 * layer.router.gate.weight[0] + torch.randn(B, S - s0, D)
    y, plan = layer(x)
    y2, plan2 = layer(x2)
    early_on_0 = [t for t, e, _ in _rows_before(plan, s0, S) if e == 0]
    early_on_0_after = [t for t, e, _ in _rows_before(plan2, s0, S) if e == 0]
    assert early_on_0 and not early_on_0_after  # C = 8 slots of expert 0, all taken by the 12 later tokens
    assert not torch.allclose(y[:, :s0], y2[:, :s0], atol=1e-4)


@pytest.mark.parametrize("mode,causal", [("per_position", True), ("batch", False)])
def test_transformer_logits_of_earlier_positions(mode, causal):
    """Changing tokens at positions >= s0 leaves the logits before s0 unchanged only in per_position mode."""
    router = RouterConfig(name="expert_choice", top_k=2, capacity_factor=1.0, min_capacity=1, ec_mode=mode)
    cfg = model_cfg(router, "sorted", seq=8)
    torch.manual_seed(0)
    model = Transformer(cfg)
    for block in model.blocks:
        torch.nn.init.normal_(block.ffn.router.gate.weight, 0.0, 1.0)
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(0, VOCAB, (8, 8), generator=g)
    idx2 = idx.clone()
    idx2[:, 4:] = torch.randint(0, VOCAB, (8, 4), generator=g)
    with torch.no_grad():
        a, b = model(idx).logits, model(idx2).logits
    if causal:
        torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=1e-6)
    else:
        assert (a[:, :4] - b[:, :4]).abs().max() > 1e-3


# ---------------------------------------------------------------- evaluation: small groups fall back to top-k

def test_eval_top_k():
    assert eval_top_k(1.0, 2, 8) == 2
    assert eval_top_k(2.0, 1, 8) == 2  # the paper's EC-CF2
    assert eval_top_k(0.25, 1, 8) == 1
    assert eval_top_k(4.0, 2, 4) == 4


@pytest.mark.parametrize("k", [1, 2])
def test_eval_single_sequence_falls_back_to_token_choice(k):
    """Generation with one sequence: per-position groups hold one token, 1 * k < E, so each token takes its own
    top-k experts weighted by its scores, independently of the rest of the batch."""
    router = _ec(top_k=k).eval()
    x = _x(t=S)
    plan = router(x, seq_len=S)  # B = 1
    check_plan_invariants(plan, S, E)
    assert plan.capacity is None
    assert torch.equal(torch.bincount(plan.token_index, minlength=S), torch.full((S,), k))
    scores = _scores(router, x)
    got = torch.zeros(S, E, dtype=torch.bool)
    got[plan.token_index, plan.expert_index] = True
    assert torch.equal(got, torch.zeros(S, E, dtype=torch.bool).scatter_(1, scores.topk(k, -1).indices, True))
    torch.testing.assert_close(plan.weight, scores[plan.token_index, plan.expert_index], rtol=1e-6, atol=1e-7)
    assert plan.stats["dropped_fraction"].item() == 0.0
    # a token's plan is the same alone or with the others
    alone = router(x[2:3], seq_len=1)
    assert sorted(alone.expert_index.tolist()) == sorted(plan.expert_index[plan.token_index == 2].tolist())


def test_eval_with_large_groups_keeps_expert_choice():
    router = _ec(top_k=1).eval()  # B = 6 tokens per group, 1 * 6 * 1 >= 4 experts
    plan = router(_x(), seq_len=S)
    assert plan.counts.tolist() == [S * 2] * E  # C = ceil(6 / 4) = 2 per group
    train_plan = router.train()(_x(), seq_len=S)
    assert torch.equal(plan.token_index, train_plan.token_index)


def test_eval_capacity_factor_is_used_at_evaluation():
    router = _ec(top_k=1, capacity_factor=1.0, eval_capacity_factor=2.0).eval()
    plan = router(_x(), seq_len=S)
    assert plan.counts.tolist() == [S * 3] * E  # C = ceil(2 * 6 / 4) = 3
    assert router.train()(_x(), seq_len=S).counts.tolist() == [S * 2] * E


def test_training_with_tiny_groups_warns_and_every_expert_takes_the_token():
    router = _ec(top_k=1)
    with pytest.warns(UserWarning, match="less than one slot"):
        plan = router(_x(t=S), seq_len=S)
    assert plan.counts.tolist() == [S] * E
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        router(_x(), seq_len=S)  # B = 6: no warning


def test_config_errors():
    with pytest.raises(ValueError, match="model.moe.router.capacity_factor"):
        RouterConfig(name="expert_choice", capacity_factor=0.0)
    with pytest.raises(ValueError, match="model.moe.router.eval_capacity_factor"):
        RouterConfig(name="expert_choice", capacity_factor=1.0, eval_capacity_factor=-1.0)
    with pytest.raises(ValueError, match="model.moe.router.ec_mode"):
        RouterConfig(name="expert_choice", capacity_factor=1.0, ec_mode="causal")
    with pytest.raises(ValueError, match="seq_len|T = B"):
        _ec()(_x(t=T - 1), seq_len=S)


# ---------------------------------------------------------------- shared MoE-layer helpers (test_hash, test_gshard)

def model_cfg(router: RouterConfig, dispatcher: str = "einsum", seq: int = S, n_layer: int = 2) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, n_layer=n_layer, d_model=D, n_head=2, d_ff=16, max_seq_len=max(seq, 8),
                       moe=MoEConfig(layers="all", num_experts=E, dispatcher=dispatcher, router=router))


@torch.no_grad()
def _spread(layer: MoELayer) -> None:
    if layer.router.gate is not None:
        torch.nn.init.normal_(layer.router.gate.weight, 0.0, 1.0)
    for p in layer.experts.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)


def layer_pair(router: RouterConfig, seed: int = 0) -> dict[str, MoELayer]:
    """One MoELayer per dispatcher, all with the weights (and buffers) of the einsum one."""
    torch.manual_seed(seed)
    ref = MoELayer(model_cfg(router, "einsum"))
    _spread(ref)
    layers = {"einsum": ref}
    for name in DISPATCHERS:
        if name != "einsum":
            layers[name] = MoELayer(model_cfg(router, name))
            layers[name].load_state_dict(ref.state_dict())
    return layers


def run_layer(layer: MoELayer, x: torch.Tensor, ids: Optional[torch.Tensor], g: torch.Tensor, rng_seed: int = 7):
    """Forward and backward of (y * g).sum(); the global RNG is reseeded so random routing draws the same."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(rng_seed)
    y, plan = layer(x, ids)
    (y * g).sum().backward()
    grads = {"x": x.grad}
    if layer.router.gate is not None:
        grads["gate"] = layer.router.gate.weight.grad
    grads.update({n: p.grad for n, p in layer.experts.named_parameters()})
    return y.detach(), grads, plan


def assert_dispatchers_agree(router: RouterConfig, training: bool = True, seq: int = S):
    """Every dispatcher gives the einsum layer's outputs and gradients (x, the gate, the experts)."""
    layers = layer_pair(router)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(B, seq, D, generator=gen)
    ids = torch.randint(0, VOCAB, (B, seq), generator=gen)
    g = torch.randn(B, seq, D, generator=gen)
    results = {}
    for name, layer in layers.items():
        layer.train(training)
        results[name] = run_layer(layer, x, ids, g)
    y_ref, g_ref, plan_ref = results["einsum"]
    for name, (y, grads, plan) in results.items():
        assert torch.equal(plan.token_index, plan_ref.token_index)
        assert torch.equal(plan.expert_index, plan_ref.expert_index)
        torch.testing.assert_close(y, y_ref, **TOL)
        assert grads.keys() == g_ref.keys()
        for n in grads:
            assert grads[n] is not None, f"{name}: no gradient for {n}"
            torch.testing.assert_close(grads[n], g_ref[n], **TOL, msg=lambda m: f"{name}, grad of {n}: {m}")
    return results


def train_one_step(router: RouterConfig, steps: int = 1) -> list[float]:
    """A tiny Transformer with every FFN sparse: forward, backward and AdamW steps; returns the losses."""
    torch.manual_seed(0)
    model = Transformer(model_cfg(router, "sorted", seq=8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, VOCAB, (4, 9), generator=gen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(steps):
        out = model(idx[:, :-1], idx[:, 1:])
        loss = out.total_loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), n
        opt.step()
        losses.append(loss.item())
        assert set(out.stats) == {0, 1}
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("experts" in n for n in changed)
    if router.name != "hash":
        assert any("router.gate" in n for n in changed), "the router gate must learn"
    return losses


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", ["per_position", "batch"])
@pytest.mark.parametrize("k", [1, 2])
def test_dispatchers_agree(mode, k, training):
    router = RouterConfig(name="expert_choice", top_k=k, capacity_factor=1.0, min_capacity=1, ec_mode=mode,
                          z_loss_coef=0.001)
    results = assert_dispatchers_agree(router, training)
    plan = results["einsum"][2]
    check_plan_invariants(plan, B * S, E)


def test_eval_fallback_dispatchers_agree():
    # one sequence at evaluation: the token-choice fallback plan goes through both dispatchers too
    router = RouterConfig(name="expert_choice", top_k=2, capacity_factor=1.0, min_capacity=1)
    layers = layer_pair(router)
    x = torch.randn(1, S, D, generator=torch.Generator().manual_seed(5))
    g = torch.randn(1, S, D, generator=torch.Generator().manual_seed(6))
    out = {name: run_layer(layer.eval(), x, None, g) for name, layer in layers.items()}
    assert out["einsum"][2].capacity is None
    torch.testing.assert_close(out["sorted"][0], out["einsum"][0], **TOL)
    for n in out["einsum"][1]:
        torch.testing.assert_close(out["sorted"][1][n], out["einsum"][1][n], **TOL)


def test_training_step():
    losses = train_one_step(RouterConfig(name="expert_choice", top_k=2, capacity_factor=1.0, min_capacity=1), steps=3)
    assert losses[-1] < losses[0]
