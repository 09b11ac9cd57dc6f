"""Dense and sparse twins (experiments/twins.py): equal training FLOPs per token within 1% (router included),
equal total parameters for the wide dense twin, names, and the `twin=` key resolved at the config boundary."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from experiments.config import run_config_from_dict
from experiments.hydra_conf import CONFIG_MODULE, register_configs
from moe.twins import (build_twin, dense_base, dense_wide_twin, moe_twin, parse_twin, twin_names,
                               twin_table)
from moe.config import ModelConfig
from moe.flops import count_params, flops_per_token
from moe.model import Transformer
from moe.presets import get_preset
from routing.config import RouterConfig

register_configs()

BASES = {
    "tiny_dense": get_preset("tiny_dense"),  # SwiGLU, d_ff=384
    "gelu_nobias": ModelConfig(vocab_size=500, n_layer=3, d_model=64, n_head=4, d_ff=256, max_seq_len=64),
    "gpt2_bias": ModelConfig(vocab_size=1000, n_layer=2, d_model=96, n_head=4, d_ff=384, max_seq_len=64,
                             activation="gelu_tanh", ffn_bias=True, attn_bias="all"),
}


def training(cfg: ModelConfig, seq_len: int = 64) -> int:
    return flops_per_token(cfg, seq_len).training


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("e, k", [(4, 1), (8, 1), (16, 1), (32, 1), (64, 1), (4, 2), (8, 2), (64, 2)])
def test_moe_twin_matches_training_flops(base, e, k):
    dense = BASES[base]
    twin = moe_twin(dense, e, k, seq_len=64)
    assert twin.is_moe and twin.moe.num_experts == e and twin.moe.router.top_k == k
    assert twin.sparse_layers == tuple(range(dense.n_layer))
    assert abs(training(twin) - training(dense)) / training(dense) < 0.01
    # The router's FLOPs are part of the match: they are paid for by narrower experts, not ignored.
    f = flops_per_token(twin, 64)
    assert f.router == dense.n_layer * 2 * dense.d_model * e
    assert abs(f.experts + f.router - flops_per_token(dense, 64).ffn_dense) <= dense.n_layer * k * 3 * 2 * dense.d_model
    # Only the FFN slots changed.
    assert (twin.d_model, twin.n_layer, twin.d_ff, twin.vocab_size) == (dense.d_model, dense.n_layer, dense.d_ff, dense.vocab_size)


def test_top2_halves_the_expert_width():
    base = get_preset("tiny_dense")  # d_ff=384, GLU: f_e = (3*384 - E) / (3k)
    assert moe_twin(base, 8, 1).moe.expert_hidden == 381
    assert moe_twin(base, 8, 2).moe.expert_hidden == 191
    assert moe_twin(base, 64, 2).moe.expert_hidden == 181


def test_match_holds_at_the_data_vocabulary_and_seq_len():
    """The trainer resizes the vocabulary to the tokenizer's; the match survives (lm_head is shared)."""
    base = get_preset("tiny_dense")
    for e, k in [(8, 1), (8, 2), (32, 1)]:
        twin = moe_twin(base, e, k, seq_len=128)
        for vocab, seq in [(257, 128), (4096, 32), (50000, 128)]:
            a, b = training(twin.replace(vocab_size=vocab), seq), training(dense_base(base).replace(vocab_size=vocab), seq)
            assert abs(a - b) / b < 0.01


def test_top1_twins_gate_with_the_probability():
    # A chosen top-k router (not the library default, which gives top-1 twins BASE layers, test_twin_balance.py)
    # with order topk_softmax: a softmax over one logit would always be 1.
    chosen = RouterConfig(order="topk_softmax", z_loss_coef=0.0)
    base = get_preset("tiny_dense")
    base = base.replace(moe=dataclasses.replace(base.moe, router=chosen))
    assert moe_twin(base, 8, 1).moe.router.order == "softmax_topk"
    assert moe_twin(base, 8, 2).moe.router.order == "topk_softmax"  # top-2 keeps the base's order
    gelu = BASES["gelu_nobias"].replace(moe=dataclasses.replace(BASES["gelu_nobias"].moe, router=chosen))
    model = Transformer(moe_twin(gelu, 4, 1))
    x = torch.randint(0, 500, (2, 8))
    model(x, x).loss.backward()  # the LM loss alone (no aux) reaches the router
    gate = [p for n, p in model.named_parameters() if "router" in n]
    assert gate and all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate)


