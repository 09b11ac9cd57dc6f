"""DeepSpeed kept honest, second part (the first, with the pin and the helpers, is test_deepspeed_private_api.py):
the ZeRO optimizers' attributes our engine sets and reads, the engine config keys DeepSpeed parses and the optimizer
wrapper it picks, and the checkpoint files and pickled globals the converter reads. Same rule: fails, never skips."""
from __future__ import annotations

import ast
import dataclasses
import enum
import fnmatch
import functools
import importlib
import inspect
import io
import os
import re
import textwrap
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tests.experiments.test_deepspeed_private_api import (BF16_CLS, CONVERTER, ENGINE, ENGINE_CLS, MOE_CLS, OUR,
                                                          ZERO_CLS, _fail, _tiny_moe, ds, resolve, source_of)
# ------------------------------------------------------------- ZeRO optimizers: attributes our code sets and reads

def _self_attributes(cls) -> tuple[set[str], dict[str, set[str]]]:
    """(attributes any method of cls assigns on self, {method: attributes it reads from self})."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    stores, loads = set(), {}
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                if isinstance(node.ctx, ast.Store):
                    stores.add(node.attr)
                else:
                    loads.setdefault(fn.name, set()).add(node.attr)
    return stores, loads


ZERO_ATTRS = [
    (cls, attr, use) for cls in (ZERO_CLS, BF16_CLS) for attr, use in (
        ("_hp_optimizer_states_linked", "_init_partitioned_state() sets engine.optimizer._hp_optimizer_states_linked "
                                        "= False so that _lazy_init_hp_params_optimizer_state() links again"),
        ("optimizer", "_load_partitioned_state() writes the step into engine.optimizer.optimizer.state; "
                      "_init_partitioned_state() fills the client optimizer's state the wrapper links"),
    )
]


@pytest.mark.parametrize("cls, attr, use", ZERO_ATTRS,
                         ids=[f"{c.rpartition(':')[2]}.{a}" for c, a, _ in ZERO_ATTRS])
def test_zero_optimizer_attribute(cls, attr, use):
    user = f"{ENGINE}: {OUR}.{use}"
    stores, loads = _self_attributes(resolve(cls, user))
    lazy = loads.get("_lazy_init_hp_params_optimizer_state", set())
    assert attr in stores, f"DeepSpeed private API changed: {cls} no longer sets self.{attr}. Used by {user}"
    assert attr in lazy, (
        f"DeepSpeed private API changed: {cls}._lazy_init_hp_params_optimizer_state no longer reads self.{attr} "
        f"(it reads {sorted(lazy)}). Used by {user}")


def test_lazy_init_links_the_wrapped_optimizers_state():
    for cls in (ZERO_CLS, BF16_CLS):
        user = (f"{ENGINE}: {OUR}._init_partitioned_state() creates AdamW's state in the client optimizer "
                f"(engine.optimizer.optimizer.state) before asking {cls} to link it")
        text = source_of(f"{cls}._lazy_init_hp_params_optimizer_state", user)
        assert "self.optimizer.state" in text and "self.optimizer.param_groups" in text, (
            f"DeepSpeed private API changed: {cls}._lazy_init_hp_params_optimizer_state no longer links "
            f"self.optimizer.state per self.optimizer.param_groups. Used by {user}")


# ------------------------------------------------------------------ the engine's config and its optimizer choice

ENGINE_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "managed_gradient_accumulation", "gradient_clipping", "zero_optimization", "bf16",
               "zero_allow_untested_optimizer", "steps_per_print", "wall_clock_breakdown")
ZERO_KEYS = ("stage", "reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients",
             "reduce_scatter", "allgather_partitions")


def _config(zero_stage: int, bf16: bool, clip: float = 1.0) -> dict:
    """What ENGINE's engine_config() builds, on one process (checked against it in test_engine_config_is_covered)."""
    zero = {"stage": zero_stage}
    if zero_stage > 0:
        zero.update(reduce_bucket_size=2**20, allgather_bucket_size=2**20, overlap_comm=zero_stage == 2,
                    contiguous_gradients=True, reduce_scatter=True, allgather_partitions=True)
    return {"train_batch_size": 4 * 2, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
            "managed_gradient_accumulation": False, "gradient_clipping": 0.0 if zero_stage == 0 else clip,
            "zero_optimization": zero, "bf16": {"enabled": bf16}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


class _Reads(dict):
    """A config dict that records which keys DeepSpeed looks up."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.read: set[str] = set()

    def get(self, key, *default):
        self.read.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


CONFIG_USER = f"{ENGINE}: engine_config()"


@functools.cache
def _parsed(zero_stage: int, bf16: bool):
    DeepSpeedConfig = resolve("deepspeed.runtime.config:DeepSpeedConfig", CONFIG_USER)
    raw = _Reads(_config(zero_stage, bf16))
    try:
        return raw.read, DeepSpeedConfig(raw)
    except Exception as e:
        _fail(f"DeepSpeed's config changed: DeepSpeedConfig rejects the config {CONFIG_USER} builds "
              f"(zero stage {zero_stage}, bf16={bf16}): {type(e).__name__}: {e}")


@pytest.mark.parametrize("key", ENGINE_KEYS)
def test_config_key_is_read(key):
    """DeepSpeed silently ignores unknown top-level keys: a renamed key would drop our setting without a word."""
    for stage, bf16 in ((0, False), (2, True)):
        read, _ = _parsed(stage, bf16)
        assert key in read, (f"DeepSpeed's config changed: DeepSpeedConfig no longer reads the key {key!r} (zero stage "
                             f"{stage}), so the value {CONFIG_USER} sets is ignored. Find its new name")


CONFIG_VALUES = [  # (config attribute path, expected for _config(2, True)), the parsed values the engine acts on
    ("managed_gradient_accumulation", False), ("gradient_accumulation_steps", 2),
    ("train_micro_batch_size_per_gpu", 4), ("gradient_clipping", 1.0), ("zero_optimization_stage", 2),
    ("zero_enabled", True), ("zero_allow_untested_optimizer", True), ("bfloat16_config.enabled", True),
    ("float16_config.enabled", False), ("grad_accum_dtype", None),
    *((f"zero_config.{k}", v) for k, v in _config(2, True)["zero_optimization"].items() if k != "stage"),
]


@pytest.mark.parametrize("path, expected", CONFIG_VALUES, ids=[p for p, _ in CONFIG_VALUES])
def test_config_value_lands(path, expected):
    _, cfg = _parsed(2, True)
    value = cfg
    for part in path.split("."):
        if not hasattr(value, part):
            _fail(f"DeepSpeed's config changed: DeepSpeedConfig has no {path} any more; the engine read our setting "
                  f"there ({CONFIG_USER})")
        value = getattr(value, part)
    assert value == expected, (f"DeepSpeed's config changed: {CONFIG_USER}'s setting arrives as DeepSpeedConfig."
                               f"{path} = {value!r}, expected {expected!r}")


class EngineView:
    """DeepSpeedEngine's own methods on a stand-in holding only a parsed config: no module, no process group."""

    def __init__(self, config, **attrs):
        self._config = config
        self.__dict__.update(attrs)

    def __getattr__(self, name):
        engine = resolve(ENGINE_CLS, f"{ENGINE}: {OUR}")
        try:
            raw = inspect.getattr_static(engine, name)
        except AttributeError:
            raise AttributeError(f"DeepSpeedEngine.{name}") from None
        return raw.__get__(self, type(self)) if hasattr(raw, "__get__") else raw


WRAPPERS = [(0, False, None), (1, False, "ZERO_OPTIMIZATION"), (2, False, "ZERO_OPTIMIZATION"),
            (1, True, "ZERO_OPTIMIZATION"), (2, True, "ZERO_OPTIMIZATION")]


@pytest.mark.parametrize("zero_stage, bf16, wrapper", WRAPPERS,
                         ids=[f"zero{z}_{'bf16' if b else 'fp32'}" for z, b, _ in WRAPPERS])
def test_optimizer_wrapper_choice(monkeypatch, zero_stage, bf16, wrapper):
    """ZeRO 0 fp32: the engine steps our AdamW itself (the exact clip is a step pre-hook on it); ZeRO 1/2: the
    client optimizer sits in DeepSpeedZeroOptimizer, whose internals _init_partitioned_state() uses."""
    user = (f"{ENGINE}: {OUR}.wrap() (ZeRO 0: the clip hook on our optimizer; ZeRO 1/2: "
            f"_init_partitioned_state() on DeepSpeedZeroOptimizer)")
    engine_module = importlib.import_module(resolve(ENGINE_CLS, user).__module__)
    monkeypatch.setattr(engine_module, "is_zero_supported_optimizer", lambda opt: False)  # it asks the process group
    view = EngineView(_parsed(zero_stage, bf16)[1], global_rank=0, pipeline_parallelism=False)
    try:
        got = view._do_optimizer_sanity_check(torch.optim.AdamW([nn.Parameter(torch.zeros(2))]))
    except AttributeError as e:
        _fail(f"DeepSpeed private API changed: DeepSpeedEngine._do_optimizer_sanity_check now needs {e}, which this "
              f"check's stand-in lacks; read it again: it decides how the engine wraps the optimizer, used by {user}")
    expected = None if wrapper is None else resolve(f"deepspeed.runtime.engine:{wrapper}", user)
    assert got == expected, (
        f"DeepSpeed private API changed: with zero stage {zero_stage} and bf16={bf16} the engine now wraps the "
        f"optimizer as {got!r}, not {wrapper!r}. Used by {user}")


# ------------------------------------------------------------------------ checkpoint files the converter reads

MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")
EXPERT_FILES = "layer_*_expert_*_model_states.pt"


def test_model_states_file_name():
    user = f"{CONVERTER}: MODEL_STATES, resolve_tag_dir() and convert()"
    view = EngineView(_parsed(2, True)[1], checkpoint_mp_rank=0)
    name = view._get_ckpt_name("ckpt", "step_1")
    assert name == os.path.join("ckpt", "step_1", MODEL_STATES), (
        f"DeepSpeed private API changed: DeepSpeedEngine._get_ckpt_name now names the model states {name!r}, not "
        f"ckpt/step_1/{MODEL_STATES}. Used by {user}")


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_zero_optimizer_file_name(bf16):
    user = f"{CONVERTER}: OPTIM_STATES and _fp32_from_zero()"
    view = EngineView(_parsed(2, bf16)[1], checkpoint_mp_rank=0)
    name = os.path.basename(view._get_rank_zero_ckpt_name("ckpt", "step_1", 0, 3, bf16))
    m = OPTIM_STATES.fullmatch(name)
    assert m and m.group(1) == "3", (
        f"DeepSpeed private API changed: DeepSpeedEngine._get_rank_zero_ckpt_name now names rank 3's ZeRO file "
        f"{name!r}, which {OPTIM_STATES.pattern} does not match. Used by {user}")


def test_expert_file_name():
    user = f"{CONVERTER}: convert() refuses DeepSpeed's own MoE expert files by the glob {EXPERT_FILES!r}"
    get = resolve(f"{ENGINE_CLS}._get_expert_ckpt_name", user)
    name = os.path.basename(get("ckpt", 0, 5, "step_1", checkpoint_mp_rank=0))
    assert fnmatch.fnmatch(name, EXPERT_FILES), (
        f"DeepSpeed private API changed: DeepSpeedEngine._get_expert_ckpt_name now names expert files {name!r}, "
        f"which {EXPERT_FILES!r} does not match. Used by {user}")


def test_module_state_keeps_our_expert_weights():
    """DeepSpeed drops 'expert' keys under its MoE modules from the model states file; ours sit under `model.`, the
    announcement under `moe.`, so rank 0's expert shards stay in the file the converter reads."""
    user = (f"{CONVERTER}: convert() reads the experts from `module` in {MODEL_STATES} ({ENGINE}: EngineModule "
            f"holds the Transformer as `model` and the announcement as `moe`)")
    MoE = resolve(MOE_CLS, user)
    get_non_moe = resolve(f"{ENGINE_CLS}._get_non_moe_state_dict", user)

    class Announcement(MoE):
        def __init__(self):
            nn.Module.__init__(self)

    module = nn.Module()
    module.model = _tiny_moe()
    module.moe = Announcement()
    full = module.state_dict()
    experts = [k for k in full if "expert" in k]
    assert experts, "the tiny model has no expert weights: this check tests nothing"
    kept = get_non_moe(SimpleNamespace(module=module), dict(full))
    dropped = sorted(set(full) - set(kept))
    assert not dropped, (f"DeepSpeed private API changed: DeepSpeedEngine._get_non_moe_state_dict now drops {dropped} "
                         f"from the model states file. Used by {user}")


# ------------------------------------------------------------------------------ the converter's pickled globals

GLOBALS = {  # the name a pickle records -> what the converter rebuilds it as (CONVERTER: DEEPSPEED_GLOBALS)
    "deepspeed.runtime.zero.config.ZeroStageEnum": "int",
    "deepspeed.utils.tensor_fragment.fragment_address": "SimpleNamespace",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": "SimpleNamespace",
}


def _instance(name):
    cls = resolve(":".join(name.rsplit(".", 1)), f"{CONVERTER}: DEEPSPEED_GLOBALS")
    if name.endswith("ZeroStageEnum"):
        return cls.gradients
    if name.endswith("fragment_address"):
        return cls(numel=6, start=2)
    return cls(1.0)


@pytest.mark.parametrize("name", GLOBALS)
def test_pickled_global_name(name):
    """A pickle names a class by its __module__ and __qualname__: a class that moved (even if re-exported at the old
    path) is pickled under its new name, which the converter then refuses."""
    obj = _instance(name)
    buf = io.BytesIO()
    torch.save({"x": obj}, buf)
    buf.seek(0)
    needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(buf))
    assert needed == {name}, (
        f"DeepSpeed private API changed: a {name} object now pickles as globals {sorted(needed)}. Used by "
        f"{CONVERTER}: DEEPSPEED_GLOBALS maps {name} to {GLOBALS[name]} and refuses every other global; map the new "
        f"names (as plain data only)")


