"""DeepSpeed kept honest: trainer=deepspeed and its checkpoint converter lean on DeepSpeed's private and undocumented
APIs (underscore functions of deepspeed.utils.groups, ZeRO optimizer internals, how the engine recognises MoE layers,
the checkpoint files' names, keys and pickled classes). DeepSpeed is pinned exactly in pyproject.toml; this file fails
(never skips) when DeepSpeed is missing, is not the pinned version, or any of those APIs changed, and every failure
names the API and what in our code depends on it. No process group, no engine: signatures, source and small
stand-ins only. Raising the pin: see the comment at the deepspeed extra in pyproject.toml."""
from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import importlib.metadata
import inspect
import re
import textwrap
from pathlib import Path

import pytest
from torch import nn

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = REPO / "pyproject.toml"


def _ours(*candidates: str) -> str:
    """The repo-relative file of ours that uses the API (the first candidate that exists), for failure messages."""
    return next((c for c in candidates if (REPO / c).is_file()), candidates[-1])


ENGINE = _ours("experiments/engines/deepspeed.py", "experiments/deepspeed_engine.py")
CONVERTER = _ours("experiments/engines/convert_deepspeed.py", "experiments/convert_deepspeed.py")
PARALLEL = "moe/parallel.py"
OUR = "DeepSpeedEngine"  # our engine class in ENGINE (DeepSpeed's own is deepspeed.runtime.engine.DeepSpeedEngine)

try:
    import deepspeed
    _IMPORT_ERROR = None
except Exception as e:  # ImportError, or a broken install: a failure either way, never a skip
    deepspeed, _IMPORT_ERROR = None, e


def _fail(msg: str):
    pytest.fail(textwrap.fill(msg, 119, break_long_words=False, break_on_hyphens=False), pytrace=False)


def ds():
    if deepspeed is None:
        _fail(f"DeepSpeed cannot be imported ({_IMPORT_ERROR!r}). trainer=deepspeed ({ENGINE}) and these checks need "
              f"it: pip install -e '.[dev]' (or '.[deepspeed]') installs the pinned version.")
    return deepspeed


def resolve(target: str, user: str):
    """'package.module:Qual.name' -> the object, or a failure naming the API and its user."""
    ds()
    module_name, _, qualname = target.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        _fail(f"DeepSpeed private API changed: module {module_name} is gone ({e}). Used by {user}.")
    for i, part in enumerate(qualname.split(".") if qualname else []):
        if not hasattr(obj, part):
            _fail(f"DeepSpeed private API changed: {module_name}:{'.'.join(qualname.split('.')[:i + 1])} no longer "
                  f"exists. Used by {user}.")
        obj = getattr(obj, part)
    return obj


def unwrap(fn, name: str):
    """The function itself under DeepSpeed's decorators: functools.wraps ones (__wrapped__) and instrument_w_nvtx,
    whose wrapped_fn(*args, **kwargs) keeps the function in its closure."""
    fn = inspect.unwrap(fn)
    while getattr(fn, "__name__", name) != name and getattr(fn, "__closure__", None):
        inner = [c.cell_contents for c in fn.__closure__ if inspect.isfunction(c.cell_contents)]
        if not inner:
            break
        fn = inspect.unwrap(inner[0])
    return fn


def source_of(target: str, user: str) -> str:
    return textwrap.dedent(inspect.getsource(unwrap(resolve(target, user), target.rpartition(".")[2].split(":")[-1])))


# ------------------------------------------------------------------------------------------------- the pin

def _extras() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]


def _pin() -> str:
    extras = _extras()
    reqs = extras.get("deepspeed", [])
    pins = [m.group(1) for r in reqs if (m := re.fullmatch(r"deepspeed\s*==\s*([0-9][0-9A-Za-z.+-]*)", r.strip()))]
    if len(reqs) != 1 or len(pins) != 1:
        _fail(f"pyproject.toml's deepspeed extra is {reqs}; it must be exactly ['deepspeed==X.Y.Z'], the version "
              f"{ENGINE} and {CONVERTER} are tested with (they use DeepSpeed's private APIs).")
    return pins[0]


