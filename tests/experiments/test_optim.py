"""The learning-rate schedule, AdamW's decay / no-decay parameter groups, and optim.fused: the update's kernel by
engine, as composed from the command line and named in the run's log."""
from __future__ import annotations

import math

import pytest
import torch

from experiments.config import OptimConfig
from experiments.optim import build_optimizer, describe_optimizer, lr_at, param_groups, resolve_fused
from experiments.trainer import Trainer
from moe.config import ModelConfig, MoEConfig
from moe.model import Transformer
from routing.config import RouterConfig
from tests.experiments.test_train import make_run

# ------------------------------------------------------------------------------------------------ schedule


def test_warmup_is_linear_to_lr():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    assert [lr_at(s, cfg, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg, 100) == 1.0  # decay starts from the peak


def test_cosine_known_values():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4, schedule="cosine")
    max_steps = 14  # 10 decay steps after the warmup
    assert lr_at(9, cfg, max_steps) == pytest.approx(0.55, abs=1e-15)  # midpoint: (lr + min_lr) / 2
    assert lr_at(14, cfg, max_steps) == 0.1  # exactly min_lr at max_steps
    assert lr_at(1000, cfg, max_steps) == 0.1  # and it stays there
    quarter = 0.1 + 0.45 * (1 + math.cos(math.pi * 0.3))
    assert lr_at(7, cfg, max_steps) == pytest.approx(quarter, abs=1e-15)
    values = [lr_at(s, cfg, max_steps) for s in range(4, 15)]
    assert values == sorted(values, reverse=True)  # monotone decay


def test_linear_known_values():
    cfg = OptimConfig(lr=2.0, min_lr=0.0, warmup_steps=2, schedule="linear")
    assert [lr_at(s, cfg, 12) for s in range(2, 13)] == pytest.approx([2.0 - 0.2 * i for i in range(11)], abs=1e-15)
    assert lr_at(12, cfg, 12) == 0.0
    assert lr_at(0, cfg, 12) == 1.0


def test_constant():
    cfg = OptimConfig(lr=0.5, min_lr=0.1, warmup_steps=5, schedule="constant")
    assert lr_at(0, cfg, 10) == 0.1
    assert [lr_at(s, cfg, 10) for s in range(4, 30)] == [0.5] * 26


def test_no_warmup_starts_at_lr():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0)
    assert lr_at(0, cfg, 10) == 1.0
    assert lr_at(5, cfg, 10) == pytest.approx(0.5, abs=1e-15)
    assert lr_at(10, cfg, 10) == 0.0


def test_warmup_longer_than_run():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=10)
    assert [lr_at(s, cfg, 4) for s in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=1e-15)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(schedule="step"), "optim.schedule='step'"),
        (dict(lr=0.0), "optim.lr=0.0"),
        (dict(lr=1e-3, min_lr=1e-2), "min_lr=0.01"),
        (dict(warmup_steps=-1), "optim.warmup_steps=-1"),
    ],
)
def test_bad_optim_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimConfig(**kwargs)


# ------------------------------------------------------------------------------------------------ groups


def _model(**kw) -> Transformer:
    base = dict(vocab_size=64, n_layer=2, d_model=16, n_head=2, d_ff=32, max_seq_len=16)
    base.update(kw)
    return Transformer(ModelConfig(**base))


def _names(model, group) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _check_partition(model, groups):
    decay, no_decay = groups
    params = list(model.parameters())  # tied weights once
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(params), "every parameter in exactly one group"
    assert set(ids) == {id(p) for p in params}
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0


