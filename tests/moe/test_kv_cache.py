"""KV-cache generation: the cache path equals the no-cache path token for token (greedy) and logit for logit
(within 1e-5) for every backbone option, padded batches equal each prompt alone, routing at decode drops nothing,
expert choice routes per token, and past max_seq_len the cache hands over to the window."""
import pytest
import torch

from moe import ModelConfig, MoEConfig, Transformer
from moe.generation import left_pad, padding_of
from moe.kv_cache import KVCache, positions_and_mask
from routing import RouterConfig, build_router
from routing.generation import generating, generation

V = 64
TOL = 1e-5

# One entry per backbone option the cache must handle. Untied embeddings and a larger init so that random
# weights do not just repeat the last token (a greedy test over a constant sequence would prove little).
BACKBONES = {
    "learned": dict(activation="gelu_tanh", norm="layernorm", position="learned", attn_bias="all", ffn_bias=True),
    "learned_offset": dict(activation="relu", norm="layernorm", position="learned", position_offset=2,
                           attn_bias="all", ffn_bias=True),  # OPT
    "rope_gqa": dict(activation="silu", glu=True, norm="rmsnorm", position="rope", n_kv_head=2),  # Llama
    "rope_mqa": dict(activation="silu", glu=True, norm="rmsnorm", position="rope", n_kv_head=1, rope_theta=500.0),
    "rope_mha": dict(activation="silu", glu=True, norm="rmsnorm", position="rope", attn_bias="qkv"),  # Qwen2 biases
    "none": dict(activation="gelu", norm="layernorm", position="none"),
}


def _cfg(backbone="rope_gqa", router=None, layers="every:2", dispatcher="sorted", **over):
    base = dict(vocab_size=V, n_layer=3, d_model=32, n_head=4, d_ff=48, max_seq_len=40, tie_embeddings=False,
                init_std=0.2)
    base.update(BACKBONES[backbone])
    base.update(over)
    router = router or RouterConfig(top_k=2)
    return ModelConfig(**base, moe=MoEConfig(layers=layers, num_experts=4, dispatcher=dispatcher, router=router))


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def _prompt(b, s, seed=0):
    return torch.randint(0, V, (b, s), generator=torch.Generator().manual_seed(seed))


def _cached_logits(model, idx, pad=None):
    """Logits [B, S, V] of idx fed as a prefill of its first 3 tokens and then one token per forward."""
    with generation():
        cache = KVCache(model.cfg, idx.shape[1], pad=pad)
        out = [model(idx[:, :3], cache=cache).logits]
        for s in range(3, idx.shape[1]):
            out.append(model(idx[:, s:s + 1], cache=cache).logits)
    return torch.cat(out, dim=1)


def _full_logits(model, idx, pad=None):
    with torch.no_grad(), generation():
        return model(idx, pad=pad).logits


# ---------------------------------------------------------------- the cache equals the window, per backbone


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_cached_logits_equal_the_full_forward(backbone):
    model = _model(_cfg(backbone))
    idx = _prompt(2, 14)
    with torch.no_grad():
        cached, full = _cached_logits(model, idx), _full_logits(model, idx)
    assert cached.shape == full.shape == (2, 14, V)
    assert (cached - full).abs().max().item() < TOL


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_cached_greedy_tokens_equal_the_no_cache_path(backbone):
    model = _model(_cfg(backbone))
    prompt = _prompt(2, 5)
    cached = model.generate(prompt, 20, temperature=0)
    plain = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert cached.shape == (2, 25) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, plain)
    assert all(len(set(row[5:].tolist())) >= 3 for row in cached)  # the continuation is not one repeated token
    # and each new token is the argmax of a plain forward over what precedes it
    with torch.no_grad():
        for s in (5, 12, 24):
            assert torch.equal(cached[:, s], model(cached[:, :s]).logits[:, -1].argmax(-1))


def test_sampling_with_the_cache_equals_sampling_without():
    model = _model(_cfg())
    prompt = _prompt(3, 4)
    draws = [model.generate(prompt, 12, temperature=1.0, top_k=8, generator=torch.Generator().manual_seed(7),
                            use_cache=use) for use in (True, False)]
    assert torch.equal(*draws)


@pytest.mark.parametrize("dispatcher", ["sorted", "einsum"])
def test_dense_and_all_sparse_models_and_dispatchers(dispatcher):
    for layers in ("none", "all"):
        model = _model(_cfg(layers=layers, dispatcher=dispatcher))
        prompt = _prompt(2, 6, seed=1)
        assert torch.equal(model.generate(prompt, 10, temperature=0),
                           model.generate(prompt, 10, temperature=0, use_cache=False)), layers