def test_deepspeed_is_pinned_exactly():
    _pin()


def test_dev_extra_installs_deepspeed():
    """The default CI run installs .[dev]; without DeepSpeed there these checks could not run."""
    dev = _extras()["dev"]
    own = [r for r in dev if r.replace(" ", "").startswith("switchyard-moe[")]
    extras = {e.strip() for r in own for e in r[r.index("[") + 1:r.index("]")].split(",")}
    assert "deepspeed" in extras or any(r.startswith("deepspeed") for r in dev), (
        f"pyproject.toml's dev extra {dev} no longer installs the deepspeed extra: CI would not have DeepSpeed and "
        f"this file would fail; keep 'switchyard-moe[deepspeed,...]' in dev")


def test_installed_deepspeed_is_the_pinned_version():
    pin = _pin()
    ds()
    installed = importlib.metadata.version("deepspeed")
    assert installed == pin, (
        f"DeepSpeed {installed} is installed, but pyproject.toml pins deepspeed=={pin}, the version whose private APIs "
        f"{ENGINE} and {CONVERTER} are checked against. Install the pin (pip install -e '.[dev]'), or, to move to "
        f"{installed}, change the pin and fix what this file then reports")


# --------------------------------------------------------------------------- callables and their signatures

ANY = object()  # a stand-in argument: binding checks names and counts, not types


@dataclasses.dataclass(frozen=True)
class Call:
    id: str
    target: str  # module:qualname
    args: tuple
    kwargs: dict
    user: str
    method: bool = False  # an unbound method: bound with a stand-in self


GROUPS = "deepspeed.utils.groups"
ENGINE_CLS = "deepspeed.runtime.engine:DeepSpeedEngine"
ZERO_CLS = "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer"
BF16_CLS = "deepspeed.runtime.bf16_optimizer:BF16_Optimizer"
MOE_CLS = "deepspeed.moe.layer:MoE"