def test_groups_moe_tied():
    model = _model(moe=MoEConfig(layers="all", num_experts=4, router=RouterConfig(top_k=2)), glu=True,
                   norm="rmsnorm", position="rope")
    groups = param_groups(model, 0.3)
    _check_partition(model, groups)
    decay, no_decay = _names(model, groups[0]), _names(model, groups[1])
    assert no_decay == {"embed.weight", "norm.weight"} | {
        f"blocks.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "ffn_norm")}
    for i in range(2):
        for w in ("w_up", "w_gate", "w_down"):
            assert f"blocks.{i}.ffn.experts.{w}" in decay
        assert any(n.startswith(f"blocks.{i}.ffn.router") for n in decay)
        assert any(n.startswith(f"blocks.{i}.attn.") for n in decay)
    # The tied output head is the embedding: one tensor, never decayed.
    assert model.lm_head.weight is model.embed.weight
    assert any(p is model.lm_head.weight for p in groups[1]["params"])


def test_groups_dense_with_biases_and_learned_positions():
    model = _model(position="learned", attn_bias="all", ffn_bias=True, norm="layernorm")
    groups = param_groups(model, 0.3)
    _check_partition(model, groups)
    decay, no_decay = _names(model, groups[0]), _names(model, groups[1])
    assert {"embed.weight", "pos_embed.weight"} <= no_decay
    assert all(n.endswith(".bias") or "norm" in n or "embed" in n for n in no_decay)
    assert all(n.endswith(".weight") for n in decay)
    assert all(p.dim() == 2 for p in groups[0]["params"])
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_untied_lm_head_is_a_decayed_matrix():
    """An untied output head is multiplied, not looked up: it decays like every other matrix."""
    model = _model(tie_embeddings=False)
    groups = param_groups(model, 0.3)
    _check_partition(model, groups)
    assert "lm_head.weight" in _names(model, groups[0])
    assert "embed.weight" in _names(model, groups[1])


def test_frozen_parameters_left_out():
    model = _model()
    model.embed.weight.requires_grad_(False)
    groups = param_groups(model, 0.1)
    assert all(p is not model.embed.weight for g in groups for p in g["params"])


def test_build_optimizer_hyperparameters():
    model = _model()
    opt = build_optimizer(model, OptimConfig(lr=1e-3, min_lr=0.0, weight_decay=0.2, beta1=0.8, beta2=0.9, eps=1e-6))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    for g in opt.param_groups:
        assert g["lr"] == 1e-3 and g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6
    # One step: no-decay parameters with a zero gradient do not move; decayed matrices shrink.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    decayed = _names(model, opt.param_groups[0])
    assert decayed and "embed.weight" not in decayed and "pos_embed.weight" not in decayed
    opt.step()
    for n, p in model.named_parameters():
        if n in decayed:
            assert torch.allclose(p, before[n] * (1 - 1e-3 * 0.2), rtol=0, atol=1e-9), n
        else:
            assert torch.equal(p, before[n]), n


def test_fused_adamw_equals_foreach_within_round_off():
    """optim.fused swaps the update's kernels, not its arithmetic: 5 steps of an MoE model agree to fp32 round-off,
    and the update is really the fused one."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, d_ff=64, max_seq_len=16,
                      moe=MoEConfig(layers="all", num_experts=8, router=RouterConfig(top_k=2)))
    models = [Transformer(cfg) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_optimizer(m, OptimConfig(lr=1e-2, fused=f)) for m, f in zip(models, (False, True))]
    assert opts[1].defaults["fused"] and not opts[0].defaults["fused"] and opts[0].defaults["foreach"]
    x = torch.randint(0, 64, (4, 16))
    for _ in range(5):
        for m, o in zip(models, opts):
            out = m(x, targets=x)
            out.total_loss.backward()
            o.step()
            o.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # the 5 updates moved weights by ~5e-2


# ------------------------------------------------------------------------------------------------ optim.fused


@pytest.mark.parametrize("given, want", [("auto", "auto"), (True, "true"), ("True", "true"), (False, "false"),
                                         ("FALSE", "false")])
def test_fused_setting_is_a_tri_state(given, want):
    """Hydra hands optim.fused=true over as the string 'True', older run.json files as a bool: one spelling each."""
    assert OptimConfig(fused=given).fused == want
    assert OptimConfig().fused == "auto"


def test_fused_setting_refuses_other_values():
    with pytest.raises(ValueError, match=r"optim.fused='yes' must be auto, true or false"):
        OptimConfig(fused="yes")


def test_auto_is_fused_where_torch_has_the_kernel_and_foreach_under_deepspeed():
    params = [torch.nn.Parameter(torch.zeros(3))]
    for engine in ("single", "ddp", "fsdp"):
        assert resolve_fused("auto", engine, params) == (True, "optim.fused=auto")
        assert resolve_fused("true", engine, params)[0] and not resolve_fused("false", engine, params)[0]
    assert resolve_fused("auto", "deepspeed", params) == (False, "optim.fused=auto: trainer=deepspeed steps its "
                                                                 "own partitions")
    with pytest.raises(ValueError, match=r"optim.fused=true is not supported with trainer=deepspeed"):
        resolve_fused("true", "deepspeed", params)
    ints = [torch.zeros(3, dtype=torch.int64)]  # no fused kernel: auto falls back and says why, true refuses
    assert resolve_fused("auto", "single", ints) == (False, "optim.fused=auto: torch's fused AdamW does not run on "
                                                            "cpu torch.int64")
    with pytest.raises(ValueError, match=r"optim.fused=true: torch's fused AdamW does not run on .*cpu torch.int64"):
        resolve_fused("true", "single", ints)


def test_build_optimizer_default_is_fused_and_the_log_says_so():
    model = _model()
    opt = build_optimizer(model, OptimConfig())
    assert all(g["fused"] and not g["foreach"] for g in opt.param_groups)
    assert describe_optimizer(opt, OptimConfig(), "single") == ("optimizer: AdamW, fused update (optim.fused=auto); "
                                                                "the clip folded into the update")
    ds = build_optimizer(model, OptimConfig(), engine="deepspeed")
    assert all(g["foreach"] and not g["fused"] for g in ds.param_groups)
    assert describe_optimizer(ds, OptimConfig(), "deepspeed") == ("optimizer: AdamW, foreach update (optim.fused="
                                                                  "auto: trainer=deepspeed steps its own partitions)")


def test_a_checkpoint_does_not_change_the_runs_kernel():
    """load_state_dict copies every group setting from the file, an older checkpoint's foreach included: the
    run keeps its own choice, and the moments and step count are the file's."""
    model = _model()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    old = build_optimizer(model, OptimConfig(fused="false"))
    old.step()
    new = build_optimizer(model, OptimConfig())
    new.load_state_dict(old.state_dict())
    assert all(g["fused"] and not g["foreach"] for g in new.param_groups)
    p = next(model.parameters())
    assert torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"]) and new.state[p]["step"].item() == 1.0


@pytest.mark.parametrize("override, want", [([], "auto"), (["optim.fused=true"], "true"),
                                            (["optim.fused=false"], "false")])
def test_hydra_overrides_reach_the_tri_state(override, want, tmp_path, text_corpus):
    """optim.fused=true arrives from the command line as the string 'True'; the run's log names the kernel."""
    cfg = make_run(tmp_path, text_corpus, "trainer.max_steps=1", "trainer.eval_interval=0", *override)
    assert cfg.optim.fused == want
    if not override:  # one short run: the resolved choice is in train.log, as the dispatcher's is
        Trainer(cfg).fit()
        log = (tmp_path / "train.log").read_text()
        assert "optimizer: AdamW, fused update (optim.fused=auto); the clip folded into the update" in log
