"""Every Hydra config under conf/ composes, converts to a RunConfig and builds its model; overrides land where
they should and typos are refused."""
from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

import conf
from experiments.config import DeepSpeedConfig, run_config_from_dict
from experiments.generate import generate_text
from experiments.hydra_conf import CONFIG_MODULE, register_configs
from moe.config import ModelConfig
from moe.flops import count_params
from moe.model import Transformer
from moe.presets import PRESETS
from routing.config import RouterConfig

CONF_DIR = Path(conf.__file__).parent
# conf/hydra holds Hydra's own plugin configs (launcher, sweeper), not groups of the train config.
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", ".", "hydra")))
GROUP_FILES = [(g, f.stem) for g in GROUPS for f in sorted((CONF_DIR / g).glob("*.yaml"))]

register_configs()  # once: storing the presets costs ~0.1 s


def compose_cfg(overrides: list[str], config_name: str = "train"):
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name, overrides=overrides)


def to_run(cfg, run_dir):
    return run_config_from_dict(OmegaConf.to_container(cfg, resolve=True), str(run_dir))


def fill_missing(group: str, name: str, text_corpus: Path) -> list[str]:
    """Values for the fields a group file leaves as ??? (e.g. data.path)."""
    node = OmegaConf.load(CONF_DIR / group / f"{name}.yaml")
    node.pop("hydra", None)  # hydra.* interpolations (${now:...}, ${hydra.job.num}) resolve only inside Hydra
    values = {"path": str(text_corpus), "vocab_size": "257"}
    out = []
    # A value read from the Hydra job (${hydra:sweep.dir}/...) resolves only inside a launched job: a stand-in.
    prefix = "" if group == "experiment" else f"{group}."  # experiment files are @package _global_
    for key, value in _flatten(OmegaConf.to_container(node)).items():
        if isinstance(value, str) and "${hydra:" in value:
            out.append(f"{prefix}{key}=/launched/job/{key}")
            OmegaConf.update(node, key, None)
    for key in sorted(OmegaConf.missing_keys(node)):
        assert key in values, f"conf/{group}/{name}.yaml leaves {key} missing and the test has no value for it"
        out.append(f"{group}.{key}={values[key]}")
    return out


def test_groups_found():
    assert {"data", "logger", "optim", "routing", "trainer", "experiment"} <= set(GROUPS)
    assert len(GROUP_FILES) >= 10


def test_default_train_config(tmp_path):
    run = to_run(compose_cfg([]), tmp_path)
    assert run.model == PRESETS["tiny_moe"]
    assert run.data.source == "shakespeare"
    assert (run.seed, run.resume, run.init_from, run.run_dir) == (0, "never", None, str(tmp_path))