CALLS = [
    Call("groups._create_expert_and_data_parallel", f"{GROUPS}:_create_expert_and_data_parallel", (2,), {},
         f"{ENGINE}: expert_groups() creates DeepSpeed's expert and expert-data-parallel groups with it"),
    Call("groups._get_expert_parallel_group_dict", f"{GROUPS}:_get_expert_parallel_group_dict", (), {},
         f"{ENGINE}: expert_groups() checks whether the groups exist"),
    Call("groups._get_expert_parallel_group_ranks", f"{GROUPS}:_get_expert_parallel_group_ranks", ("ep_size_2",), {},
         f"{ENGINE}: expert_groups() checks DeepSpeed's layout against moe.parallel's"),
    Call("groups._get_expert_data_parallel_group_ranks", f"{GROUPS}:_get_expert_data_parallel_group_ranks",
         ("ep_size_2",), {}, f"{ENGINE}: expert_groups() checks DeepSpeed's layout against moe.parallel's"),
    Call("groups._get_expert_parallel_group", f"{GROUPS}:_get_expert_parallel_group", ("ep_size_2",), {},
         f"{ENGINE}: expert_groups() hands it to our layers as ParallelGroups.ep_group (all-to-all)"),
    Call("groups._get_expert_data_parallel_group", f"{GROUPS}:_get_expert_data_parallel_group", ("ep_size_2",), {},
         f"{ENGINE}: expert_groups() hands it to our layers as ParallelGroups.expert_dp_group"),
    Call("moe.utils.split_params_into_different_moe_groups_for_optimizer",
         "deepspeed.moe.utils:split_params_into_different_moe_groups_for_optimizer", ([],), {},
         f"{ENGINE}: moe_param_groups() splits the client optimizer's groups with it"),
    Call("utils.safe_get_full_fp32_param", "deepspeed.utils:safe_get_full_fp32_param", (ANY,), {},
         f"{ENGINE}: {OUR}._fp32_weights() (bf16: the fp32 masters in our checkpoints, save_engine_checkpoint)"),
    Call("utils.safe_set_full_fp32_param", "deepspeed.utils:safe_set_full_fp32_param", (ANY, ANY), {},
         f"{ENGINE}: {OUR}._set_masters() (bf16: fp32 masters from the fp32 weights, in wrap() and load_state())"),
    Call("utils.safe_get_full_optimizer_state", "deepspeed.utils:safe_get_full_optimizer_state", (ANY, "exp_avg"), {},
         f"{ENGINE}: {OUR}._optimizer_state() (state_to_save: ZeRO partitions gathered into our checkpoint layout)"),
    Call("utils.safe_set_full_optimizer_state", "deepspeed.utils:safe_set_full_optimizer_state",
         (ANY, ANY, "exp_avg"), {}, f"{ENGINE}: {OUR}._load_partitioned_state() (load_state: resume under ZeRO 1/2)"),
    Call("initialize", "deepspeed:initialize", (),
         dict(model=ANY, optimizer=ANY, config={}, dist_init_required=False),
         f"{ENGINE}: {OUR}.wrap() builds the engine"),
    Call("init_distributed", "deepspeed:init_distributed", (), dict(dist_backend="gloo", timeout=ANY),
         f"{ENGINE}: {OUR}.launch()"),
    Call("DeepSpeedEngine.backward(scale_wrt_gas=)", f"{ENGINE_CLS}.backward", (ANY,), dict(scale_wrt_gas=False),
         f"{ENGINE}: {OUR}.train_micro() (the loss is already scaled by 1 / trainer.grad_accum)", method=True),
    Call("DeepSpeedEngine.step", f"{ENGINE_CLS}.step", (), {}, f"{ENGINE}: {OUR}.step()", method=True),
    Call("DeepSpeedEngine.get_global_grad_norm", f"{ENGINE_CLS}.get_global_grad_norm", (), {},
         f"{ENGINE}: {OUR}.step() reports the norm (ZeRO 1/2)", method=True),
    Call("DeepSpeedEngine.destroy", f"{ENGINE_CLS}.destroy", (), {},
         f"{ENGINE}: {OUR}.close() releases the engine's hooks and buffers", method=True),
    Call("DeepSpeedEngine.save_checkpoint", f"{ENGINE_CLS}.save_checkpoint", ("dir",),
         dict(tag="step_1", client_state={}), f"{ENGINE}: save_engine_checkpoint()", method=True),
    Call("DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state",
         f"{ZERO_CLS}._lazy_init_hp_params_optimizer_state", (), {},
         f"{ENGINE}: {OUR}._init_partitioned_state() links every group's AdamW state before any step",
         method=True),
    Call("BF16_Optimizer._lazy_init_hp_params_optimizer_state", f"{BF16_CLS}._lazy_init_hp_params_optimizer_state",
         (), {}, f"{ENGINE}: {OUR}._init_partitioned_state() (should DeepSpeed pick BF16_Optimizer)",
         method=True),
    Call("MoE.set_deepspeed_parallelism", f"{MOE_CLS}.set_deepspeed_parallelism", (False,), {},
         f"{ENGINE}: _moe_announcer()'s ExpertsAnnouncement overrides it as a no-op (the groups exist already)",
         method=True),
    Call("moe.utils.is_moe_param", "deepspeed.moe.utils:is_moe_param", (ANY,), {},
         f"{PARALLEL}: experts are tagged allreduce=False / group_name for DeepSpeed's reduction and MoE groups"),
]


@pytest.mark.parametrize("call", CALLS, ids=[c.id for c in CALLS])
def test_callable_accepts_our_arguments(call: Call):
    fn = resolve(call.target, call.user)
    assert callable(fn), f"DeepSpeed private API changed: {call.target} is no longer callable. Used by {call.user}."
    fn = unwrap(fn, call.target.rpartition(".")[2].split(":")[-1])
    kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
    assert kinds != {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}, (
        f"{call.target} is now behind a decorator this check cannot see through ({fn!r}, signature (*args, **kwargs))"
        f": extend unwrap() here so its arguments are checked. Used by {call.user}.")
    args = (ANY, *call.args) if call.method else call.args
    try:
        inspect.signature(fn).bind(*args, **call.kwargs)
    except TypeError as e:
        _fail(f"DeepSpeed private API changed: {call.target}{inspect.signature(fn)} no longer accepts the arguments we "
              f"pass ({', '.join([*map(repr, call.args), *(f'{k}=...' for k in call.kwargs)])}): {e}. Used by "
              f"{call.user}.")


