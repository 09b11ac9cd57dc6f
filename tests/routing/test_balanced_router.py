"""routing=balanced_topk (routing/balanced_router.py): BASE's balanced top-k in training, and an evaluation that
routes as training did through the bias learnt from the solver's prices."""
import torch

from routing import RouterConfig, build_router
from routing.balanced_router import EVAL_BIAS_RATE
from routing.balanced_topk import balanced_topk_assignment, topk_capacity
from routing.recompute import recomputation


def _router(k: int = 2, experts: int = 8):
    torch.manual_seed(0)
    router = build_router(16, experts, RouterConfig(name="balanced_topk", top_k=k, aux_loss_coef=0.0, z_loss_coef=0.0))
    torch.nn.init.normal_(router.gate.weight, 0.0, 1.0)
    return router


def _skewed_inputs(tokens: int = 400) -> torch.Tensor:
    """Inputs with a constant feature, so that the logits carry large per-expert offsets (the drift the
    balanced assignment cannot see): greedy routing of them is far from balanced."""
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(1))
    x[:, 0] = 3.0
    return x


def test_training_is_the_balanced_assignment_and_the_bias_follows_the_prices():
    router, x = _router(), _skewed_inputs()
    plan = router(x)
    assert plan.counts.tolist() == [100] * 8  # 400 tokens x 2 / 8 experts
    logits = router.logits(x).detach()
    expert, prices = balanced_topk_assignment(logits, 2, topk_capacity(400, 8, 2))
    assert sorted(zip(plan.token_index.tolist(), plan.expert_index.tolist())) == sorted(
        (t, int(e)) for t in range(400) for e in expert[t])
    assert torch.equal(router.bias, torch.zeros(8))  # moved only after the optimizer step
    router.after_optimizer_step()
    assert torch.allclose(router.bias, -EVAL_BIAS_RATE * (prices - prices.mean()), atol=1e-6)
    router.after_optimizer_step()  # nothing solved since: unchanged
    assert torch.allclose(router.bias, -EVAL_BIAS_RATE * (prices - prices.mean()), atol=1e-6)


def test_evaluation_with_the_learnt_bias_is_balanced_where_greedy_is_not():
    router, x = _router(), _skewed_inputs()
    for _ in range(40):  # the same batch: the bias converges to minus its prices
        router(x)
        router.after_optimizer_step()
    router.eval()
    balanced = router(x).counts
    saved = router.bias.clone()
    router.bias.zero_()
    greedy = router(x).counts
    router.bias.copy_(saved)
    assert float(greedy.max()) / 100 > 1.5  # BASE's plain greedy evaluation
    assert float(balanced.max()) / 100 <= 1.1 and int(balanced.sum()) == 800
    assert "bias" in router.state_dict()  # saved with the model: a loaded checkpoint evaluates the same


def test_a_recomputed_forward_does_not_count_twice():
    router, x = _router(), _skewed_inputs()
    router(x)
    with recomputation():
        router(x)
    router.after_optimizer_step()
    once = router.bias.clone()
    other = _router()
    other(x)
    other.after_optimizer_step()
    assert torch.allclose(once, other.bias)