@pytest.mark.parametrize("group, name", GROUP_FILES, ids=[f"{g}={n}" for g, n in GROUP_FILES])
def test_group_file_composes_and_builds(group, name, tmp_path, text_corpus):
    overrides = [f"{group}={name}", *fill_missing(group, name, text_corpus)]
    if group == "deepspeed":
        overrides.insert(0, "trainer=deepspeed")  # the engine's settings exist only with trainer=deepspeed
    cfg = compose_cfg(overrides)
    run = to_run(cfg, tmp_path)
    model = Transformer(run.model.replace(vocab_size=257))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == count_params(model.cfg).total
    # The group file's values arrive in the RunConfig unchanged.
    node = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{name}.yaml"))
    node.pop("defaults", None)
    if group == "routing":
        got = dataclasses.asdict(run.model.moe.router)
    elif group == "experiment":
        got = run.to_dict()
        node.pop("hydra", None)
    else:
        got = dataclasses.asdict(getattr(run, group))
    for key, value in _flatten(node).items():
        if value == "???" or (isinstance(value, str) and "${hydra:" in value):
            continue
        assert _lookup(got, key) == value, f"conf/{group}/{name}.yaml: {key}"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _lookup(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def test_generate_config_composes():
    cfg = compose_cfg(["checkpoint=x"], config_name="generate")
    params = set(inspect.signature(generate_text).parameters)
    assert set(cfg) == params  # every generate.yaml key is an argument of generate_text, and the reverse
    assert cfg.checkpoint == "x"
    assert cfg.max_new_tokens == 200 and cfg.temperature == 0.8 and cfg.top_k == 50 and cfg.num_samples == 1


def test_generate_config_needs_checkpoint():
    cfg = compose_cfg([], config_name="generate")
    assert OmegaConf.is_missing(cfg, "checkpoint")


# ------------------------------------------------------------------------------------------------ presets

SMALL = [n for n in PRESETS if n.startswith("tiny_")]
LARGE = [n for n in PRESETS if not n.startswith("tiny_")]


@pytest.mark.parametrize("name", SMALL)
def test_small_preset_builds(name, tmp_path):
    run = to_run(compose_cfg([f"model={name}"]), tmp_path)
    assert run.model == PRESETS[name]  # through Hydra and back without a change
    model = Transformer(run.model)
    assert sum(p.numel() for p in model.parameters()) == count_params(run.model).total
    x = torch.randint(0, run.model.vocab_size, (1, 8))
    assert model(x, x).loss.isfinite()


def test_tiny_twins_have_equal_active_params():
    dense, moe = count_params(PRESETS["tiny_dense"]), count_params(PRESETS["tiny_moe"])
    assert PRESETS["tiny_moe"].sparse_layers == (0, 1, 2, 3)
    assert PRESETS["tiny_dense"].sparse_layers == ()
    # Same width per token: 2 experts of half width replace the dense FFN; the routers add d*E per layer.
    assert moe.active - dense.active == 4 * 128 * 8
    assert moe.total > 2 * dense.total


@pytest.mark.parametrize("name", LARGE)
def test_large_preset_config(name, tmp_path):
    run = to_run(compose_cfg([f"model={name}"]), tmp_path)
    assert run.model == PRESETS[name]
    p = count_params(run.model)
    m = re.fullmatch(r"(gpt3|opt)_([\d.]+)([mb])", name)
    if m:  # the published sizes, within 5%
        nominal = float(m.group(2)) * (1e6 if m.group(3) == "m" else 1e9)
        assert abs(p.total - nominal) / nominal < 0.05, p.total
        assert p.active == p.total and not run.model.is_moe
    elif name.endswith("_64e"):
        assert run.model.moe.num_experts == 64 and run.model.moe.router.top_k == 2
        assert run.model.sparse_layers == tuple(range(1, run.model.n_layer, 2))
        n_sparse = len(run.model.sparse_layers)
        per_expert = p.experts_total // (n_sparse * 64)
        assert p.total - p.active == n_sparse * (64 - 2) * per_expert  # 62 of 64 experts idle per token
    else:
        assert p.active == p.total and not run.model.is_moe


def test_glam_64b_64e_matches_paper():
    # GLaM (Du et al. 2022), Table 4: 1.2T parameters in total, 96.6B activated per token.
    p = count_params(PRESETS["glam_64b_64e"])
    assert p.total == pytest.approx(1.2e12, rel=0.05)
    assert p.active == pytest.approx(96.6e9, rel=0.01)


def test_unknown_preset():
    with pytest.raises(MissingConfigException, match="model/nope"):
        compose_cfg(["model=nope"])


# ------------------------------------------------------------------------------------------------ routing


def test_routing_switch_lands_in_router(tmp_path):
    run = to_run(compose_cfg(["routing=switch"]), tmp_path)
    r = run.model.moe.router
    assert (r.name, r.top_k, r.order, r.capacity_factor, r.eval_capacity_factor) == ("topk", 1, "softmax_topk", 1.25, 2.0)
    assert (r.aux_loss_coef, r.z_loss_coef, r.jitter, r.drop_policy) == (0.01, 0.0, 0.01, "position")
    # Only the router changed: the rest of the preset is kept.
    assert run.model.replace(moe=dataclasses.replace(run.model.moe, router=RouterConfig())) == PRESETS["tiny_moe"]


def test_routing_mixtral_and_glam(tmp_path):
    mix = to_run(compose_cfg(["routing=mixtral"]), tmp_path).model.moe.router
    assert (mix.top_k, mix.order, mix.capacity_factor, mix.aux_loss_coef, mix.z_loss_coef) == (2, "topk_softmax", 0.0, 0.02, 0.001)
    glam = to_run(compose_cfg(["routing=glam"]), tmp_path).model.moe.router
    assert (glam.top_k, glam.order, glam.renormalize, glam.capacity_factor) == (2, "softmax_topk", True, 2.0)


def test_routing_field_override_after_group(tmp_path):
    run = to_run(compose_cfg(["routing=switch", "model.moe.router.capacity_factor=1.5", "model.moe.num_experts=4"]), tmp_path)
    assert run.model.moe.router.capacity_factor == 1.5 and run.model.moe.router.top_k == 1
    assert run.model.moe.num_experts == 4
    assert Transformer(run.model.replace(vocab_size=64)).blocks[0].ffn.experts.w_up.shape == (4, 128, 192)


def test_routing_on_dense_model(tmp_path):
    run = to_run(compose_cfg(["model=tiny_dense", "routing=switch"]), tmp_path)
    assert run.model.moe.router.top_k == 1 and not run.model.is_moe


# ------------------------------------------------------------------------------------------------ typos


@pytest.mark.parametrize(
    "override, match",
    [
        ("model.moe.foo=1", "model.moe.foo"),
        ("model.moe.router.top_kk=1", "model.moe.router.top_kk"),
        ("trainer.max_step=3", "trainer.max_step"),
        ("optim.learning_rate=1", "optim.learning_rate"),
        ("routing=nope", "routing/nope"),
        ("model.n_head=abc", "model.n_head"),
        ("nonsense=1", "nonsense"),
    ],
)
def test_typos_raise(override, match):
    with pytest.raises((ConfigCompositionException, MissingConfigException), match=re.escape(match)):
        compose_cfg([override])


def test_forced_unknown_field_is_refused(tmp_path):
    """`+model.moe.foo=1` gets past Hydra's struct check on some versions; the dataclass boundary refuses it."""
    try:
        cfg = compose_cfg(["+model.moe.foo=1"])
    except ConfigCompositionException as e:
        assert "foo" in str(e)
        return
    with pytest.raises(ValueError, match=r"unknown field model.moe.foo; the known fields there are \['dispatcher'"):
        to_run(cfg, tmp_path)


@pytest.mark.parametrize(
    "override, match",
    [
        ("model.moe.router.name=nope", r"name='nope' is not a known router"),
        ("model.moe.router.top_k=9", r"top_k=9 is larger than moe.num_experts=8"),
        ("model.n_head=3", r"model.n_head=3 does not divide model.d_model=128"),
        ("trainer.seq_len=256", r"trainer.seq_len=256 exceeds model.max_seq_len=128"),
        ("model.moe.layers=every:0", r"model.moe.layers='every:0'"),
        ("model.moe.layers=7", r"model.moe.layers lists \[7\]"),
        ("optim.schedule=step", r"optim.schedule='step'"),
        ("optim.min_lr=1.0", r"optim.min_lr=1.0"),
        ("trainer.kind=mpi", r"trainer.kind='mpi' must be single, ddp, fsdp or deepspeed"),
        ("deepspeed=zero2", r"deepspeed settings were given but trainer.kind='single'"),
        ("deepspeed.zero_stage=2", r"deepspeed settings were given but trainer.kind='single'"),
        ("model.moe.expert_parallel=2", r"model.moe.expert_parallel=2 needs one process per rank"),
        ("model.moe.expert_parallel=3", r"model.moe.expert_parallel=3 does not divide model.moe.num_experts=8"),
        ("trainer.precision=fp16", r"trainer.precision='fp16'"),
        ("logger.kind=tensorboard", r"logger.kind='tensorboard'"),
        ("resume=always", r"resume='always'"),
        ("data.tokenizer=words", r"data.tokenizer='words'"),
        ("optim.fused=true trainer=deepspeed", r"optim.fused=true is not supported with trainer=deepspeed"),
    ],
)
def test_bad_values_raise_at_the_boundary(override, match, tmp_path):
    cfg = compose_cfg(override.split())  # Hydra checks types (tests/experiments/test_typed_config.py); dataclasses values
    with pytest.raises(ValueError, match=match):
        to_run(cfg, tmp_path)


def test_trainer_deepspeed_selects_zero1_and_takes_the_other_stages(tmp_path):
    """trainer=deepspeed picks deepspeed=zero1 (conf/trainer/deepspeed.yaml); deepspeed=zero0|zero2 and field
    overrides replace it; the other trainers have no deepspeed section."""
    assert to_run(compose_cfg(["trainer=deepspeed"]), tmp_path).deepspeed == DeepSpeedConfig(zero_stage=1)
    for stage in (0, 2):
        run = to_run(compose_cfg(["trainer=deepspeed", f"deepspeed=zero{stage}"]), tmp_path)
        assert run.trainer.kind == "deepspeed" and run.deepspeed.zero_stage == stage
    run = to_run(compose_cfg(["trainer=deepspeed", "deepspeed.reduce_bucket_size=1000"]), tmp_path)
    assert run.deepspeed.reduce_bucket_size == 1000
    assert to_run(compose_cfg([]), tmp_path).deepspeed is None
    assert to_run(compose_cfg(["trainer=ddp"]), tmp_path).deepspeed is None
    # The deepspeed node is typed in every config (its defaults are zero1's); only trainer=deepspeed keeps it.
    assert to_run(compose_cfg(["trainer.kind=deepspeed"]), tmp_path).deepspeed == DeepSpeedConfig(zero_stage=1)
    with pytest.raises(ConfigCompositionException, match=r"deepspeed.zero_stage=x"):
        compose_cfg(["trainer=deepspeed", "deepspeed.zero_stage=x"])


def test_numbers_where_text_is_expected_become_text(tmp_path):
    run = to_run(compose_cfg(["logger.name=123", "optim.lr=1", "trainer.grad_clip=0"]), tmp_path)
    assert run.logger.name == "123" and run.optim.lr == 1 and run.trainer.grad_clip == 0


def test_unknown_top_level_key(tmp_path):
    d = OmegaConf.to_container(compose_cfg([]), resolve=True)
    d["trainr"] = {}
    with pytest.raises(ValueError, match=r"unknown field trainr; the known fields there are \['data', 'deepspeed'"):
        run_config_from_dict(d, str(tmp_path))
    del d["trainr"], d["model"]
    with pytest.raises(ValueError, match="model=PRESET"):
        run_config_from_dict(d, str(tmp_path))


def test_model_config_round_trips_json():
    import json

    for name, cfg in PRESETS.items():
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg, name
