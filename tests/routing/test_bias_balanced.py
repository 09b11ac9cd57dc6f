"""Aux-loss-free bias balancing (DeepSeek-V3): biased selection, unbiased normalised weights, the bias update
after optimizer steps, its checkpointing, and its effect on a skewed router."""
import math

import pytest
import torch

from moe.checkpoint import load_model, save_checkpoint
from moe.model import Transformer
from routing import RouterConfig, build_router
from routing.bias_balanced import BiasBalancedRouter
from routing.stats import STAT_KEYS
from tests.routing.test_base_layers import check_dispatchers_agree, check_one_training_step, tiny_model_config
from tests.routing.test_topk import check_plan_invariants

T, D, E = 32, 8, 4
TOL = dict(rtol=1e-5, atol=1e-5)


def _router(seed: int = 0, **cfg) -> BiasBalancedRouter:
    torch.manual_seed(seed)
    cfg = {"top_k": 2, "aux_loss_coef": 0.0, "z_loss_coef": 0.0, **cfg}
    router = build_router(D, E, RouterConfig(name="bias_balanced", **cfg))
    torch.nn.init.normal_(router.gate.weight, 0.0, 1.0)
    return router


def _x(seed: int = 1, t: int = T) -> torch.Tensor:
    return torch.randn(t, D, generator=torch.Generator().manual_seed(seed))


def _chosen(plan, t: int, k: int) -> torch.Tensor:
    rows = sorted(zip(plan.token_index.tolist(), plan.expert_index.tolist()))
    return torch.tensor([e for _, e in rows]).reshape(t, k)


# ---------------------------------------------------------------- selection and weights

@pytest.mark.parametrize("score_fn", ["sigmoid", "softmax"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_zero_bias_is_plain_topk_with_normalised_weights(score_fn, k):
    router = _router(top_k=k, score_fn=score_fn)
    x = _x()
    plan = router(x)
    check_plan_invariants(plan, T, E)
    logits = x @ router.gate.weight.t()
    scores = torch.sigmoid(logits) if score_fn == "sigmoid" else torch.softmax(logits, -1)
    assert torch.equal(_chosen(plan, T, k), scores.topk(k, -1).indices.sort(-1).values)
    chosen = scores[plan.token_index, plan.expert_index]
    per_token = torch.zeros(T).index_add_(0, plan.token_index, chosen)
    # k > 1: DeepSeek-V3 normalises the chosen scores to sum 1; k = 1: the score itself (else a constant 1)
    expected = chosen / per_token[plan.token_index] if k > 1 else chosen
    torch.testing.assert_close(plan.weight, expected, **TOL)
    assert plan.capacity is None and plan.token_index.numel() == T * k


def test_bias_changes_selection_not_weights():
    router = _router(top_k=2)
    x = _x()
    with torch.no_grad():
        router.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # expert 3 is chosen by every token
    plan = router(x)
    assert plan.counts[3].item() == T
    logits = x @ router.gate.weight.t()
    s = torch.sigmoid(logits)
    # the other choice is each token's best of experts 0..2; weights from the *unbiased* scores
    other = s[:, :3].argmax(-1)
    assert torch.equal(_chosen(plan, T, 2), torch.stack([other, torch.full((T,), 3)], 1))
    denom = s[torch.arange(T), other] + s[:, 3]
    w = torch.zeros(T, E).index_put_((plan.token_index, plan.expert_index), plan.weight.detach())
    torch.testing.assert_close(w[:, 3], (s[:, 3] / denom).detach(), **TOL)
    torch.testing.assert_close(w[torch.arange(T), other], (s[torch.arange(T), other] / denom).detach(), **TOL)


def test_scale_and_gradients():
    x = _x()
    a, b = _router(), _router(scale=2.5)
    pa, pb = a(x), b(x)
    torch.testing.assert_close(pb.weight, 2.5 * pa.weight, **TOL)
    pa.weight.pow(2).sum().backward()  # the normalised weights of a token sum to 1: use a non-linear function
    assert a.gate.weight.grad is not None and a.gate.weight.grad.abs().sum() > 0
    assert a.bias.grad is None and not a.bias.requires_grad


# ---------------------------------------------------------------- the bias: buffer, update, accumulation

def test_bias_is_a_persistent_fp32_buffer_and_load_is_not_saved():
    router = _router()
    assert "bias" in dict(router.named_buffers()) and "bias" not in dict(router.named_parameters())
    state = router.state_dict()
    assert "bias" in state and "load" not in state
    assert state["bias"].dtype == torch.float32
    router.to(torch.bfloat16)
    assert router.bias.dtype == torch.float32 and router.load.dtype == torch.float32


def test_bias_round_trips_state_dict():
    router = _router()
    with torch.no_grad():
        router.bias.copy_(torch.tensor([0.003, -0.001, 0.0, -0.002]))
    other = _router(seed=5)
    other.load_state_dict(router.state_dict())
    assert torch.equal(other.bias, router.bias)


def test_bias_survives_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(dict(name="bias_balanced", top_k=2, bias_update_rate=0.01), n_layer=2))
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(idx, idx).total_loss.backward()
        for block in model.blocks:
            block.ffn.router.after_optimizer_step()
    biases = [block.ffn.router.bias.clone() for block in model.blocks]
    assert all(b.abs().sum() > 0 for b in biases)
    save_checkpoint(tmp_path / "ckpt", model)
    loaded = load_model(tmp_path / "ckpt")
    for block, bias in zip(loaded.blocks, biases):
        assert torch.equal(block.ffn.router.bias, bias)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx).logits, model(idx).logits, rtol=0, atol=0)