def test_zero_stage_enum_is_an_int():
    user = f"{CONVERTER}: DEEPSPEED_GLOBALS rebuilds ZeroStageEnum as int; _fp32_from_zero() wants zero_stage 1 or 2"
    cls = resolve("deepspeed.runtime.zero.config:ZeroStageEnum", user)
    assert issubclass(cls, int) and issubclass(cls, enum.Enum), (
        f"DeepSpeed private API changed: ZeroStageEnum is no longer an (int, Enum). Used by {user}")
    assert (int(cls.optimizer_states), int(cls.gradients)) == (1, 2), (
        f"DeepSpeed private API changed: ZeroStageEnum's stages 1 and 2 have new values. Used by {user}")


def test_fragment_address_is_plain_data():
    user = f"{CONVERTER}: DEEPSPEED_GLOBALS rebuilds fragment_address as a SimpleNamespace of its fields"
    cls = resolve("deepspeed.utils.tensor_fragment:fragment_address", user)
    assert dataclasses.is_dataclass(cls) and [f.name for f in dataclasses.fields(cls)] == ["numel", "start"], (
        f"DeepSpeed private API changed: fragment_address is no longer a dataclass of (numel, start). Used by {user}")


def test_loss_scaler_state_is_plain_data():
    user = f"{CONVERTER}: DEEPSPEED_GLOBALS rebuilds LossScaler as a SimpleNamespace of its attributes"
    obj = _instance("deepspeed.runtime.fp16.loss_scaler.LossScaler")
    state = obj.__reduce_ex__(2)[2]
    plain = (bool, int, float, str, type(None))
    assert isinstance(state, dict) and all(isinstance(v, plain) for v in state.values()), (
        f"DeepSpeed private API changed: LossScaler's pickled state is {state!r}, not plain values. Used by {user}")


