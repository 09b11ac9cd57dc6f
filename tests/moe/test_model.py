"""The shared Transformer: a 1-expert MoE equals its dense twin, training steps, aux losses, causality, generation."""
import math

import pytest
import torch

from moe import ModelConfig, MoEConfig, Transformer
from moe.layer import MoELayer
from routing import RouterConfig

V, S, B = 64, 12, 2

FAMILIES = {
    "gpt2": dict(activation="gelu_tanh", norm="layernorm", position="learned", attn_bias="all", ffn_bias=True,
                 tie_embeddings=True),
    "opt": dict(activation="relu", norm="layernorm", position="learned", position_offset=2, attn_bias="all",
                ffn_bias=True, tie_embeddings=True),
    "llama": dict(activation="silu", glu=True, norm="rmsnorm", position="rope", n_kv_head=2, attn_bias="none",
                  ffn_bias=False, tie_embeddings=False),
}


def _cfg(family="llama", moe=None, **over):
    base = dict(vocab_size=V, n_layer=2, d_model=16, n_head=4, d_ff=24, max_seq_len=32)
    base.update(FAMILIES[family])
    base.update(over)
    return ModelConfig(**base, moe=moe or MoEConfig())


def _moe(layers="all", num_experts=4, top_k=2, cf=0.0, aux=0.01, z=0.001, dispatcher="sorted", **router):
    return MoEConfig(layers=layers, num_experts=num_experts, dispatcher=dispatcher,
                     router=RouterConfig(top_k=top_k, capacity_factor=cf, aux_loss_coef=aux, z_loss_coef=z, **router))


def _tokens(seed=0, b=B, s=S):
    return torch.randint(0, V, (b, s), generator=torch.Generator().manual_seed(seed))


def _dense_to_one_expert(dense: Transformer, moe_model: Transformer) -> None:
    """Loads the shared entries and copies each DenseFFN into the single expert of the matching MoE layer."""
    dense_sd = dense.state_dict()
    moe_sd = moe_model.state_dict()
    shared = {k: v for k, v in dense_sd.items() if k in moe_sd}
    missing, unexpected = moe_model.load_state_dict(shared, strict=False)
    assert not unexpected
    for i, (db, mb) in enumerate(zip(dense.blocks, moe_model.blocks)):
        ffn, ex = db.ffn, mb.ffn.experts
        assert isinstance(mb.ffn, MoELayer) and ex.num_experts == 1
        with torch.no_grad():
            ex.w_up[0].copy_(ffn.up.weight.t())  # nn.Linear [out, in] -> expert [in, out]
            ex.w_down[0].copy_(ffn.down.weight.t())
            if ffn.gate is not None:
                ex.w_gate[0].copy_(ffn.gate.weight.t())
            if ffn.up.bias is not None:
                ex.b_up[0].copy_(ffn.up.bias)
                ex.b_down[0].copy_(ffn.down.bias)
    # everything not loaded is an expert weight (copied above) or the router gate (irrelevant with one expert)
    assert all(".ffn.experts." in k or ".ffn.router." in k for k in missing), missing