def test_update_rule_hand_values():
    router = _router(top_k=1, bias_update_rate=0.1)
    with torch.no_grad():
        router.load.copy_(torch.tensor([6.0, 2.0, 0.0, 0.0]))  # mean 2: overloaded, even, idle, idle
    router.after_optimizer_step()
    torch.testing.assert_close(router.bias, torch.tensor([-0.1, 0.0, 0.1, 0.1]), rtol=0, atol=1e-7)
    assert router.load.sum() == 0  # the count restarts after each update
    router.after_optimizer_step()  # nothing counted since: no update
    torch.testing.assert_close(router.bias, torch.tensor([-0.1, 0.0, 0.1, 0.1]), rtol=0, atol=1e-7)


def test_the_update_reads_nothing_on_the_host(monkeypatch):
    """The update runs after every optimizer step: a host read of the load there would synchronise each step."""
    router = _router(top_k=1, bias_update_rate=0.1)
    for name in ("item", "tolist", "cpu", "__float__", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(f"Tensor.{_n} in the update"))
    with torch.no_grad():
        router.load.copy_(torch.tensor([6.0, 2.0, 0.0, 0.0]))
    router.after_optimizer_step()
    router.after_optimizer_step()  # and with nothing counted
    monkeypatch.undo()
    torch.testing.assert_close(router.bias, torch.tensor([-0.1, 0.0, 0.1, 0.1]), rtol=0, atol=1e-7)


def test_load_is_counted_in_training_forwards_only():
    router = _router(top_k=2)
    x = _x()
    plan = router(x)
    assert torch.equal(router.load, plan.counts.float())  # dropless: selections == rows
    router(x)
    assert torch.equal(router.load, 2 * plan.counts.float())  # summed over micro-batches until the step
    router.load.zero_()
    with torch.no_grad():
        router(x)  # no autograd (evaluation, recomputation): not counted
    router.eval()
    router(x)
    assert router.load.sum() == 0
    router.after_optimizer_step()
    assert router.bias.abs().sum() == 0  # an eval-only stretch leaves the bias alone


def test_load_counts_selections_before_capacity():
    router = _router(top_k=2, capacity_factor=0.5, min_capacity=1)
    x = _x()
    plan = router(x)
    assert plan.stats["dropped_fraction"].item() > 0
    selected = torch.bincount(_selected(router, x).reshape(-1), minlength=E).float()
    assert torch.equal(router.load, selected)
    assert (plan.counts.float() <= router.load).all()