# ------------------------------------------------- our code still uses what this file checks (the tables here)

def _our_module(rel: str):
    return importlib.import_module(rel.removesuffix(".py").replace("/", "."))


def test_converter_tables_match():
    conv = _our_module(CONVERTER)
    names = {name for _, name in conv.DEEPSPEED_GLOBALS}
    assert names == set(GLOBALS), (f"{CONVERTER}: DEEPSPEED_GLOBALS maps {sorted(names)}, this file checks "
                                   f"{sorted(GLOBALS)}; update GLOBALS here")
    assert conv.MODEL_STATES == MODEL_STATES and conv.OPTIM_STATES.pattern == OPTIM_STATES.pattern, (
        f"{CONVERTER}: MODEL_STATES / OPTIM_STATES changed; update them here so the file names are checked")


def test_engine_config_is_covered():
    ds()
    engine = _our_module(ENGINE)
    for stage, bf16 in ((0, False), (1, True), (2, True)):
        cfg = SimpleNamespace(
            trainer=SimpleNamespace(batch_size=4, grad_accum=2, grad_clip=1.0),
            deepspeed=SimpleNamespace(zero_stage=stage, reduce_bucket_size=2**20, allgather_bucket_size=2**20,
                                      overlap_comm=True, contiguous_gradients=True))
        ours = engine.engine_config(cfg, 1, bf16)
        assert ours == _config(stage, bf16), (
            f"{ENGINE}: engine_config() now builds {ours} (zero stage {stage}), this file checks "
            f"{_config(stage, bf16)}; "
            f"update _config / ENGINE_KEYS / ZERO_KEYS here so DeepSpeed's reading of every key is checked")
        assert set(ours) == set(ENGINE_KEYS) and set(ours["zero_optimization"]) <= set(ZERO_KEYS)
