"""Activation checkpointing per block (Transformer.set_activation_checkpointing): on (every block, every 2nd) equals
off, bit for bit, in loss, aux losses, routing statistics, gradients and router state over AdamW steps, for every
router family, a noisy router, dropout and a dense model; the replay does not count a bias-balanced router's tokens
twice; evaluation, no_grad and generation do not checkpoint; and checkpointing does keep fewer activations."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import moe.model
from moe import ModelConfig, Transformer
from routing.bias_balanced import BiasBalancedRouter
from routing.recompute import recomputation, recomputing
from routing.router import Router

V, S, B, L = 64, 16, 4, 3  # vocabulary, sequence, batch, blocks
STEPS = 3

ROUTERS = {
    "topk": {"top_k": 2, "capacity_factor": 1.0},  # fixed capacity: drops, a data-dependent number of rows
    "topk_noisy": {"top_k": 2, "jitter": 0.2, "random_second": True},  # RNG in the router: replay must redraw it
    "bias_balanced": {"name": "bias_balanced", "top_k": 2, "aux_loss_coef": 0.01, "bias_update_rate": 0.05},
    "expert_choice": {"name": "expert_choice", "top_k": 2, "capacity_factor": 1.0},
    "hash": {"name": "hash", "top_k": 1},
    "base": {"name": "base", "top_k": 1},
    "sinkhorn": {"name": "sinkhorn", "top_k": 2},
}


def _cfg(router: dict | None = None, layers: str = "all", dropout: float = 0.0, ep: int = 1) -> ModelConfig:
    return ModelConfig(vocab_size=V, n_layer=L, d_model=16, n_head=2, d_ff=24, max_seq_len=S, dropout=dropout,
                       moe=dict(layers=layers, num_experts=4, dispatcher="sorted", expert_parallel=ep,
                                router=router or {}))


def _batch(step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    idx = torch.randint(0, V, (B, S + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def _model(cfg: ModelConfig, every: int) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.set_activation_checkpointing(every)
    return model.train()


def _loads(model: Transformer) -> dict[str, torch.Tensor]:
    return {n: m.load.clone() for n, m in model.named_modules() if isinstance(m, BiasBalancedRouter)}


def _train(cfg: ModelConfig, every: int, steps: int = STEPS, rank: int = 0, model: Transformer | None = None) -> dict:
    """Steps of AdamW; records per step the loss, aux losses, statistics, gradients and the bias-balanced loads
    (before after_optimizer_step resets them), then the final weights and buffers and the next global random draw."""
    model = model if model is not None else _model(cfg, every)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(1)  # the same global RNG stream on and off: jitter, random second choices, dropout
    rec: dict = {"loss": [], "aux": [], "stats": [], "grads": [], "loads": []}
    for step in range(steps):
        out = model(*_batch(step, rank))
        out.total_loss.backward()
        if dist.is_initialized():  # data parallelism as the trainers do it: non-expert gradients averaged
            for n, p in model.named_parameters():
                if getattr(p, "allreduce", True):
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
        rec["loss"].append(out.loss.detach())
        rec["aux"].append({k: v.detach() for k, v in out.aux_losses.items()})
        rec["stats"].append(out.stats)
        rec["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        rec["loads"].append(_loads(model))
        opt.step()
        opt.zero_grad(set_to_none=True)
        for m in model.modules():
            if isinstance(m, Router):
                m.after_optimizer_step()
    rec["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    rec["next_random"] = torch.rand(4)  # checkpoint restores the RNG after its replay: the stream goes on unchanged
    return rec


def _assert_equal(a, b, where: str = "") -> None:
    """Bitwise equality of nested records: the replay runs the same kernels on the same inputs."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs: max |diff| {(a.double() - b.double()).abs().max().item():.3g}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a} != {b}"


# ---------------------------------------------------------------- the switch


def test_every_selects_blocks_and_rejects_bad_values():
    model = Transformer(_cfg(layers="none"))
    assert model.activation_checkpointing == 0 and [b.checkpointed for b in model.blocks] == [False] * L
    for every, chosen in ((1, [True, True, True]), (2, [True, False, True]), (3, [True, False, False]),
                          (0, [False, False, False])):
        model.set_activation_checkpointing(every)
        assert model.activation_checkpointing == every
        assert [b.checkpointed for b in model.blocks] == chosen, every
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="activation checkpointing"):
            model.set_activation_checkpointing(bad)
    assert "checkpoint" not in str(model.cfg)  # a run-time choice, not part of the model's config