def _tiny_moe():
    from moe.config import ModelConfig, MoEConfig
    from moe.model import Transformer

    return Transformer(ModelConfig(vocab_size=32, n_layer=1, d_model=16, n_head=2, d_ff=32, max_seq_len=16,
                                   moe=MoEConfig(layers="all", num_experts=4)))


def test_split_params_into_moe_groups():
    """What moe_param_groups() relies on: expert parameters (tagged allreduce=False, group_name by moe/ as DeepSpeed's
    own experts are) move to groups marked moe=True named by their group_name, keeping the group's
    hyper-parameters; the rest stay."""
    user = f"{ENGINE}: moe_param_groups() (and {PARALLEL}'s allreduce / group_name tags)"
    split = resolve("deepspeed.moe.utils:split_params_into_different_moe_groups_for_optimizer", user)
    is_moe_param = resolve("deepspeed.moe.utils:is_moe_param", user)
    model = _tiny_moe()
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    assert experts and all(is_moe_param(p) for p in experts), (
        f"DeepSpeed private API changed: deepspeed.moe.utils.is_moe_param no longer recognises parameters tagged "
        f"allreduce=False. Used by {user}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = split([{"params": decay, "weight_decay": 0.1, "lr": 1e-3, "name": "group0"},
                    {"params": no_decay, "weight_decay": 0.0, "lr": 1e-3, "name": "group1"}])
    moe_groups = [g for g in groups if g.get("moe")]
    got = {id(p) for g in moe_groups for p in g["params"]}
    layout = [(g.get("name"), g.get("moe", False), len(g["params"])) for g in groups]
    assert got == {id(p) for p in experts} and all(g["name"] == "ep_size_1" for g in moe_groups), (
        f"DeepSpeed private API changed: split_params_into_different_moe_groups_for_optimizer no longer puts exactly "
        f"the expert parameters in groups marked moe=True named by their group_name (got (name, moe, size): "
        f"{layout}). Used by {user}")
    assert all(g["weight_decay"] == 0.1 and g["lr"] == 1e-3 for g in moe_groups) and moe_groups, (
        f"DeepSpeed private API changed: split_params_into_different_moe_groups_for_optimizer no longer keeps the "
        f"group's hyper-parameters (weight decay on the expert matrices). Used by {user}")
    dense = {id(p) for g in groups if not g.get("moe") for p in g["params"]}
    assert dense == {id(p) for p in model.parameters()} - got, (
        f"DeepSpeed private API changed: split_params_into_different_moe_groups_for_optimizer lost or duplicated "
        f"dense parameters. Used by {user}")


# ------------------------------------------------------------------ MoE: the announcement that skips MoE.__init__

# What ExpertsAnnouncement (ENGINE: _moe_announcer) sets instead of calling MoE.__init__.
ANNOUNCED = ("num_experts", "ep_size", "num_local_experts", "expert_group_name", "use_residual",
             "enable_expert_tensor_parallelism")
# What DeepSpeed reads from MoE modules today (where: runtime/engine.py's has_moe_layers detection and MoE checkpoint
# files, deepspeed/moe/utils.py has_moe_layers, the flops profiler).
READ_BY_DEEPSPEED = ("num_experts", "expert_group_name", "num_local_experts", "enable_expert_tensor_parallelism")
ANNOUNCER_USER = (f"{ENGINE}: _moe_announcer()'s ExpertsAnnouncement, a MoE subclass that skips MoE.__init__ and sets "
                  f"{', '.join(ANNOUNCED)} itself")


@functools.cache
def _moe_init_attributes() -> frozenset:
    """The plain attributes a real MoE.__init__ sets (no process group needed at construction)."""
    MoE = resolve(MOE_CLS, ANNOUNCER_USER)
    layer = MoE(hidden_size=8, expert=nn.Linear(8, 8), num_experts=4, ep_size=2)
    return frozenset(set(vars(layer)) - set(vars(nn.Module())))