# ---------------------------------------------------------------- left-padded batches


PROMPTS = [[3, 9, 27], [1, 2, 3, 4, 5, 6, 7, 8], [40, 41, 42, 43, 44], [17]]


def test_left_pad_and_padding_of():
    idx, mask = left_pad(PROMPTS, pad_id=0)
    assert idx.shape == mask.shape == (4, 8)
    assert idx[0].tolist() == [0, 0, 0, 0, 0, 3, 9, 27] and mask[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert padding_of(mask, idx.shape).tolist() == [5, 0, 3, 7]
    with pytest.raises(ValueError, match="left"):
        padding_of(torch.tensor([[1, 1, 0]]), torch.Size([1, 3]))  # right padding
    with pytest.raises(ValueError, match="left"):
        padding_of(torch.tensor([[0, 0, 0]]), torch.Size([1, 3]))  # a row without a token
    with pytest.raises(ValueError, match="does not match"):
        padding_of(torch.ones(2, 3), torch.Size([2, 4]))
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []])


def test_positions_and_mask_of_padded_rows():
    pad = torch.tensor([2, 0])
    positions, mask = positions_and_mask(pad, past=0, new=4, device=torch.device("cpu"))
    assert positions.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert mask.shape == (2, 1, 4, 4)
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]  # pads see themselves
    assert mask[1, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    positions, mask = positions_and_mask(pad, past=4, new=1, device=torch.device("cpu"))
    assert positions.tolist() == [[2], [4]] and mask[:, 0, 0].int().tolist() == [[0, 0, 1, 1, 1], [1] * 5]
    # no padding: sdpa's own causal rule for a prefill, nothing for one new token
    assert positions_and_mask(None, 0, 4, torch.device("cpu"))[1] is None
    assert positions_and_mask(None, 6, 1, torch.device("cpu"))[1] is None


@pytest.mark.parametrize("backbone", ["learned", "learned_offset", "rope_gqa", "none"])
@pytest.mark.parametrize("dispatcher", ["sorted", "einsum"])
def test_padded_batch_rows_equal_each_prompt_alone(backbone, dispatcher):
    model = _model(_cfg(backbone, dispatcher=dispatcher))
    idx, mask = left_pad(PROMPTS, pad_id=0)
    pad = padding_of(mask, idx.shape)
    n = 12
    batch = model.generate(idx, n, temperature=0, attention_mask=mask)
    plain = model.generate(idx, n, temperature=0, attention_mask=mask, use_cache=False)
    assert torch.equal(batch, plain)
    full = _full_logits(model, idx, pad)
    for b, p in enumerate(PROMPTS):
        alone = model.generate(torch.tensor([p]), n, temperature=0)
        assert batch[b, 8:].tolist() == alone[0, len(p):].tolist(), b
        # the padded row's logits on its real tokens are the prompt's own
        diff = (full[b, pad[b]:] - _full_logits(model, torch.tensor([p]))[0]).abs().max().item()
        assert diff < TOL, (b, diff)
    assert len({tuple(row[8:].tolist()) for row in batch}) == 4  # four different continuations


def test_padded_cached_logits_equal_the_padded_full_forward():
    model = _model(_cfg("rope_gqa"))
    idx, mask = left_pad([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [1, 2, 3, 4, 5, 6, 7]])
    pad = padding_of(mask, idx.shape)
    with torch.no_grad():
        cached, full = _cached_logits(model, idx, pad), _full_logits(model, idx, pad)
    assert (cached[0] - full[0]).abs().max().item() < TOL
    assert (cached[1, 3:] - full[1, 3:]).abs().max().item() < TOL  # row 1's real tokens start at slot 3


def test_hash_routing_reads_the_new_token_ids():
    model = _model(_cfg(router=RouterConfig(name="hash", top_k=1), layers="all"))
    idx, mask = left_pad(PROMPTS[:2])
    out = model.generate(idx, 8, temperature=0, attention_mask=mask)
    assert torch.equal(out, model.generate(idx, 8, temperature=0, attention_mask=mask, use_cache=False))
    assert out[1, 8:].tolist() == model.generate(torch.tensor([PROMPTS[1]]), 8, temperature=0)[0, 8:].tolist()


# ---------------------------------------------------------------- routing at decode: no capacity


CAPACITY_ROUTERS = {
    "switch": RouterConfig(top_k=1, order="softmax_topk", capacity_factor=1.0, eval_capacity_factor=1.0,
                           min_capacity=1, drop_policy="position"),
    "topk_capped": RouterConfig(top_k=2, capacity_factor=-1.0, min_capacity=1),
    "sinkhorn": RouterConfig(name="sinkhorn", top_k=1, capacity_factor=1.0, min_capacity=1),
    "bias_balanced": RouterConfig(name="bias_balanced", top_k=2, capacity_factor=1.0, min_capacity=1),
}


@pytest.mark.parametrize("name", list(CAPACITY_ROUTERS))
def test_capacity_routers_drop_at_evaluation_but_not_while_generating(name):
    router = build_router(8, 4, CAPACITY_ROUTERS[name]).eval()
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0] = 1.0  # every token prefers expert 0: a capacity must drop most of them
    x = torch.rand(12, 8) + 0.5
    dropped = router(x)
    assert dropped.kept.float().mean().item() <= 0.5  # half the choices or more dropped
    assert not generating()
    with generation():
        assert generating()
        kept = router(x)
    assert not generating()
    assert bool(kept.kept.all()) and kept.capacity is None
    assert int(kept.counts[0]) == 12 and kept.token_index.numel() == 12 * CAPACITY_ROUTERS[name].top_k