# ---------------------------------------------------------------- on equals off


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_on_equals_off_over_adamw_steps(router, every):
    """Loss, aux losses, tokens_per_expert and the other statistics, every gradient, the weights and router buffers
    (bias-balanced bias and load) after STEPS AdamW steps, and the global RNG stream afterwards: all bitwise equal."""
    cfg = _cfg(ROUTERS[router])
    off, on = _train(cfg, 0), _train(cfg, every)
    assert set(off["stats"][0]) == set(range(L)) and off["stats"][0][0]["tokens_per_expert"].sum() > 0
    if router in ("topk", "topk_noisy", "bias_balanced", "sinkhorn"):
        assert "load_balancing_loss" in off["aux"][0]
    _assert_equal(on, off, router)
    moved = "blocks.0.ffn.experts.w_up" if router == "hash" else "blocks.0.ffn.router.gate.weight"
    assert not torch.equal(off["state"][moved], _model(cfg, 0).state_dict()[moved])  # the weights did train
    if router == "bias_balanced":
        for i in range(L):
            assert off["state"][f"blocks.{i}.ffn.router.bias"].abs().sum() > 0  # the bias did move, equally on/off


@pytest.mark.parametrize("every", [1, 2])
def test_dropout_and_noise_replay_the_same_draws(every):
    """Dropout in attention and on the residual branches, router jitter and GShard's random second choice: the
    replay restores the RNG state, so every draw and hence every number is that of the run without checkpointing."""
    cfg = _cfg(ROUTERS["topk_noisy"], dropout=0.2)
    _assert_equal(_train(cfg, every), _train(cfg, 0), "dropout")


