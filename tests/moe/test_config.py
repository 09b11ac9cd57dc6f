"""Model configuration: sparse-layer specs, validation messages, dict round-trips and presets."""
import dataclasses
import json

import pytest
import torch

from moe import PRESETS, ModelConfig, MoEConfig, Transformer, get_preset
from moe.layer import MoELayer
from routing import RouterConfig


def _model(layers="all", n_layer=4, **moe):
    return ModelConfig(vocab_size=32, n_layer=n_layer, d_model=16, n_head=2, d_ff=32, max_seq_len=16,
                       moe=MoEConfig(layers=layers, **moe))


@pytest.mark.parametrize("spec,n_layer,expected", [
    ("none", 4, ()),
    ("all", 4, (0, 1, 2, 3)),
    ("all", 1, (0,)),
    ("every:1", 4, (0, 1, 2, 3)),
    ("every:2", 4, (1, 3)),
    ("every:2", 5, (1, 3)),
    ("every:3", 7, (2, 5)),
    ("every:8", 4, ()),
    ("last:2", 4, (2, 3)),
    ("last:0", 4, ()),
    ("last:4", 4, (0, 1, 2, 3)),
    ("1,3", 4, (1, 3)),
    ("3,1,1", 4, (1, 3)),
    ("0", 4, (0,)),
    (" 2 , 0 ", 4, (0, 2)),
    ("[1, 3]", 4, (1, 3)),
])
def test_sparse_layer_specs(spec, n_layer, expected):
    assert MoEConfig(layers=spec).sparse_layers(n_layer) == expected
    cfg = _model(spec, n_layer=n_layer)
    assert cfg.sparse_layers == expected
    assert cfg.is_moe == bool(expected)


@pytest.mark.parametrize("spec", ["every:0", "every:x", "every:", "last:5", "last:-1", "some", "1,x", "4", "-1",
                                  "0,9", "every:-2"])
def test_bad_sparse_layer_specs_raise(spec):
    with pytest.raises(ValueError, match=r"model\.moe\.layers"):
        _model(spec, n_layer=4)


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match=r"model\.n_head"):
        ModelConfig(d_model=30, n_head=4)
    assert ModelConfig(d_model=30, n_head=4, head_dim=8).dim_per_head == 8  # explicit head_dim is allowed


def test_kv_heads_must_divide_heads():
    with pytest.raises(ValueError, match=r"model\.n_kv_head"):
        ModelConfig(d_model=32, n_head=4, n_kv_head=3)
    assert ModelConfig(d_model=32, n_head=4, n_kv_head=2).kv_heads == 2


def test_top_k_larger_than_experts_raises_only_when_sparse():
    with pytest.raises(ValueError, match=r"model\.moe\.router\.top_k"):
        _model("all", num_experts=2, router=RouterConfig(top_k=3))
    _model("none", num_experts=2, router=RouterConfig(top_k=3))  # a dense model does not route