def test_every_other_layer_twin():
    base = get_preset("tiny_dense")
    twin = moe_twin(base, 16, 2, layers="every:2")
    assert twin.sparse_layers == (1, 3)
    assert abs(training(twin) - training(base)) / training(base) < 0.01


def test_dense_wide_twin_matches_total_params():
    base = get_preset("tiny_dense")
    for e, k in [(8, 1), (8, 2), (4, 1)]:
        moe, wide = moe_twin(base, e, k), dense_wide_twin(base, e, k)
        assert not wide.is_moe and wide.d_ff > base.d_ff
        assert abs(count_params(wide).total - count_params(moe).total) / count_params(moe).total < 0.01
        assert training(wide) > training(moe)  # equal parameters cost more compute when dense


def test_build_twin_names_and_built_models_agree_with_counts():
    base = BASES["gelu_nobias"]
    for name in ["dense", "moe_e4_k1", "moe_e8_k2", "dense_wide_e4_k1"]:
        cfg = build_twin(base, name)
        model = Transformer(cfg)
        assert sum(p.numel() for p in model.parameters()) == count_params(cfg).total
        x = torch.randint(0, cfg.vocab_size, (2, 8))
        assert model(x, x).loss.isfinite()
    assert build_twin(get_preset("tiny_moe"), "dense") == dense_base(get_preset("tiny_moe"))
    # A base that already names its sparse slots keeps them for its twins.
    assert build_twin(get_preset("tiny_moe").replace(moe=get_preset("tiny_moe").moe.__class__(layers="last:2")),
                      "moe_e4_k1").sparse_layers == (2, 3)


def test_twin_names_and_table():
    names = twin_names()
    assert names[0] == "dense" and "moe_e64_k2" in names and "moe_e4_k1" in names and "dense_wide_e8_k1" in names
    rows = twin_table(get_preset("tiny_dense"), names, seq_len=128)
    for row in rows:
        if not row["twin"].startswith("dense_wide"):
            assert abs(row["flops_vs_dense"] - 1) < 0.01, row


@pytest.mark.parametrize("name, match", [
    ("sparse", "is not a twin name"), ("moe_e8", "is not a twin name"), ("moe_e2_k3", "1 <= k <= E"),
    ("moe_e0_k1", "at least 1 expert"),
])
def test_bad_twin_names(name, match):
    with pytest.raises(ValueError, match=match):
        parse_twin(name)


def test_unmatchable_twin_is_refused():
    narrow = ModelConfig(vocab_size=64, n_layer=1, d_model=16, n_head=2, d_ff=4, max_seq_len=16)
    with pytest.raises(ValueError, match="no expert width matches"):
        moe_twin(narrow, 64, 1)  # the router alone costs more than the dense FFN


# ------------------------------------------------------------------------------------------ the config boundary


def compose_run(overrides, tmp_path):
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return run_config_from_dict(OmegaConf.to_container(cfg, resolve=True), str(tmp_path))


def test_twin_key_resolves_at_the_boundary(tmp_path):
    run = compose_run(["model=tiny_dense", "twin=moe_e8_k1"], tmp_path)
    assert run.twin == "moe_e8_k1" and run.model == moe_twin(get_preset("tiny_dense"), 8, 1, seq_len=128)
    assert compose_run(["model=tiny_dense"], tmp_path).twin is None
    with pytest.raises(ValueError, match="is not a twin name"):
        compose_run(["twin=nope"], tmp_path)
    with pytest.raises(ValueError, match="exclude each other"):
        compose_run(["twin=dense", "init_from=/some/ckpt"], tmp_path)


