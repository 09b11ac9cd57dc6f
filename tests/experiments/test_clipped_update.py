"""experiments.optim.clipped_update: the clip folded into the update equals torch.nn.utils.clip_grad_norm_ followed
by AdamW (fused and foreach), in one process and with moe.parallel's expert-parallel norm (its collective replaced
by a stand-in that adds the other shard, as tests/moe/test_parallel.py does)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from experiments.config import OptimConfig
from experiments.optim import build_optimizer, clipped_update
from moe import parallel
from moe.config import ModelConfig, MoEConfig
from moe.model import Transformer
from moe.parallel import ParallelGroups
from routing.config import RouterConfig


def _pair(fused: str) -> tuple[list[Transformer], list[torch.optim.Optimizer]]:
    """Two identical MoE models with their optimizers: the reference and the one clipped in the update."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, d_ff=64, max_seq_len=16,
                      moe=MoEConfig(layers="all", num_experts=8, router=RouterConfig(top_k=2)))
    models = [Transformer(cfg) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    return models, [build_optimizer(m, OptimConfig(lr=1e-2, fused=fused)) for m in models]


def _backward(model: Transformer, x: torch.Tensor, scale: float) -> None:
    (model(x, targets=x).total_loss * scale).backward()


@pytest.mark.parametrize("fused", ["true", "false"])
@pytest.mark.parametrize("max_norm", [0.05, 1e3, 0.0])  # clipping every step, never, and switched off
def test_equals_torch_clip_then_adamw(fused, max_norm):
    """4 steps whose gradients are scaled x30 (so a norm of ~30-100 meets max_norm 0.05: coefficients ~1e-3):
    returned norms and weights agree with torch's clip + step; the foreach update bitwise."""
    (ref, mine), (ref_opt, opt) = _pair(fused)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    start = [p.detach().clone() for p in ref.parameters()]
    for step in range(4):
        for m in (ref, mine):
            _backward(m, x, 30.0)
        want = torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.grad is not None],
                                              max_norm if max_norm > 0 else float("inf"))
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        norm = clipped_update(opt, torch.nn.utils.get_total_norm([p.grad for p in mine.parameters()
                                                                  if p.grad is not None]), max_norm)
        assert norm > 30  # the norm before clipping, computed as torch does: equal while the weights are
        assert norm == want.item() if fused == "false" or step == 0 else norm == pytest.approx(want.item(), rel=1e-5)
        assert all(p.grad is None for p in mine.parameters())  # cleared
    assert max((p - q).abs().max().item() for p, q in zip(mine.parameters(), start)) > 1e-3
    for a, b in zip(ref.parameters(), mine.parameters()):
        if fused == "false":
            assert torch.equal(a, b)  # the same _foreach_mul_ by the same coefficient, then the same update
        else:  # grad / (1 / coefficient) in the kernel against grad * coefficient: one rounding apart per step
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_non_finite_norm_updates_nothing():
    (_, model), (_, opt) = _pair("true")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    assert clipped_update(opt, torch.tensor(float("nan")), 1.0) != clipped_update(opt, torch.tensor(float("inf")), 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and not opt.state
    assert not hasattr(opt, "grad_scale")  # the fused kernel's scale lives only for the step it clips


def _groups() -> ParallelGroups:
    return ParallelGroups(world_size=2, rank=0, ep_size=2, ep_rank=0, ep_group="ep-group",
                          expert_dp_group="expert-dp-group", world_group="world-group", timeout_s=None)


@pytest.mark.parametrize("fused", ["true", "false"])
def test_expert_parallel_norm_clips_as_torch_on_the_whole_model(monkeypatch, fused):
    """Rank 0 of ep = 2 holds a dense tensor and its expert shard; the other shard's gradient (squared norm 11)
    arrives through the stand-in all-reduce. The global norm is sqrt(14 + 80 + 11) = sqrt(105), and the update
    equals torch's clip of the whole model (these tensors and the other shard) followed by AdamW here."""
    monkeypatch.setattr(dist, "all_reduce", lambda t, group=None: t.add_(11.0))

    def params():
        dense, expert = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
        expert.allreduce = False  # moe.parallel's expert tag
        dense.grad, expert.grad = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 8.0])
        return [dense, expert]

    mine, ref = params(), params()
    other = torch.nn.Parameter(torch.zeros(2))
    other.grad = torch.tensor([11 ** 0.5, 0.0])  # the shard this rank does not hold
    opt = torch.optim.AdamW(mine, lr=0.1, fused=fused == "true", foreach=None if fused == "true" else True)
    ref_opt = torch.optim.AdamW(ref, lr=0.1, foreach=True)
    norm = clipped_update(opt, parallel.global_grad_norm(mine, _groups()), 2.0)
    want = torch.nn.utils.clip_grad_norm_(ref + [other], 2.0)
    ref_opt.step()
    assert norm == pytest.approx(105 ** 0.5, rel=1e-6) and norm == pytest.approx(want.item(), rel=1e-6)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(mine[0], torch.ones(3))


def test_parallel_clip_grad_norm_rescales_each_dtype():
    """moe.parallel.clip_grad_norm (DeepSpeed's hook) rescales fp32 and bf16 gradients in one foreach pass each."""
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0], dtype=torch.bfloat16)
    norm = parallel.clip_grad_norm([a, b], 1.0, None)
    assert norm.item() == 5.0
    coef = 1.0 / (5.0 + 1e-6)
    torch.testing.assert_close(a.grad, torch.tensor([3.0 * coef, 0.0]), rtol=1e-6, atol=0)
    assert b.grad.dtype == torch.bfloat16 and b.grad[1].item() == pytest.approx(0.8, rel=1e-2)
