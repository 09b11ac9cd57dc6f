"""Every group of the train config is typed by Hydra itself: a wrong type or an unknown key, on the command line or
in a group's YAML file, fails at composition and names the key; defaults live once, in the dataclasses; the
config is found by its path; composing imports no torch."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from experiments.config import DeepSpeedConfig, LoggerConfig, OptimConfig, TrainConfig, TrainerConfig
from experiments.data_config import DataConfig
from experiments.hydra_conf import CONFIG_DIR, register_configs
from experiments.typed_config import from_mapping
from routing.config import RouterConfig

REPO = Path(__file__).resolve().parents[2]
register_configs()

# group -> (a field of its schema with a wrong value, an unknown field, overrides the group needs to be composed)
GROUPS = {
    "trainer": ("max_steps: abc", "max_step: 3", []),
    "optim": ("lr: fast", "learning_rate: 1.0", []),
    "data": ("val_fraction: most", "vocab: 4096", []),
    "logger": ("mode: [offline]", "projet: x", []),
    "deepspeed": ("zero_stage: one", "zero: 1", ["trainer=deepspeed"]),
    "routing": ("top_k: two", "topk: 2", []),  # @package model.moe.router: typed by RouterConfig
    "model": ("n_layer: four", "layers: 4", []),
    "experiment": ("seed: lucky", "sed: 1", []),  # @package _global_: typed by TrainConfig at the root
}
HEADER = {"routing": "# @package model.moe.router\n", "experiment": "# @package _global_\n"}


def compose_with(extra_dir: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[f"hydra.searchpath=[file://{extra_dir}]", *overrides])


def _write_group_files(root: Path, group: str) -> None:
    wrong, unknown, _ = GROUPS[group]
    (root / group).mkdir(parents=True)
    base = "defaults:\n  - tiny_dense\n  - _self_\n" if group == "model" else ""  # a model file extends a preset
    for name, body in (("wrong_type", wrong), ("unknown_key", unknown)):
        (root / group / f"{name}.yaml").write_text(HEADER.get(group, "") + base + body + "\n")


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_group_file_with_wrong_type_or_unknown_key_fails_at_composition(group, tmp_path):
    _write_group_files(tmp_path, group)
    wrong, unknown, needs = GROUPS[group]
    key = {"routing": "model.moe.router.", "experiment": "", "model": "model."}.get(group, f"{group}.")
    with pytest.raises(ConfigCompositionException) as e:
        compose_with(tmp_path, [*needs, f"{group}=wrong_type"])
    assert f"{key}{wrong.split(':')[0]}" in _chain(e.value)
    with pytest.raises(ConfigCompositionException) as e:
        compose_with(tmp_path, [*needs, f"{group}=unknown_key"])
    assert unknown.split(":")[0] in _chain(e.value)


@pytest.mark.parametrize("override", ["trainer.max_steps=abc", "trainer.batch_size=4.5", "trainer.progress=maybe",
                                      "optim.lr=abc", "data.vocab_size=true", "logger.entity=[a]", "seed=abc",
                                      "model.moe.router.top_k=x", "trainer.max_step=3", "optim.learning_rate=1",
                                      "logger.projet=x", "data.vocab=1"])
def test_wrong_override_fails_at_composition_naming_the_key(override, tmp_path):
    with pytest.raises(ConfigCompositionException) as e:
        compose_with(tmp_path, [override])
    assert override.split("=")[0] in _chain(e.value)


def _chain(e: BaseException) -> str:
    """The message of an exception and of its causes (Hydra wraps OmegaConf's error, which names the full key)."""
    out = []
    while e is not None:
        out.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(out)


def test_from_mapping_names_the_key_and_the_type():
    with pytest.raises(ValueError, match=r"^trainer.max_steps='abc' must be int$"):
        from_mapping(TrainerConfig, {"max_steps": "abc"}, "trainer")
    with pytest.raises(ValueError, match=r"^data.vocab_size=True must be int or null$"):
        from_mapping(DataConfig, {"vocab_size": True}, "data")
    with pytest.raises(ValueError, match=r"^unknown field optim.learning_rate; the known fields there are \['beta1'"):
        from_mapping(OptimConfig, {"learning_rate": 1.0}, "optim")
    with pytest.raises(ValueError, match=r"trainer.max_steps=0 must be at least 1"):  # the dataclass's own check
        from_mapping(TrainerConfig, {"max_steps": 0}, "trainer")
    assert from_mapping(TrainerConfig, {"max_steps": "7"}, "trainer").max_steps == 7  # what Hydra does with "7"


# A group file holds what makes its option different, never a restated default: the dataclass is the one source.
# (Routing presets are the exception: they are merged over the model preset's router, so they say every field.)
SCHEMAS = {"trainer": TrainerConfig, "optim": OptimConfig, "data": DataConfig, "logger": LoggerConfig,
           "deepspeed": DeepSpeedConfig}
CHOICE_KEYS = {"kind", "source", "zero_stage"}  # the field that names the option may equal the default option


@pytest.mark.parametrize("group", sorted(SCHEMAS))
def test_group_files_restate_no_default(group):
    defaults = dataclasses.asdict(SCHEMAS[group]())
    for f in sorted((Path(CONFIG_DIR) / group).glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(f))
        node = {} if node is None else {k: v for k, v in node.items() if k != "defaults"}
        restated = {k: v for k, v in node.items() if k not in CHOICE_KEYS and v == defaults[k]}
        assert not restated, f"{f.name} restates the defaults {restated} of {SCHEMAS[group].__name__}"


def test_every_group_is_a_typed_field_of_the_schema():
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    groups = {p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir() and not p.name.startswith(("_", "hydra"))}
    assert groups - {"routing", "experiment"} <= set(fields)  # routing -> model.moe.router, experiment -> the root
    compose_cfg = compose_with(Path(CONFIG_DIR), ["trainer=deepspeed", "routing=switch"])
    for name, cls in {**SCHEMAS, "model": None}.items():
        assert OmegaConf.get_type(compose_cfg[name]).__name__ == (cls.__name__ if cls else "ModelConfig")
    assert OmegaConf.get_type(compose_cfg.model.moe.router) is RouterConfig


def _app(args: list[str], cwd: Path, module: str = "experiments.train") -> subprocess.CompletedProcess:
    code = (f"import runpy, sys\nsys.argv = ['app', *sys.argv[1:]]\ntry:\n"
            f"    runpy.run_module('{module}', run_name='__main__')\nexcept SystemExit as e:\n"
            "    if e.code: raise\nprint('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_cfg_job_composes_beside_a_users_own_conf_folder_and_imports_no_torch(tmp_path):
    """A `conf/` in the working directory comes first on sys.path; the app finds its configs by their path."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "__init__.py").write_text("")
    (tmp_path / "conf" / "train.yaml").write_text("not_ours: 1\n")
    p = _app(["--cfg", "job", "model=tiny_dense", "trainer.max_steps=7"], tmp_path)
    assert p.returncode == 0, p.stderr
    cfg = OmegaConf.create(p.stdout.rsplit("\n", 2)[0])
    assert cfg.trainer.max_steps == 7 and cfg.model.moe.layers == "none" and "not_ours" not in cfg
    assert p.stdout.strip().endswith("NO_TORCH")
    h = _app(["--help"], tmp_path)
    assert h.returncode == 0 and "model: glam_0.1b" in h.stdout and h.stdout.strip().endswith("NO_TORCH"), h.stderr


@pytest.mark.parametrize("module, args, line", [
    ("experiments.upcycle", ["out=x"], "upcycle: source=... is required: python -m experiments.upcycle source=PATH"),
    ("experiments.upcycle", ["source=/no/such/model", "out=x"], "upcycle: source='/no/such/model' does not exist"),
    ("experiments.train", ["trainer.seq_len=1000"], "train: trainer.seq_len=1000 exceeds model.max_seq_len=128"),
])
def test_a_config_the_user_must_fix_is_one_line_and_status_2(module, args, line, tmp_path):
    p = _app(args, tmp_path, module)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stderr.strip().startswith(line) and "Traceback" not in p.stderr, p.stderr