def test_no_aux_losses_or_statistics_while_generating():
    model = _model(_cfg(layers="all"))
    idx = _prompt(2, 6)
    with torch.no_grad():
        out = model(idx)
        with generation():
            gen = model(idx)
    assert set(out.aux_losses) == {"load_balancing_loss", "router_z_loss"} and len(out.stats) == 3
    assert gen.aux_losses == {} and all(s == {} for s in gen.stats.values())
    assert torch.equal(out.logits, gen.logits)  # a dropless router: the same routing either way


@pytest.mark.parametrize("name", list(CAPACITY_ROUTERS))
def test_capacity_router_models_generate_rows_as_alone(name):
    model = _model(_cfg(router=CAPACITY_ROUTERS[name], layers="all"))
    idx, mask = left_pad(PROMPTS)
    out = model.generate(idx, 10, temperature=0, attention_mask=mask)
    assert torch.equal(out, model.generate(idx, 10, temperature=0, attention_mask=mask, use_cache=False))
    for b, p in enumerate(PROMPTS):
        assert out[b, 8:].tolist() == model.generate(torch.tensor([p]), 10, temperature=0)[0, len(p):].tolist()


# ---------------------------------------------------------------- expert choice: per token while generating


@pytest.mark.parametrize("mode", ["per_position", "batch"])
def test_expert_choice_routes_each_token_alone_while_generating(mode):
    cfg = RouterConfig(name="expert_choice", top_k=2, capacity_factor=1.0, min_capacity=1, aux_loss_coef=0.0,
                       ec_mode=mode)
    router = build_router(8, 4, cfg).eval()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    competing = router(x, seq_len=2)  # 8 sequences of 2: groups big enough for the experts to choose
    assert competing.token_index.numel() == competing.capacity * 4  # expert choice: E * (P * C) rows
    with generation():
        plan = router(x, seq_len=2)
    # each token its top round(capacity_factor * top_k) = 2 experts by score, weighted by the scores
    scores = torch.softmax(router.logits(x), dim=-1)
    w, e = scores.topk(2, dim=-1)
    assert plan.capacity is None and plan.token_index.numel() == 32
    got = torch.zeros(16, 4).index_put_((plan.token_index, plan.expert_index), plan.weight)
    want = torch.zeros(16, 4).scatter_(1, e, w)
    assert (got - want).abs().max().item() < 1e-7


@pytest.mark.parametrize("mode", ["per_position", "batch"])
def test_expert_choice_models_generate_rows_as_alone(mode):
    cfg = RouterConfig(name="expert_choice", top_k=2, capacity_factor=1.0, min_capacity=1, aux_loss_coef=0.0,
                       ec_mode=mode)
    model = _model(_cfg(router=cfg, layers="all"))
    idx, mask = left_pad(PROMPTS)
    out = model.generate(idx, 10, temperature=0, attention_mask=mask)
    assert torch.equal(out, model.generate(idx, 10, temperature=0, attention_mask=mask, use_cache=False))
    for b, p in enumerate(PROMPTS):
        assert out[b, 8:].tolist() == model.generate(torch.tensor([p]), 10, temperature=0)[0, len(p):].tolist()


# ---------------------------------------------------------------- max_seq_len, eos, modes