@pytest.mark.parametrize("dispatcher", ["sorted", "einsum"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_expert_moe_equals_dense(family, dispatcher):
    torch.manual_seed(0)
    dense = Transformer(_cfg(family))
    torch.manual_seed(0)
    moe_model = Transformer(_cfg(family, _moe(num_experts=1, top_k=1, cf=0.0, aux=0.0, z=0.0, dispatcher=dispatcher)))
    _dense_to_one_expert(dense, moe_model)
    with torch.no_grad():  # make biases nonzero so that their copying is actually tested
        for m in (dense, moe_model):
            for n, p in m.named_parameters():
                if n.endswith("bias") and "ffn" not in n:
                    p.copy_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p))
        for db, mb in zip(dense.blocks, moe_model.blocks):
            if db.ffn.up.bias is not None:
                db.ffn.up.bias.copy_(torch.linspace(-0.2, 0.2, db.ffn.up.bias.numel()))
                db.ffn.down.bias.copy_(torch.linspace(0.1, -0.1, db.ffn.down.bias.numel()))
                mb.ffn.experts.b_up[0].copy_(db.ffn.up.bias)
                mb.ffn.experts.b_down[0].copy_(db.ffn.down.bias)
    idx, tgt = _tokens(0), _tokens(1)
    a, b = dense(idx, tgt), moe_model(idx, tgt)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-6, atol=1e-6)
    assert a.aux_losses == {} and b.aux_losses == {}
    assert sorted(b.stats) == [0, 1] and a.stats == {}
    for i in b.stats:
        assert b.stats[i]["tokens_per_expert"].tolist() == [B * S]
    # backward agrees too: compare gradients of the shared parameters
    a.loss.backward()
    b.loss.backward()
    moe_params = dict(moe_model.named_parameters())
    for n, p in dense.named_parameters():
        if n in moe_params:
            torch.testing.assert_close(moe_params[n].grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    for db, mb in zip(dense.blocks, moe_model.blocks):
        torch.testing.assert_close(mb.ffn.experts.w_up.grad[0], db.ffn.up.weight.grad.t(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(mb.ffn.experts.w_down.grad[0], db.ffn.down.weight.grad.t(), rtol=1e-4, atol=1e-6)


def test_opt_position_offset_uses_shifted_rows():
    torch.manual_seed(0)
    model = Transformer(_cfg("opt"))
    assert model.pos_embed.weight.shape[0] == 32 + 2
    with torch.no_grad():
        model.pos_embed.weight[:2].fill_(100.0)  # rows 0, 1 are never used with offset 2
    idx = _tokens()
    before = model(idx).logits
    with torch.no_grad():
        model.pos_embed.weight[:2].zero_()
    torch.testing.assert_close(model(idx).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["dense", "moe", "moe_capacity"])
def test_training_step(kind):
    moe = {"dense": MoEConfig(), "moe": _moe("every:2", num_experts=4, top_k=2),
           "moe_capacity": _moe("all", num_experts=4, top_k=2, cf=1.0, min_capacity=1)}[kind]
    torch.manual_seed(0)
    model = Transformer(_cfg("gpt2", moe, n_layer=2, tie_embeddings=False))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx, tgt = _tokens(0, b=4, s=16), _tokens(1, b=4, s=16)
    out = model(idx, tgt)
    assert torch.isfinite(out.loss) and torch.isfinite(out.total_loss)
    assert out.loss.item() == pytest.approx(math.log(V), rel=0.1)  # near-uniform predictions at init
    if kind != "dense":
        assert set(out.aux_losses) == {"load_balancing_loss", "router_z_loss"}
        torch.testing.assert_close(out.total_loss, out.loss + sum(out.aux_losses.values()))
    else:
        assert out.aux_losses == {} and torch.equal(out.total_loss, out.loss)
    opt.zero_grad()
    out.total_loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
    for i, block in enumerate(model.blocks):
        if not isinstance(block.ffn, MoELayer):
            continue
        assert block.ffn.router.gate.weight.grad.abs().sum() > 0
        tokens = out.stats[i]["tokens_per_expert"]
        for e in range(4):
            for n, p in block.ffn.experts.named_parameters():
                if tokens[e] > 0:
                    assert p.grad[e].abs().sum() > 0, f"layer {i} expert {e} {n} received tokens but no gradient"
                else:
                    assert p.grad[e].abs().sum() == 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    changed = sum(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert changed > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    out2 = model(idx, tgt)
    assert torch.isfinite(out2.loss)
    assert out2.loss < out.loss  # one AdamW step on the same batch lowers its loss


def test_aux_losses_summed_and_stats_keyed_by_layer():
    torch.manual_seed(0)
    model = Transformer(_cfg("llama", _moe("1,3", num_experts=4, top_k=2, aux=0.1, z=0.01), n_layer=4))
    plans = {}
    for i, block in enumerate(model.blocks):
        if isinstance(block.ffn, MoELayer):
            block.ffn.router.register_forward_hook(lambda m, inp, out, i=i: plans.__setitem__(i, out))
    out = model(_tokens(), _tokens(1))
    assert sorted(plans) == [1, 3]
    assert sorted(out.stats) == [1, 3]
    for name in ("load_balancing_loss", "router_z_loss"):
        expected = plans[1].aux_losses[name] + plans[3].aux_losses[name]
        torch.testing.assert_close(out.aux_losses[name], expected, rtol=0, atol=0)
        assert plans[1].aux_losses[name] != plans[3].aux_losses[name]  # two different layers
    for i in (1, 3):
        assert out.stats[i] is plans[i].stats
        assert out.stats[i]["tokens_per_expert"].sum().item() == B * S * 2


@pytest.mark.parametrize("kind", ["dense", "moe_sorted", "moe_einsum"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal(kind, family):
    moe = MoEConfig() if kind == "dense" else _moe("all", 4, 2, cf=0.0, dispatcher=kind.split("_")[1])
    torch.manual_seed(0)
    model = Transformer(_cfg(family, moe)).eval()
    idx = _tokens()
    base = model(idx).logits
    for j in (3, S - 1):
        changed = idx.clone()
        changed[:, j] = (changed[:, j] + 7) % V
        logits = model(changed).logits
        torch.testing.assert_close(logits[:, :j], base[:, :j], rtol=0, atol=1e-6)
        assert not torch.allclose(logits[:, j], base[:, j])


def test_tied_embeddings_share_storage():
    torch.manual_seed(0)
    tied = Transformer(_cfg("gpt2"))
    assert tied.lm_head.weight is tied.embed.weight
    assert tied.lm_head.weight.data_ptr() == tied.embed.weight.data_ptr()
    n_unique = len({p.data_ptr() for p in tied.parameters()})
    assert n_unique == len(list(tied.parameters()))  # parameters() lists the shared tensor once
    with torch.no_grad():
        tied.embed.weight[0, 0] = 3.0
    assert tied.lm_head.weight[0, 0].item() == 3.0
    untied = Transformer(_cfg("llama"))
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(Transformer(_cfg("gpt2", tie_embeddings=False))) - count(tied) == V * 16


@pytest.mark.parametrize("moe", [False, True])
def test_generate_greedy_deterministic(moe):
    torch.manual_seed(0)
    model = Transformer(_cfg("llama", _moe("all", 4, 2) if moe else None, max_seq_len=10)).eval()
    prompt = _tokens(b=2, s=4)
    a = model.generate(prompt, max_new_tokens=9, temperature=0)
    b = model.generate(prompt, max_new_tokens=9, temperature=0)
    assert a.shape == (2, 4 + 9)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :4], prompt)
    # greedy: every new token is the argmax of the model's logits on the window before it
    for s in range(4, 13):
        window = a[:, max(0, s - 10):s]
        assert torch.equal(a[:, s], model(window).logits[:, -1].argmax(-1))
    assert model.generate(prompt, max_new_tokens=0, temperature=0).shape == (2, 4)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    s1 = model.generate(prompt, 5, temperature=1.0, top_k=5, generator=g1)
    s2 = model.generate(prompt, 5, temperature=1.0, top_k=5, generator=g2)
    assert s1.shape == (2, 9) and torch.equal(s1, s2)


def test_generate_stops_at_eos():
    torch.manual_seed(0)
    model = Transformer(_cfg("llama")).eval()
    prompt = _tokens(b=1, s=4)
    first = model.generate(prompt, 1, temperature=0)[0, -1].item()
    out = model.generate(prompt, 6, temperature=0, eos_id=first)
    assert out.shape == (1, 5) and out[0, -1].item() == first


def test_sequence_longer_than_max_raises():
    model = Transformer(_cfg("llama", max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(_tokens(s=9))