@pytest.mark.parametrize("attr", ANNOUNCED)
def test_moe_init_still_sets(attr):
    assert attr in _moe_init_attributes(), (
        f"DeepSpeed private API changed: deepspeed.moe.layer.MoE.__init__ no longer sets `{attr}` (it sets "
        f"{sorted(_moe_init_attributes())}). Used by {ANNOUNCER_USER}; find what replaced it in MoE.__init__ and the "
        f"engine and set that instead")


def test_moe_init_sets_nothing_else():
    new = _moe_init_attributes() - set(ANNOUNCED)
    assert not new, (
        f"DeepSpeed private API changed: deepspeed.moe.layer.MoE.__init__ now also sets {sorted(new)}, which "
        f"{ANNOUNCER_USER} does not. If DeepSpeed's engine reads them from MoE modules, set them there too; then add "
        f"them to ANNOUNCED here")


def _moe_attribute_reads() -> dict[str, set[str]]:
    """Every `X.attr` DeepSpeed reads inside `if isinstance(X, MoE)` (and `... and ...` tests of it), over DeepSpeed's
    whole source: {attr: {files}}. nn.Module's own attributes are left out."""
    root = Path(ds().__file__).parent
    reads: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8", errors="replace")
        if "MoE)" not in text:
            continue
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.If):
                continue
            tests = node.test.values if isinstance(node.test, ast.BoolOp) else [node.test]
            for t in tests:
                if (isinstance(t, ast.Call) and isinstance(t.func, ast.Name) and t.func.id == "isinstance"
                        and len(t.args) == 2 and isinstance(t.args[1], ast.Name) and t.args[1].id == "MoE"):
                    subject = ast.dump(t.args[0])
                    for sub in ast.walk(ast.Module(body=[*node.body, *tests], type_ignores=[])):
                        if isinstance(sub, ast.Attribute) and ast.dump(sub.value) == subject \
                                and not hasattr(nn.Module, sub.attr):
                            reads.setdefault(sub.attr, set()).add(str(path.relative_to(root.parent)))
                    for sub in ast.walk(ast.Module(body=node.body, type_ignores=[])):  # hasattr(X, "attr") too
                        if (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id == "hasattr"
                                and len(sub.args) == 2 and ast.dump(sub.args[0]) == subject
                                and isinstance(sub.args[1], ast.Constant)):
                            reads.setdefault(sub.args[1].value, set()).add(str(path.relative_to(root.parent)))
    return reads


def test_deepspeed_reads_only_announced_attributes_from_moe_modules():
    reads = _moe_attribute_reads()
    unknown = {a: sorted(f) for a, f in reads.items() if a not in ANNOUNCED}
    assert not unknown, (
        f"DeepSpeed private API changed: DeepSpeed now reads {unknown} from MoE modules (inside `isinstance(..., "
        f"MoE)`), which {ANNOUNCER_USER} does not set: the engine would fail or misbehave on our announcement. Set "
        f"them in ExpertsAnnouncement, then add them to ANNOUNCED / READ_BY_DEEPSPEED here")


@pytest.mark.parametrize("attr", READ_BY_DEEPSPEED)
def test_deepspeed_still_reads_from_moe_modules(attr):
    reads = _moe_attribute_reads()
    assert attr in reads, (
        f"DeepSpeed private API changed: nothing in DeepSpeed reads `{attr}` from MoE modules any more (it reads "
        f"{sorted(reads)}); how the engine learns about experts may have changed. Check {ANNOUNCER_USER}: the engine "
        f"must still set has_moe_layers, register the expert groups and build ZeRO's MoE partitions from it")


# -------------------------------------------------------------------------------- source contracts

@dataclasses.dataclass(frozen=True)
class Source:
    id: str
    target: str
    needles: tuple  # substrings the source must still hold
    user: str
    why: str