def test_past_max_seq_len_the_cache_hands_over_to_the_window():
    model = _model(_cfg(max_seq_len=10))
    prompt = _prompt(2, 4)
    cached = model.generate(prompt, 14, temperature=0)
    assert cached.shape == (2, 18)
    assert torch.equal(cached, model.generate(prompt, 14, temperature=0, use_cache=False))
    with torch.no_grad():  # every token past the window is the argmax over the last 10 tokens, positions from 0
        for s in range(10, 18):
            assert torch.equal(cached[:, s], model(cached[:, s - 10:s]).logits[:, -1].argmax(-1)), s
    long_prompt = _prompt(1, 13)  # longer than max_seq_len: the window from the start
    assert torch.equal(model.generate(long_prompt, 3, temperature=0),
                       model.generate(long_prompt, 3, temperature=0, use_cache=False))


def test_padded_rows_past_max_seq_len():
    model = _model(_cfg(max_seq_len=10))
    idx, mask = left_pad(PROMPTS)  # width 8: the window fills after 2 new tokens
    out = model.generate(idx, 6, temperature=0, attention_mask=mask)
    assert torch.equal(out, model.generate(idx, 6, temperature=0, attention_mask=mask, use_cache=False))


def test_cache_limits_are_errors_that_name_the_fix():
    cfg = _cfg(max_seq_len=10)
    model = _model(cfg)
    with pytest.raises(ValueError, match="max_seq_len=10"):
        KVCache(cfg, 11)
    cache = KVCache(cfg, 6)
    with torch.no_grad(), generation():
        model(_prompt(1, 4), cache=cache)
        with pytest.raises(ValueError, match="4 of 6 slots"):
            model(_prompt(1, 3), cache=cache)
        with pytest.raises(ValueError, match="KVCache"):
            model(_prompt(1, 1), cache=cache, pad=torch.tensor([0]))
    assert cache.length == 4  # the refused forward wrote nothing
    assert cache.layers[0].keys.shape == (1, 2, 6, 8)  # [B, G, L, hd]: GQA caches the 2 key/value heads, not 4


def test_eos_rows_repeat_it_and_generation_stops_when_all_have():
    model = _model(_cfg())
    idx, mask = left_pad(PROMPTS[:2])
    free = model.generate(idx, 10, temperature=0, attention_mask=mask)
    eos = free[0, 8 + 2].item()  # row 0's third new token
    assert eos not in free[0, 8:10].tolist()
    out = model.generate(idx, 10, temperature=0, attention_mask=mask, eos_id=eos)
    first = {b: (free[b, 8:] == eos).nonzero()[0].item() if eos in free[b, 8:].tolist() else None for b in (0, 1)}
    assert out[0, 8:11].tolist() == free[0, 8:11].tolist() and set(out[0, 11:].tolist()) <= {eos}
    stop = first[1]
    if stop is None:  # row 1 never says eos: it runs to the end, as without eos_id
        assert out.shape == (2, 18) and out[1].tolist() == free[1].tolist()
    else:  # both rows finished by then: generation stopped there
        assert out.shape[1] == 8 + max(2, stop) + 1


def test_generate_runs_in_eval_mode_and_restores_the_mode():
    model = _model(_cfg(dropout=0.3)).train()
    prompt = _prompt(2, 4)
    out = model.generate(prompt, 8, temperature=0)
    assert model.training
    assert torch.equal(out, _model(_cfg(dropout=0.3)).generate(prompt, 8, temperature=0))  # same seed, eval
    assert model.generate(prompt, 0, temperature=0).shape == (2, 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, -1)


def test_on_token_streams_each_step():
    model = _model(_cfg())
    seen = []
    out = model.generate(_prompt(2, 3), 5, temperature=0, on_token=lambda t: seen.append(t.clone()))
    assert len(seen) == 5 and torch.equal(torch.cat(seen, dim=1), out[:, 3:])


def test_the_cache_takes_the_dtype_the_layers_compute_in():
    model = _model(_cfg()).to(torch.bfloat16)
    cache = KVCache(model.cfg, 8)
    with torch.no_grad(), generation():
        model(_prompt(2, 5), cache=cache)
    assert cache.layers[0].keys.dtype == torch.bfloat16 and cache.layers[0].keys.shape == (2, 2, 8, 8)
    fp32 = _model(_cfg())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 weights, bf16 activations: a bf16 cache
        cache = KVCache(fp32.cfg, 8)
        with torch.no_grad(), generation():
            fp32(_prompt(2, 5), cache=cache)
        assert cache.layers[0].keys.dtype == torch.bfloat16
        out = fp32.generate(_prompt(2, 5), 6, temperature=0)
        assert torch.equal(out, fp32.generate(_prompt(2, 5), 6, temperature=0, use_cache=False))
