"""The Gemma / BLOOM / GPT-Neo backbone options in the training forward, the KV cache and the counts:
sliding windows and ALiBi masks (known values), the cached path equal to the full forward, training that
lowers the loss, activation checkpointing unchanged, parameter and FLOP counts equal to the real model's."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from moe import ModelConfig, MoEConfig, Transformer
from moe.alibi import alibi_bias, alibi_slopes
from moe.attention_masks import block_masks, window_mask
from moe.experts import Experts
from moe.flops import count_params, flops_per_token
from routing import RouterConfig
from tests.moe.test_flops import _counted

BASE = dict(vocab_size=61, n_layer=4, d_model=32, n_head=4, d_ff=48, max_seq_len=40)
GEMMA2 = dict(BASE, activation="gelu_tanh", glu=True, norm="rmsnorm", position="rope", n_kv_head=2, head_dim=12,
              embed_scale=True, norm_unit_offset=True, post_norms=True, attention_pattern="LG", sliding_window=4,
              attn_scale=0.2, attn_softcap=3.0, logit_softcap=5.0)
GEMMA3 = dict(GEMMA2, qk_norm=True, attention_pattern="LLG", rope_local_theta=100.0, attn_softcap=None,
              logit_softcap=None)
BLOOM = dict(BASE, activation="gelu_tanh", norm="layernorm", position="alibi", attn_bias="all", ffn_bias=True,
             embed_norm=True, n_head=3, d_model=30)
GPT_NEO = dict(BASE, activation="gelu_tanh", norm="layernorm", position="learned", attn_bias="o", ffn_bias=True,
               attention_pattern="GL", sliding_window=3, attn_scale=1.0)
KINDS = {"gemma2": GEMMA2, "gemma3": GEMMA3, "bloom": BLOOM, "gpt_neo": GPT_NEO}
MOE = MoEConfig(layers="every:2", num_experts=4, dispatcher="sorted", router=RouterConfig(top_k=2))


def _model(kw, moe=True, seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**kw, moe=MOE if moe else MoEConfig()))
    for m in model.modules():
        if isinstance(m, Experts):
            m.gemm_impl = "loop"  # per-expert matmuls, which FlopCounterMode sees
    with torch.no_grad():  # norms start at their identity; nudge them so a misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape) * 0.1)
    return model.eval()


def _ids(model, b=2, s=12, seed=1):
    return torch.randint(0, model.cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- masks


def test_window_mask_known_values():
    m = window_mask(None, 2, past=0, new=4, device=torch.device("cpu"))[0, 0]
    assert m.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    after = window_mask(None, 3, past=3, new=1, device=torch.device("cpu"))[0, 0]  # one step after 3 cached slots
    assert after.int().tolist() == [[0, 1, 1, 1]]
    assert window_mask(None, 8, past=0, new=4, device=torch.device("cpu")) is None  # covers every key: no mask


def test_alibi_known_values():
    assert alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    assert alibi_slopes(2).tolist() == [2.0 ** -4, 2.0 ** -8]
    assert alibi_slopes(3).tolist() == [2.0 ** -4, 2.0 ** -8, 2.0 ** -2]  # the power of two, then every other of 2n
    b = alibi_bias(torch.tensor([0.5]), past=1, new=2)[0]  # queries at slots 1, 2 over keys 0, 1, 2
    assert b.tolist() == [[-0.5, 0.0, 0.5], [-1.0, -0.5, 0.0]]
    masks = block_masks(None, window=None, slopes=torch.tensor([0.5]), past=0, new=2, device=torch.device("cpu"))
    assert masks["G"][0, 0].tolist() == [[0.0, float("-inf")], [-0.5, 0.0]]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"model\.attention_pattern='LX'"):
        ModelConfig(**dict(GEMMA2, attention_pattern="LX"))
    with pytest.raises(ValueError, match=r"local blocks, which need model\.sliding_window"):
        ModelConfig(**dict(GEMMA2, sliding_window=None))
    with pytest.raises(ValueError, match=r"model\.attn_softcap=-1"):
        ModelConfig(**dict(GEMMA2, attn_softcap=-1))
    with pytest.raises(ValueError, match="need model.norm=rmsnorm"):
        ModelConfig(**dict(BLOOM, qk_norm=True))
    assert ModelConfig(**GEMMA3).layer_kinds == "LLGL" and ModelConfig(**GEMMA3).is_local(3)


# ----------------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_cached_steps_equal_the_full_forward(kind):
    """Prefill 9 tokens, then 6 single steps: each step's logits equal the full forward's at that position (the
    windows of 4 and 3 slide past the prompt; ALiBi's distances continue), with and without left padding."""
    model = _model(KINDS[kind])
    from moe.kv_cache import KVCache

    idx = _ids(model, s=15)
    for pad in (None, torch.tensor([0, 3])):
        full = model(idx, pad=pad).logits
        cache = KVCache(model.cfg, 15, pad=pad)
        steps = [model(idx[:, :9], cache=cache).logits]
        steps += [model(idx[:, t:t + 1], cache=cache).logits for t in range(9, 15)]
        diff = (torch.cat(steps, dim=1) - full).abs().max().item()
        assert diff < 1e-5, f"{kind} pad={pad}: cached vs full {diff:.2e}"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_generate_with_cache_equals_without(kind):
    model = _model(KINDS[kind])
    idx, mask = _ids(model, s=7), torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    a = model.generate(idx, 8, temperature=0, attention_mask=mask)
    b = model.generate(idx, 8, temperature=0, attention_mask=mask, use_cache=False)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_trains_and_checkpointing_changes_nothing(kind):
    model = _model(KINDS[kind]).train()
    idx = _ids(model, s=16)
    grads = []
    for every in (0, 1):
        model.zero_grad()
        model.set_activation_checkpointing(every)
        model(idx, idx).total_loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
    model.set_activation_checkpointing(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        out = model(idx, idx)
        out.total_loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# ----------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_param_and_flop_counts(kind):
    model = _model(KINDS[kind])
    assert count_params(model.cfg).total == sum(p.numel() for p in model.parameters())
    f = flops_per_token(model.cfg, 12)
    with sdpa_kernel(SDPBackend.MATH):
        assert _counted(model, 12) == f.forward * 2 * 12  # soft-capped scores are two matmuls like SDPA's
