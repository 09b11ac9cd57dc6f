"""The tutel dispatcher adapter: the plan -> critical-data conversion, checked through a model of Tutel's kernels
(their documented semantics in plain torch), and against real Tutel where it is installed."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from moe.dispatch.einsum import einsum_dispatch
from moe.dispatch.tutel import critical_data, tutel_dispatch
from moe.experts import Experts
from routing import RouterConfig, RoutingPlan, build_router

T, E, D, F = 24, 4, 8, 12
TOL = dict(rtol=1e-5, atol=1e-5)


def _valid(idx, loc, C):
    return (idx >= 0) & (loc < C)


def _model_encode(data, crit, is_postscore=True):
    """tutel.impls.fast_dispatch.fast_encode: x[t] copied into slot idx*C+loc of an [E*C, d] buffer."""
    num_e, idx_s, loc_s, gates_s, C = crit
    buf = data.new_zeros(num_e * C, data.shape[-1])
    for idx, loc, g in zip(idx_s, loc_s, gates_s):
        ok = _valid(idx, loc, C)
        rows = data if is_postscore else data * g[:, None]
        buf = buf.index_add(0, (idx.long() * C + loc.long())[ok], rows[ok])
    return buf.view(num_e, -1, data.shape[-1])


def _model_decode(data, crit, is_postscore=True):
    """fast_decode: y[t] = sum_j gate_j[t] * buffer[idx_j[t]*C + loc_j[t]], skipped entries contribute 0."""
    num_e, idx_s, loc_s, gates_s, C = crit
    out = 0
    for idx, loc, g in zip(idx_s, loc_s, gates_s):
        ok = _valid(idx, loc, C)
        slot = (idx.long().clamp(min=0) * C + loc.long().clamp(max=C - 1))
        rows = data[slot] * ok[:, None]
        out = out + (rows * g[:, None] if is_postscore else rows)
    return out


@pytest.fixture
def tutel_model(monkeypatch):
    mod = types.ModuleType("tutel.impls.fast_dispatch")
    mod.fast_encode, mod.fast_decode = _model_encode, _model_decode
    monkeypatch.setitem(sys.modules, "tutel.impls.fast_dispatch", mod)


def _setup(router_cfg, seed=0, glu=False, bias=True):
    torch.manual_seed(seed)
    router = build_router(D, E, router_cfg)
    experts = Experts(E, D, F, "gelu", glu, bias)
    with torch.no_grad():
        torch.nn.init.normal_(router.gate.weight, 0.0, 1.0)
        for p in experts.parameters():
            torch.nn.init.normal_(p, 0.0, 0.3)
    return router, experts, torch.randn(T, D)


def _run(dispatch, router, experts, x, g):
    for p in list(router.parameters()) + list(experts.parameters()):
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    plan = router(x)
    y = dispatch(x, plan, experts)
    (y * g).sum().backward()
    grads = {"x": x.grad, "gate": router.gate.weight.grad, **{n: p.grad for n, p in experts.named_parameters()}}
    return y.detach(), grads, plan


ROUTERS = {
    "top1": RouterConfig(top_k=1, aux_loss_coef=0.0, z_loss_coef=0.0),
    "top2": RouterConfig(top_k=2, aux_loss_coef=0.0, z_loss_coef=0.0),
    "top2-capacity": RouterConfig(top_k=2, capacity_factor=1.0, min_capacity=1, aux_loss_coef=0.0, z_loss_coef=0.0),
    "expert-choice": RouterConfig(name="expert_choice", top_k=2, capacity_factor=1.0, ec_mode="batch", aux_loss_coef=0.0, z_loss_coef=0.0),
}


@pytest.mark.parametrize("glu", [False, True], ids=["ffn", "glu"])
@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_tutel_adapter_equals_einsum(tutel_model, name, glu):
    router, experts, x = _setup(ROUTERS[name], glu=glu)
    g = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    ref = _run(einsum_dispatch, router, experts, x, g)
    got = _run(tutel_dispatch, router, experts, x, g)
    torch.testing.assert_close(got[0], ref[0], **TOL)
    for n in ref[1]:
        torch.testing.assert_close(got[1][n], ref[1][n], **TOL, msg=lambda m: f"grad of {n}: {m}")
    if name == "top2-capacity":
        assert got[2].stats["dropped_fraction"] > 0, "the capacity case must drop tokens"


def test_critical_data_known_values():
    # token 0 -> experts 0 and 2; token 1 -> expert 2 only; token 2 -> nothing (dropped); rows sorted by expert
    plan = RoutingPlan(token_index=torch.tensor([0, 0, 1]), expert_index=torch.tensor([0, 2, 2]),
                       weight=torch.tensor([0.7, 0.3, 1.0]), counts=torch.tensor([1, 0, 2]), num_tokens=3)
    num_e, idx, loc, gates, C = critical_data(plan)
    assert num_e == 3 and C == 2 and len(idx) == 2
    assert torch.stack(idx).tolist() == [[0, 2, -1], [2, -1, -1]]
    assert torch.stack(loc).tolist() == [[0, 1, 0], [0, 0, 0]]
    torch.testing.assert_close(torch.stack(gates), torch.tensor([[0.7, 1.0, 0.0], [0.3, 0.0, 0.0]]))


def test_missing_tutel_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tutel", None)  # an import of tutel now raises ImportError
    monkeypatch.delitem(sys.modules, "tutel.impls.fast_dispatch", raising=False)
    router, experts, x = _setup(ROUTERS["top1"])
    with pytest.raises(ValueError, match="not on PyPI"):
        tutel_dispatch(x, router(x), experts)


def test_real_tutel_equals_einsum():
    pytest.importorskip("tutel", reason="tutel is not installed (it is not on PyPI; build it from source)")
    router, experts, x = _setup(ROUTERS["top2-capacity"])
    g = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    ref = _run(einsum_dispatch, router, experts, x, g)
    got = _run(tutel_dispatch, router, experts, x, g)
    torch.testing.assert_close(got[0], ref[0], **TOL)
    for n in ref[1]:
        torch.testing.assert_close(got[1][n], ref[1][n], **TOL)


def test_layer_with_tutel_dispatcher(tutel_model):
    """model.moe.dispatcher=tutel selects the adapter in a whole MoE layer; without tutel it is a clear error."""
    from moe.config import ModelConfig, MoEConfig
    from moe.dispatch import describe_dispatch
    from moe.layer import MoELayer

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=D, d_ff=F, n_head=2, moe=MoEConfig(layers="all", num_experts=E, dispatcher="tutel"))
    layer = MoELayer(cfg)
    x = torch.randn(2, T // 2, D)
    y, _ = layer(x)
    layer.dispatcher = "sorted"
    torch.testing.assert_close(y, layer(x)[0], **TOL)
    layer.dispatcher = "tutel"
    assert "dispatcher: tutel" in describe_dispatch(layer)
    sys.modules["tutel.impls.fast_dispatch"] = None  # the fixture restores it
    with pytest.raises(ValueError, match="not on PyPI"):
        layer(x)