def _selected(router: BiasBalancedRouter, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (torch.sigmoid(x @ router.gate.weight.t()) + router.bias).topk(router.cfg.top_k, -1).indices


@pytest.mark.parametrize("k", [1, 2])
def test_bias_rebalances_a_skewed_router(k):
    """A gate biased toward expert 0: forward + after_optimizer_step, with the gate frozen, drives the max load down."""
    router = _router(top_k=k, bias_update_rate=0.02)
    with torch.no_grad():
        router.gate.weight[0] += 1.5  # expert 0's logit gets 1.5 * sum(x), positive for most of these inputs
    x = _x(t=64).abs()
    loads = []
    for _ in range(60):
        plan = router(x)
        loads.append(plan.stats["max_load"].item())
        router.after_optimizer_step()
    first, last = loads[0], max(loads[-10:])
    # seeded numbers: expert 0 starts with every token (k=1: max load 4.0 = E) or every first choice (k=2: 2.0);
    # after 60 updates the loads oscillate within one step of even (measured: 1.125 for both)
    assert first == pytest.approx(4.0 if k == 1 else 2.0)
    assert last <= 1.2, loads[-10:]
    assert router.bias[0] < 0 and router.bias[0] == router.bias.min()  # the hot expert was pushed down


# ---------------------------------------------------------------- capacity, losses, statistics

@pytest.mark.parametrize("cf", [1.0, 0.5, -0.5])
def test_capacity(cf):
    router = _router(top_k=2, capacity_factor=cf, min_capacity=1)
    plan = router(_x())
    check_plan_invariants(plan, T, E)
    C = math.ceil(abs(cf) * T * 2 / E)
    assert plan.capacity == (C if cf > 0 else None)
    assert (plan.counts <= C).all()


def test_losses_follow_coefficients():
    assert _router()(_x()).aux_losses == {}
    router = _router(aux_loss_coef=0.1, z_loss_coef=0.01)
    torch.nn.init.zeros_(router.gate.weight)
    plan = router(_x())
    assert plan.aux_losses["load_balancing_loss"].item() == pytest.approx(0.1, rel=1e-6)  # uniform scores: 1
    assert plan.aux_losses["router_z_loss"].item() == pytest.approx(0.01 * math.log(E) ** 2, rel=1e-6)


def test_stats_use_normalised_scores():
    router = _router()
    x = _x()
    plan = router(x)
    for key in STAT_KEYS:
        assert key in plan.stats and not plan.stats[key].requires_grad, key
    s = torch.sigmoid(x @ router.gate.weight.t()).detach()
    p = s / s.sum(-1, keepdim=True)
    assert plan.stats["top1_prob"].item() == pytest.approx(p.max(-1).values.mean().item(), rel=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="model.moe.router.score_fn"):
        RouterConfig(name="bias_balanced", score_fn="tanh")
    with pytest.raises(ValueError, match="model.moe.router.bias_update_rate"):
        RouterConfig(name="bias_balanced", bias_update_rate=-1.0)


# ---------------------------------------------------------------- dispatchers and a training step

def _set_bias(layer):
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))


@pytest.mark.parametrize("cf", [0.0, 1.0], ids=["dropless", "cf1"])
@pytest.mark.parametrize("score_fn", ["sigmoid", "softmax"])
@pytest.mark.parametrize("k", [1, 2])
def test_dispatchers_agree(k, score_fn, cf):
    check_dispatchers_agree(dict(name="bias_balanced", top_k=k, score_fn=score_fn, capacity_factor=cf,
                                 min_capacity=1, aux_loss_coef=0.0, z_loss_coef=0.0), setup=_set_bias)


@pytest.mark.parametrize("k", [1, 2])
def test_one_training_step_updates_the_bias(k):
    model = check_one_training_step(dict(name="bias_balanced", top_k=k, bias_update_rate=0.01))
    for block in model.blocks:
        router = block.ffn.router
        assert router.bias.abs().sum() > 0  # after_optimizer_step moved it
        assert router.load.sum() == 0  # reset by the step; the helper's later forwards run without autograd
        assert all(b == 0.0 or b == pytest.approx(0.01) for b in router.bias.abs().tolist())  # one step of u


# ---------------------------------------------------------------- data parallel: one bias for all replicas

def _dp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        router = build_router(D, E, RouterConfig(name="bias_balanced", top_k=1, bias_update_rate=0.1))
        router.set_batch_group(dist.group.WORLD)  # what moe.parallel.distribute has each layer do
        with torch.no_grad():  # rank 0 overloads expert 0, rank 1 expert 1: the sums are [5, 5, 1, 1]
            router.load.copy_(torch.tensor([4.0, 1.0, 1.0, 0.0]) if rank == 0 else torch.tensor([1.0, 4.0, 0.0, 1.0]))
        router.after_optimizer_step()
        torch.save(router.bias, f"{out_dir}/bias_{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_bias_update_sums_loads_over_the_data_parallel_group(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_dp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    b0, b1 = torch.load(tmp_path / "bias_0.pt"), torch.load(tmp_path / "bias_1.pt")
    assert torch.equal(b0, b1)  # alone, rank 0 would have moved expert 0 down and expert 1 up
    torch.testing.assert_close(b0, torch.tensor([-0.1, -0.1, 0.1, 0.1]), rtol=0, atol=1e-7)