def test_twin_width_multiple_rounds_the_expert_width_or_names_itself(tmp_path):
    """experiment=demo rounds its twins' widths to multiples of 8 (191 and 189 become 192); a multiple no width of
    which matches dense within 1% is refused naming the field."""
    demo = {t: compose_run(["experiment=demo", f"twin={t}"], tmp_path).model for t in ("moe_e8_k2", "moe_e16_k2")}
    assert {t: m.expert_hidden for t, m in demo.items()} == {"moe_e8_k2": 192, "moe_e16_k2": 192}
    plain = compose_run(["experiment=demo", "twin=moe_e8_k2", "twin_width_multiple=1"], tmp_path).model
    assert plain.expert_hidden == 191
    with pytest.raises(ValueError, match="twin_width_multiple=8.*set twin_width_multiple=1"):
        compose_run(["model=tiny_dense", "twin=moe_e256_k8", "twin_width_multiple=8"], tmp_path)
    with pytest.raises(ValueError, match="twin_width_multiple=0 must be an integer >= 1"):
        compose_run(["model=tiny_dense", "twin=moe_e8_k2", "twin_width_multiple=0"], tmp_path)


@pytest.mark.parametrize("experiment", ["demo", "dense_vs_moe"])
def test_sweep_experiments_share_everything_but_the_twin(experiment, tmp_path):
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    twins = str(cfg.hydra.sweeper.params.twin).split(",")
    assert twins[0] == "dense" and any(t.startswith("moe_") for t in twins)
    assert cfg.hydra.sweep.subdir == "dense"  # ${twin}: one directory per twin
    runs = [compose_run([f"experiment={experiment}", f"twin={t}"], tmp_path) for t in twins]
    ref = flops_per_token(runs[0].model, runs[0].trainer.seq_len).training
    for run in runs:
        assert (run.data, run.trainer, run.optim, run.seed) == (runs[0].data, runs[0].trainer, runs[0].optim, runs[0].seed)
        if not run.twin.startswith("dense_wide"):
            assert abs(flops_per_token(run.model, run.trainer.seq_len).training - ref) / ref < 0.01


# ------------------------------------------------------------ shared experts plus fine-grained routed experts


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("e, k, s", [(16, 2, 1), (64, 8, 1), (64, 6, 2), (256, 8, 1)])
def test_shared_expert_twin_matches_training_flops(base, e, k, s):
    dense = BASES[base]
    twin = moe_twin(dense, e, k, shared=s, seq_len=64)
    assert (twin.moe.num_experts, twin.moe.router.top_k, twin.moe.num_shared_experts) == (e, k, s)
    assert twin.moe.shared_hidden is None  # the shared experts are as narrow as the routed ones
    assert abs(training(twin) - training(dense)) / training(dense) < 0.01
    # k + s experts of width f_e per token cost what one dense FFN costs, less the router's 2*d*E
    proj = 3 if dense.glu else 2
    assert abs((k + s) * proj * twin.moe.expert_hidden + e - proj * dense.d_ff) <= (k + s) * proj


def test_fine_grained_twin_widths_and_names():
    base = get_preset("tiny_dense")  # f_e = (3*384 - E) / (3*(k + s))
    assert build_twin(base, "moe_e64_k8_s1").moe.expert_hidden == 40  # (1152 - 64) / 27 = 40.3
    assert build_twin(base, "moe_e16_k2_s1").moe.expert_hidden == 126  # (1152 - 16) / 9 = 126.2
    assert build_twin(base, "moe_e256_k8_s1").moe.expert_hidden == 33  # (1152 - 256) / 27 = 33.2
    spec = parse_twin("moe_e64_k8_s1")
    assert (spec.kind, spec.num_experts, spec.top_k, spec.shared, spec.name) == ("moe", 64, 8, 1, "moe_e64_k8_s1")
    assert parse_twin("moe_e8_k2").shared == 0 and parse_twin("moe_e8_k2").name == "moe_e8_k2"
    assert "moe_e64_k8_s1" in twin_names()
    # Built and counted alike: the shared experts' parameters are in the model and in count_params.
    cfg = build_twin(BASES["gelu_nobias"], "moe_e16_k2_s1")
    model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg).total
    wide = build_twin(base, "dense_wide_e16_k2_s1")
    assert abs(count_params(wide).total - count_params(build_twin(base, "moe_e16_k2_s1")).total) < 0.01 * count_params(wide).total