SOURCES = [
    Source("engine.detects_moe_layers", f"{ENGINE_CLS}._configure_distributed_model",
           ("isinstance(module, MoE)", "self.has_moe_layers = True", "self.num_experts.append(module.num_experts)"),
           f"{ENGINE}: _moe_announcer() / EngineModule (the announcement is how the engine learns of our experts)",
           "engine.has_moe_layers must come from an instance of deepspeed.moe.layer.MoE in the module"),
    Source("engine.calls_set_deepspeed_parallelism", f"{ENGINE_CLS}._configure_distributed_model",
           ("module.set_deepspeed_parallelism(self._config.use_data_before_expert_parallel_)",),
           f"{ENGINE}: _moe_announcer()'s set_deepspeed_parallelism override (a no-op, one argument)",
           "the engine calls set_deepspeed_parallelism(use_data_before_expert_parallel_) on every module having it"),
    Source("engine.takes_expert_groups", f"{ENGINE_CLS}._configure_distributed_model",
           ("self.expert_parallel_group = groups._get_expert_parallel_group_dict()",
            "self.expert_data_parallel_group = groups._get_expert_data_parallel_group_dict()"),
           f"{ENGINE}: expert_groups() creates the groups before deepspeed.initialize",
           "the engine picks up the expert groups already created in deepspeed.utils.groups"),
    Source("groups.group_name", f"{GROUPS}:_create_expert_and_data_parallel",
           ('group_name = f"ep_size_{expert_parallel_size_}"',),
           f"{ENGINE}: expert_groups() and _moe_announcer() (name f'ep_size_{{ep}}'), {PARALLEL} (params' group_name)",
           "the expert groups are named ep_size_<ep>"),
    Source("engine.zero_1_2_is_DeepSpeedZeroOptimizer", f"{ENGINE_CLS}._configure_zero_optimizer",
           ("DeepSpeedZeroOptimizer if not self.zenflow",),
           f"{ENGINE}: {OUR}._init_partitioned_state() / _load_partitioned_state()",
           "ZeRO 1/2 wraps the client optimizer in DeepSpeedZeroOptimizer"),
    Source("engine.backward_scale_wrt_gas", f"{ENGINE_CLS}.backward",
           ("if scale_wrt_gas",), f"{ENGINE}: {OUR}.train_micro() passes scale_wrt_gas=False",
           "scale_wrt_gas=False leaves the loss undivided"),
    Source("engine.checkpoint_state_keys", f"{ENGINE_CLS}._common_checkpoint_state",
           ("module=module_state_dict", "param_shapes=", "shared_params=", "global_steps="),
           f"{CONVERTER}: convert() and _fp32_from_zero() read `module`, `param_shapes`, `shared_params`, "
           f"`global_steps` from mp_rank_00_model_states.pt", "the model states file keeps these keys"),
    Source("engine.checkpoint_client_state_dense", f"{ENGINE_CLS}._save_checkpoint", ("state.update(client_state)",),
           f"{CONVERTER}: _model_config() reads the client state 'switchyard' at the top level (dense models)",
           "client_state is merged into the top level of the model states file"),
    Source("engine.checkpoint_client_state_moe", f"{ENGINE_CLS}._save_moe_checkpoint", ("state.update(client_state)",),
           f"{CONVERTER}: _model_config() reads the client state 'switchyard' at the top level (MoE models)",
           "client_state is merged into the top level of the model states file"),
    Source("engine.checkpoint_latest_file", f"{ENGINE_CLS}.save_checkpoint", ("os.path.join(save_dir, 'latest')",),
           f"{CONVERTER}: resolve_tag_dir() reads the tag from DS_CHECKPOINT/latest",
           "save_checkpoint writes `latest`"),
    Source("engine.zero_checkpoint_keys", f"{ENGINE_CLS}._save_zero_checkpoint",
           ("optimizer_state_dict=self.optimizer.state_dict()",),
           f"{CONVERTER}: _fp32_from_zero() reads `optimizer_state_dict` from *zero_pp_rank_*_optim_states.pt",
           "the ZeRO file holds the optimizer's state_dict under optimizer_state_dict"),
    Source("zero.partition_alignment", f"{ZERO_CLS}.__init__",
           ("self.nccl_start_alignment_factor = 2",
            "alignment = self.nccl_start_alignment_factor * dist.get_world_size(group=self.real_dp_process_group[i])"),
           f"{CONVERTER}: _fp32_from_zero() checks each group's padding against a multiple of 2 x world size",
           "ZeRO pads each flat group to a multiple of 2 x the data-parallel world size"),
]


