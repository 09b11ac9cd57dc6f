"""The names of a sweep's runs: `hydra.sweep.subdir: ${run_name:}` (conf/train.yaml) names each job's folder by
the overrides the sweep varies, in the order they were given: `-m routing=topk,switch` writes `routing=topk/` and
`routing=switch/`, `-m routing=topk,switch trainer.max_steps=6,12` writes `routing=topk,trainer.max_steps=6/` and
so on, whatever else is on the command line.

Which keys vary: those of the sweep overrides on the command line (read back from the multirun.yaml that Hydra's
sweeper writes into the sweep directory before it launches a job, so it holds on every launcher: basic, joblib,
submitit on a shared file system) and those of hydra.sweeper.params (an experiment's own sweep, Optuna's search
space). A path value is shortened to its last component when that tells the sweep's values apart, else its
slashes become underscores; a name longer than MAX_NAME bytes keeps its start and a hash of the whole. Without a
multirun.yaml or sweeper params the name falls back to Hydra's override_dirname (every override but
hydra.job.config.override_dirname.exclude_keys); with nothing swept, to the job's number.

The resolver is registered when this module is imported: conf/train.yaml's hydra.callbacks.run_names names this
module, so Hydra imports it in the launching process and wherever it unpickles its jobs' callbacks.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

RESOLVER = "run_name"  # ${run_name:} in a config
MULTIRUN_FILE = "multirun.yaml"  # what Hydra's sweeper saves into the sweep directory before the first job
MAX_NAME = 120  # bytes of a folder name (file systems allow 255; room for a suffix and for humans)


def _parse(lines: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([str(x) for x in lines])


def swept_values(sweep_dir: Path, sweeper_params: Optional[dict[str, Any]]) -> Optional[dict[str, Optional[list[str]]]]:
    """key -> the sweep's values of every swept key (None where they cannot be listed: an interval), from the
    sweep directory's multirun.yaml and the sweeper's params; None when neither is there."""
    lines: list[str] = []
    found = False
    path = sweep_dir / MULTIRUN_FILE
    if path.is_file():
        found = True
        lines += [str(x) for x in OmegaConf.load(path).hydra.overrides.task]
    if sweeper_params:
        found = True
        lines += [f"{k}={v}" for k, v in sweeper_params.items()]
    if not found:
        return None
    out: dict[str, Optional[list[str]]] = {}
    for o in _parse(lines):
        if o.is_sweep_override():
            try:
                out[o.key_or_group] = [str(v) for v in o.sweep_string_iterator()]
            except Exception:  # hydra.errors.HydraException: an interval or a tagged sweep cannot be enumerated
                out[o.key_or_group] = None
    return out


def _path_safe(key: str, value: str, values: Optional[list[str]]) -> str:
    """A value without slashes: a path's last component if it tells the sweep's values apart, else _ for /."""
    if "/" not in value and os.sep not in value:
        return value
    names = [Path(v).name for v in values or []]
    if values and len(set(names)) == len(names) and Path(value).name:
        return Path(value).name
    return value.replace(os.sep, "_").replace("/", "_").strip("_")


def name_from(job_overrides: list[str], swept: Optional[dict[str, Optional[list[str]]]], fallback: str,
              job_num: Any) -> str:
    """A job's folder name: its values of the swept keys (`routing=switch,trainer.max_steps=6`); `fallback` (the
    override_dirname) when the swept keys are unknown; the job number when nothing is swept."""
    if swept is None:
        name = fallback
    else:
        items = []
        for o in _parse(job_overrides):
            key = o.key_or_group
            if key in swept and not key.startswith("hydra."):
                value = o.input_line.split("=", 1)[1] if "=" in o.input_line else ""
                items.append(f"{key}={_path_safe(key, value, swept[key])}")
        name = ",".join(items)
    name = name.replace(os.sep, "_").replace("/", "_")
    if not name:
        return str(job_num)
    if len(name.encode()) > MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = name.encode()[:MAX_NAME - 9].decode(errors="ignore") + "-" + digest
    return name


def run_name() -> str:
    """The resolver: this job's name, from Hydra's runtime config of the job."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():  # printed outside a job (`--cfg hydra --resolve`): no job to name
        return "(per job: run_name)"
    hc = HydraConfig.get()
    params = OmegaConf.select(hc, "sweeper.params", default=None)
    swept = swept_values(Path(str(hc.sweep.dir)), OmegaConf.to_container(params) if params else None)
    return name_from([str(x) for x in hc.overrides.task], swept, str(OmegaConf.select(hc, "job.override_dirname",
                     default="")), OmegaConf.select(hc, "job.num", default=None))


if not OmegaConf.has_resolver(RESOLVER):
    OmegaConf.register_new_resolver(RESOLVER, run_name)


class RunNames(Callback):
    """hydra.callbacks.run_names: nothing to do at any event; being instantiated makes Hydra import this module,
    which registers ${run_name:} before a job's folder is resolved."""
