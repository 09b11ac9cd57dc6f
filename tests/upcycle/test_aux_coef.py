"""The load-balancing coefficient in transformers' convention (upcycle.export_formats.hf_aux_loss_coef): an exported
model's router_aux_loss_coef * aux_loss equals our scaled balancing loss (issue 17)."""
from __future__ import annotations

import json

import pytest
import torch

from moe.config import MoEConfig
from moe.model import Transformer
from moe.presets import get_preset
from routing.config import RouterConfig
from routing.losses import load_balancing_loss
from routing.topk import select_topk
from tests.upcycle.conftest import ids_for, perturb
from upcycle.export import export_hf
from upcycle.export_formats import aux_loss_coef_from_hf, hf_aux_loss_coef

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

V = 96
BASE = get_preset("tiny_dense").replace(vocab_size=V, n_layer=1, d_model=32, n_head=4, n_kv_head=2, d_ff=48,
                                        max_seq_len=32, rope_theta=50000.0)


def test_conversion_numbers():
    assert hf_aux_loss_coef(0.02, 2, 1) == 0.01  # routing=mixtral on one sparse layer
    assert hf_aux_loss_coef(0.02, 2, 32) == pytest.approx(0.32)
    assert aux_loss_coef_from_hf(0.001, 2, 32) == pytest.approx(6.25e-5)  # Mixtral-8x7B's default, 32 layers, k=2
    assert aux_loss_coef_from_hf(0.001, 2, 1) == pytest.approx(0.002)
    for c, k, n in [(0.01, 1, 1), (0.02, 2, 4), (0.003, 8, 28)]:
        assert aux_loss_coef_from_hf(hf_aux_loss_coef(c, k, n), k, n) == pytest.approx(c, rel=1e-15)
    with pytest.raises(ValueError, match="top_k=0"):
        hf_aux_loss_coef(0.01, 0, 1)


def test_exported_mixtral_aux_loss_equals_ours(tmp_path):
    cfg = BASE.replace(moe=MoEConfig(layers="all", num_experts=4, expert_hidden=16,
                                     router=RouterConfig(top_k=2, aux_loss_coef=0.02, z_loss_coef=0.0)))
    torch.manual_seed(0)
    model = perturb(Transformer(cfg), 0, std=0.1).eval()
    out = export_hf(model, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["router_aux_loss_coef"] == 0.01
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = ids_for(V, length=24)
    with torch.no_grad():
        ours = model(ids).aux_losses["load_balancing_loss"].item()
        theirs = hf(input_ids=ids, output_router_logits=True).aux_loss.item() * hf.config.router_aux_loss_coef
    assert ours == pytest.approx(theirs, rel=1e-6, abs=0)
    assert 0.02 <= ours <= 0.02 * 4  # between perfect balance (1) and collapse (E) times the coefficient


def test_two_layers_equal_loads_same_gradient():
    # Two sparse layers whose experts take the same fraction of assignments but see different probabilities:
    # transformers' pooled loss at coef * L / k has exactly our summed loss's gradient.
    T, E, k, coef = 32, 6, 2, 0.02
    gen = torch.Generator().manual_seed(3)
    g1 = torch.randn(T, E, generator=gen) * 2
    g2 = g1[torch.randperm(T, generator=gen)] + 1e-3 * torch.randn(T, E, generator=gen)
    c1, c2 = (torch.bincount(select_topk(g, k).reshape(-1), minlength=E) for g in (g1, g2))
    assert torch.equal(c1, c2)  # the same loads in both layers
    grads = []
    for hf_side in (False, True):
        a, b = g1.clone().requires_grad_(True), g2.clone().requires_grad_(True)
        if hf_side:
            loss = hf_aux_loss_coef(coef, k, 2) * load_balancing_loss_func((a, b), E, k)
        else:
            loss = coef * sum(load_balancing_loss(torch.softmax(g, -1), select_topk(g, k), E) for g in (a, b))
        loss.backward()
        grads.append((loss.item(), a.grad, b.grad))
    (l0, a0, b0), (l1, a1, b1) = grads
    assert l0 == pytest.approx(l1, rel=1e-6)
    torch.testing.assert_close(a1, a0, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(b1, b0, rtol=1e-5, atol=1e-9)


def test_qwen2_moe_counts_only_sparse_layers(tmp_path):
    cfg = BASE.replace(n_layer=4, moe=MoEConfig(layers="every:2", num_experts=4, expert_hidden=16,
                                                router=RouterConfig(top_k=2, aux_loss_coef=0.01)))
    torch.manual_seed(0)
    out = export_hf(Transformer(cfg), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe"
    assert config["router_aux_loss_coef"] == pytest.approx(0.01)  # 0.01 * 2 sparse layers / k=2