def test_bad_shared_twin_name():
    with pytest.raises(ValueError, match="drop _s0"):
        parse_twin("moe_e8_k2_s0")
    with pytest.raises(ValueError, match="is not a twin name"):
        parse_twin("moe_e8_s1")


# ------------------------------------------------------------------- python -m experiments.twins OVERRIDES


def test_twins_command_composes_the_train_config():
    from experiments.twins import composed_table

    heading, rows = composed_table(["experiment=demo"])
    assert "vocabulary 257" in heading and "seq_len 128" in heading  # the demo's byte model, not BPE's 4096
    by_name = {r["twin"]: r for r in rows}
    assert {"moe_e8_k2", "moe_e16_k2"} <= set(by_name)  # the demo sweep's twins
    demo = get_preset("tiny_dense").replace(vocab_size=257)
    assert by_name["moe_e8_k2"]["params_total"] == count_params(moe_twin(demo, 8, 2, seq_len=128, multiple_of=8)).total
    assert by_name["dense"]["params_total"] == count_params(demo).total
    # Any override of train applies: a wider base gives wider twins; the run's own twin= gets a row.
    heading, rows = composed_table(["experiment=demo", "model.d_ff=768", "twin=moe_e32_k4", "trainer.seq_len=64",
                                    "twin_width_multiple=1"])
    by_name = {r["twin"]: r for r in rows}
    assert "seq_len 64" in heading and by_name["moe_e8_k1"]["expert_hidden"] == (3 * 768 - 8) // 3
    assert by_name["moe_e32_k4"]["top_k"] == 4
    assert all(abs(r["flops_vs_dense"] - 1) < 0.01 for r in rows if not r["twin"].startswith("dense_wide"))
    # at the demo's multiple of 8, moe_e64_k8_s1 (width 77 at d_ff=768) has no width within 1%: its row says so
    by_name = {r["twin"]: r for r in composed_table(["experiment=demo", "model.d_ff=768"])[1]}
    assert "within 1%" in by_name["moe_e64_k8_s1"]["refused"] and by_name["moe_e8_k1"]["expert_hidden"] == 768


def test_twins_command_prints_the_table(capsys):
    from experiments.twins import main

    main(["model=tiny_dense", "data.tokenizer=byte"])
    out = capsys.readouterr().out.splitlines()
    assert "vocabulary 257" in out[0] and any(line.split()[0] == "moe_e64_k8_s1" for line in out[1:])


def test_twin_router_picks_balanced_defaults_or_keeps_the_composed_router(tmp_path):
    """auto: the default router becomes the balanced twin routers (balanced top-1 for top-1, aux 0.1 for top-2); keep: the
    composed router as it is (routing=topk equals the default, so only keep trains plain top-k); balanced: always."""
    def router(*overrides):
        return compose_run(["model=tiny_dense", *overrides], tmp_path).model.moe.router

    assert router("twin=moe_e8_k1").name == "balanced_topk"
    assert router("twin=moe_e8_k2").aux_loss_coef == 0.1
    kept = router("routing=topk", "twin=moe_e8_k1", "twin_router=keep")
    assert kept == dataclasses.replace(RouterConfig(), top_k=1, order="softmax_topk")
    assert router("routing=switch", "twin=moe_e8_k1").capacity_factor == 1.25  # a chosen router is kept under auto
    assert router("routing=switch", "twin=moe_e8_k1", "twin_router=balanced").name == "balanced_topk"
    with pytest.raises(ValueError, match=r"twin_router='some' must be one of \['auto', 'balanced', 'keep'\]"):
        router("twin=moe_e8_k1", "twin_router=some")