def test_bf16_autocast(every=1):
    """Under CPU autocast (trainer.precision=bf16) the replay restores the autocast state: still bitwise equal."""
    cfg = _cfg(ROUTERS["bias_balanced"], dropout=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        off, on = _train(cfg, 0, steps=2), _train(cfg, every, steps=2)
        assert _model(cfg, every)(*_batch(0)).logits.dtype == torch.bfloat16  # autocast is on
    _assert_equal(on, off, "bf16")


def test_without_rng_preservation_the_comparison_fails(monkeypatch):
    """Positive control for the test above: a replay that does not restore the RNG draws other dropout masks,
    and the gradients then differ from the run without checkpointing."""
    cfg = _cfg(layers="none", dropout=0.2)
    off = _train(cfg, 0, steps=1)
    real = moe.model.checkpoint
    monkeypatch.setattr(moe.model, "checkpoint", lambda *a, **kw: real(*a, **{**kw, "preserve_rng_state": False}))
    on = _train(cfg, 1, steps=1)
    assert torch.equal(on["loss"][0], off["loss"][0])  # the forward is the same; only the replay draws anew
    assert not torch.equal(on["grads"][0]["blocks.0.attn.q_proj.weight"], off["grads"][0]["blocks.0.attn.q_proj.weight"])


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("layers", ["none", "every:2"])
def test_dense_and_mixed_models(layers, every):
    """A dense model (no sparse layer) and one whose checkpointed and plain blocks mix dense and sparse FFNs."""
    cfg = _cfg(ROUTERS["topk"], layers=layers)
    off, on = _train(cfg, 0), _train(cfg, every)
    assert set(off["stats"][0]) == ({1} if layers == "every:2" else set())
    _assert_equal(on, off, layers)


# ---------------------------------------------------------------- no double counting under recompute


def _count_calls(model: Transformer) -> dict:
    """Router forward calls (module hooks fire in the replay too) and the tokens counted into the load."""
    calls = {"forward": 0}
    for m in model.modules():
        if isinstance(m, Router):
            m.register_forward_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
    return calls


def test_bias_balanced_counts_each_token_once_under_recompute(monkeypatch):
    """The replay runs every router's forward a second time; the guard keeps the load (the count after_optimizer_step
    turns into the bias update) at one count per token. Without the guard the load doubles (torchtitan's bug).
    DeepSeek-V3's update b += u * sign(mean load - load) happens not to change when every count of a router doubles,
    so the bias alone would hide the bug; the load is the number it corrupts (and a rule proportional to the load,
    or a logged load, would show it)."""
    cfg = _cfg(ROUTERS["bias_balanced"])
    idx, tgt = _batch(0)
    tokens = B * S * 2  # T tokens x k choices, counted once per router

    def one_backward(every: int):
        model = _model(cfg, every)
        calls = _count_calls(model)
        model(idx, tgt).total_loss.backward()
        return calls["forward"], _loads(model)

    calls_off, load_off = one_backward(0)
    calls_on, load_on = one_backward(1)
    assert calls_off == L and calls_on == 2 * L  # every router ran twice: forward and replay
    assert all(float(v.sum()) == tokens for v in load_off.values())
    _assert_equal(load_on, load_off, "load")

    monkeypatch.setattr("routing.bias_balanced.recomputing", lambda: False)  # the guard removed
    calls_bad, load_bad = one_backward(1)
    assert calls_bad == 2 * L
    for name in load_off:
        assert torch.equal(load_bad[name], 2 * load_off[name]), name  # counted in the forward and in the replay
    _, load_every2 = one_backward(2)  # without the guard only the checkpointed blocks 0 and 2 double
    assert [float(v.sum()) / tokens for v in load_every2.values()] == [2.0, 1.0, 2.0]


def test_recomputing_flag_is_set_only_inside_the_replay():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(recomputing())
            return x.sin()

    model = Transformer(_cfg(layers="none"))
    model.set_activation_checkpointing(1)
    model.train()
    model.blocks[0].ffn = torch.nn.Sequential(model.blocks[0].ffn, Probe())
    out = model(*_batch(0))
    assert seen == [False] and not recomputing()
    out.loss.backward()
    assert seen == [False, True] and not recomputing()
    with recomputation():
        with recomputation():
            assert recomputing()
        assert recomputing()
    assert not recomputing()


# ---------------------------------------------------------------- only training forwards checkpoint


def test_eval_no_grad_and_generation_do_not_checkpoint(monkeypatch):
    calls = []
    real = moe.model.checkpoint
    monkeypatch.setattr(moe.model, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg = _cfg(ROUTERS["topk_noisy"], dropout=0.1)
    model = _model(cfg, 2)
    reference = _model(cfg, 0)
    idx, tgt = _batch(0)

    model(idx, tgt)
    assert len(calls) == 2  # blocks 0 and 2 in training with autograd
    calls.clear()
    with torch.no_grad():
        model(idx, tgt)
    assert not calls  # no_grad: nothing to save, nothing to replay
    model.eval(), reference.eval()
    _assert_equal(model(idx, tgt).logits, reference(idx, tgt).logits, "eval logits")
    assert not calls
    gen = model.generate(idx[:1, :4], 5, temperature=0)
    assert not calls and torch.equal(gen, reference.generate(idx[:1, :4], 5, temperature=0))


# ---------------------------------------------------------------- it saves memory


def _saved_bytes(every: int) -> int:
    """Bytes of the tensors autograd keeps for the backward of one training forward. Inside a checkpointed block
    torch's own hooks take over and keep nothing (only a reference to the block's inputs), so this counts what
    stays outside; the inputs the checkpoints hold are added (one [B, S, d] residual stream per block)."""
    model = _model(_cfg(ROUTERS["topk"]), every)
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*_batch(0))
    held = sum(b.checkpointed for b in model.blocks) * B * S * model.cfg.d_model * 4
    out.total_loss.backward()  # the replay works under the counting hooks' absence
    return total + held


def test_checkpointing_keeps_fewer_activations():
    off, every2, every1 = _saved_bytes(0), _saved_bytes(2), _saved_bytes(1)
    per_block = (off - every1) / L  # what one block keeps without checkpointing, less its input
    assert per_block > 10 * B * S * 16 * 4  # a block keeps many times its input width (attention, experts, router)
    assert every1 < every2 < off
    assert every2 == pytest.approx(off - 2 * per_block, rel=0.05)  # blocks 0 and 2 of 3 (all three alike)


# ---------------------------------------------------------------- collectives in the replay


def _ep_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from moe.parallel import distribute, make_groups
    from tests.distributed._spawn import init_gloo

    init_gloo(rank, world, port)
    groups = make_groups(world, 4)
    cfg = _cfg(ROUTERS["bias_balanced"], ep=world)
    records = {}
    for every in (0, 1, 2):
        model = distribute(_model(cfg, every), groups)  # experts sharded (all-to-all), global balancing loss
        records[every] = _train(cfg, every, steps=2, rank=rank, model=model)
    torch.save(records, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_expert_parallel_replay_reruns_collectives(tmp_path):
    """ep=2 on two gloo processes with the load-balancing all-reduce over the batch group: the replay re-runs the
    all-to-all and the all-reduce in the backward on every rank (no hang), and on equals off on each rank."""
    from tests.distributed._spawn import run_workers

    run_workers(_ep_worker, 2, str(tmp_path), timeout_s=120)
    for rank in range(2):
        rec = torch.load(tmp_path / f"rank{rank}.pt")
        for every in (1, 2):
            _assert_equal(rec[every], rec[0], f"rank {rank} every={every}")