@pytest.mark.parametrize("bad,field", [
    (dict(name="nope"), "model.moe.router.name"),
    (dict(top_k=0), "model.moe.router.top_k"),
    (dict(order="sideways"), "model.moe.router.order"),
    (dict(drop_policy="random"), "model.moe.router.drop_policy"),
    (dict(min_capacity=-1), "model.moe.router.min_capacity"),
    (dict(jitter=1.0), "model.moe.router.jitter"),
])
def test_router_config_errors(bad, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        RouterConfig(**bad)


@pytest.mark.parametrize("bad,field", [
    (dict(activation="tanh"), "model.activation"),
    (dict(norm="batchnorm"), "model.norm"),
    (dict(position="xpos"), "model.position"),
    (dict(attn_bias="some"), "model.attn_bias"),
    (dict(dropout=1.0), "model.dropout"),
    (dict(d_model=0), "model.d_model"),
    (dict(moe=dict(num_experts=0)), "model.moe.num_experts"),
    (dict(moe=dict(dispatcher="fast")), "model.moe.dispatcher"),
    (dict(moe=dict(expert_hidden=0)), "model.moe.expert_hidden"),
])
def test_model_config_errors(bad, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ModelConfig(**bad)


def test_unknown_router_name_raises_from_dict():
    with pytest.raises(ValueError, match="nope"):
        ModelConfig.from_dict({"moe": {"layers": "all", "router": {"name": "nope"}}})


@pytest.mark.parametrize("d,where,name", [
    ({"d_modle": 64}, "model", "d_modle"),
    ({"moe": {"experts": 4}}, "model.moe", "experts"),
    ({"moe": {"router": {"topk": 2}}}, "model.moe.router", "topk"),
])
def test_unknown_field_raises_naming_it(d, where, name):
    with pytest.raises(ValueError, match=rf"{where.replace('.', chr(92) + '.')} has unknown field.*{name}"):
        ModelConfig.from_dict(d)


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ValueError, match="model.moe must be a mapping"):
        ModelConfig.from_dict({"moe": "all"})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_round_trip(name):
    cfg = get_preset(name)
    assert isinstance(cfg, ModelConfig) and isinstance(cfg.moe, MoEConfig) and isinstance(cfg.moe.router, RouterConfig)
    assert cfg is not PRESETS[name] and cfg == PRESETS[name]
    d = cfg.to_dict()
    assert isinstance(d["moe"], dict) and isinstance(d["moe"]["router"], dict)
    back = ModelConfig.from_dict(json.loads(json.dumps(d)))  # through JSON, as config.json stores it
    assert back == cfg and back.to_dict() == d
    assert isinstance(back.moe.router, RouterConfig)
    for i in cfg.sparse_layers:
        assert 0 <= i < cfg.n_layer
    assert cfg.d_model % cfg.n_head == 0 or cfg.head_dim is not None
    if cfg.is_moe:
        assert cfg.moe.router.top_k <= cfg.moe.num_experts


def test_round_trip_non_default():
    cfg = ModelConfig(vocab_size=100, n_layer=6, d_model=48, n_head=6, n_kv_head=2, d_ff=96, position="rope",
                      moe=MoEConfig(layers="every:3", num_experts=5, expert_hidden=40, dispatcher="einsum",
                                    router=RouterConfig(top_k=3, order="softmax_topk", renormalize=True,
                                                        capacity_factor=-1.5, eval_capacity_factor=2.0,
                                                        min_capacity=2, drop_policy="position", jitter=0.1)))
    back = ModelConfig.from_dict(cfg.to_dict())
    assert back == cfg
    assert back.sparse_layers == (2, 5) and back.expert_hidden == 40 and back.kv_heads == 2
    assert dataclasses.asdict(back) == cfg.to_dict()
    assert cfg.replace(n_layer=3).sparse_layers == (2,)


def test_get_preset_unknown_and_copies():
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("gpt5")
    a = get_preset("tiny_moe")
    a.moe.router.top_k = 1
    assert PRESETS["tiny_moe"].moe.router.top_k == 2


@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe"])
def test_tiny_presets_forward(name):
    cfg = get_preset(name)
    torch.manual_seed(0)
    model = Transformer(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(idx, idx)
    assert out.logits.shape == (2, 16, cfg.vocab_size)
    assert torch.isfinite(out.loss)
    sparse = [i for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoELayer)]
    assert sparse == list(cfg.sparse_layers)
    assert sorted(out.stats) == sparse
    if name == "tiny_moe":
        assert sparse == [0, 1, 2, 3]
        assert model.blocks[0].ffn.experts.w_up.shape == (8, 128, 192)
        assert set(out.aux_losses) == {"load_balancing_loss", "router_z_loss"}
    else:
        assert out.aux_losses == {} and sparse == []


def test_router_non_mapping_raises():
    with pytest.raises(ValueError, match="model.moe.router must be a mapping"):
        MoEConfig(router="topk")


def test_dispatcher_choices_and_default():
    assert MoEConfig().dispatcher == "auto"
    for name in ("auto", "einsum", "sorted", "triton"):
        assert MoEConfig(layers="all", dispatcher=name).dispatcher == name


def test_expert_parallel_takes_auto_sorted_and_triton_only():
    for name in ("auto", "sorted", "triton"):
        MoEConfig(layers="all", num_experts=8, expert_parallel=2, dispatcher=name)
    for name in ("einsum", "tutel"):
        with pytest.raises(ValueError, match=rf"model\.moe\.dispatcher='{name}' cannot run expert-parallel.*auto, sorted or triton"):
            MoEConfig(layers="all", num_experts=8, expert_parallel=2, dispatcher=name)