@pytest.mark.parametrize("src", SOURCES, ids=[s.id for s in SOURCES])
def test_source_contract(src: Source):
    text = source_of(src.target, src.user)
    missing = [n for n in src.needles if n not in text]
    assert not missing, (
        f"DeepSpeed private API changed: {src.target} no longer contains {missing} ({src.why}). Used by {src.user}; "
        f"read the new {src.target} and adapt our code, then this check")


ZERO_STATE_KEYS = {"LOSS_SCALER", "'dynamic_loss_scale'", "'overflow'", "CLIP_GRAD", "BASE_OPTIMIZER_STATE",
                   "BASE_OPTIMIZER_STATE_STEP", "SINGLE_PARTITION_OF_FP32_GROUPS", "ZERO_STAGE", "GROUP_PADDINGS",
                   "PARAM_ALIGNMENT_PADDINGS", "PARTITION_COUNT", "DS_VERSION", "PARAM_SLICE_MAPPINGS",
                   "UNIVERSAL_CHECKPOINT_INFO"}


def test_zero_state_dict_keys_unchanged():
    """A new key in ZeRO's state_dict may pickle a new class, which the converter would then refuse."""
    user = f"{CONVERTER}: DEEPSPEED_GLOBALS (the classes its ZeRO files may pickle) and _fp32_from_zero()"
    text = source_of(f"{ZERO_CLS}.state_dict", user)
    keys = set(re.findall(r"state_dict\[\s*([\w']+)\s*\]\s*=", text))
    assert keys == ZERO_STATE_KEYS, (
        f"DeepSpeed private API changed: DeepSpeedZeroOptimizer.state_dict now writes keys "
        f"{sorted(keys - ZERO_STATE_KEYS)} and no longer {sorted(ZERO_STATE_KEYS - keys)}. Used by {user}: check what "
        f"the new values pickle (torch.serialization.get_unsafe_globals_in_checkpoint on a real ZeRO file), then "
        f"update ZERO_STATE_KEYS")


CHECKPOINT_CONSTANTS = {"OPTIMIZER_STATE_DICT": "optimizer_state_dict", "PARAM_SHAPES": "param_shapes",
                        "SINGLE_PARTITION_OF_FP32_GROUPS": "single_partition_of_fp32_groups",
                        "PARTITION_COUNT": "partition_count", "ZERO_STAGE": "zero_stage",
                        "PARAM_ALIGNMENT_PADDINGS": "param_alignment_paddings"}


@pytest.mark.parametrize("name", CHECKPOINT_CONSTANTS)
def test_checkpoint_key_names(name):
    user = f"{CONVERTER}: _fp32_from_zero() reads {CHECKPOINT_CONSTANTS[name]!r} from DeepSpeed's checkpoint files"
    value = resolve(f"deepspeed.checkpoint.constants:{name}", user)
    assert value == CHECKPOINT_CONSTANTS[name], (
        f"DeepSpeed private API changed: deepspeed.checkpoint.constants.{name} is {value!r}, not "
        f"{CHECKPOINT_CONSTANTS[name]!r}. Used by {user}")


# ------------------------------------------------- our code still uses what this file checks (the tables here)

def _our_module(rel: str):
    return importlib.import_module(rel.removesuffix(".py").replace("/", "."))


def test_announcement_sets_the_announced_attributes():
    ds()
    announcement = _our_module(ENGINE)._moe_announcer(4, 2)
    assert set(vars(announcement)) - set(vars(nn.Module())) == set(ANNOUNCED), (
        f"{ANNOUNCER_USER}: it now sets {sorted(set(vars(announcement)) - set(vars(nn.Module())))}; update ANNOUNCED")
    assert isinstance(announcement, resolve(MOE_CLS, ANNOUNCER_USER))
