"""Hydra registration of Switchyard's config source (the train schema and the model presets), once per process.

`train_schema` (experiments.config.TrainConfig) is the first entry of conf/train.yaml's defaults list, so every
group (model, routing, data, optim, trainer, deepspeed, logger, experiment) is composed into a typed node: Hydra
itself rejects a wrong type or an unknown key, with the key's name, before the app runs. The presets live in
moe.presets (one source of truth for the library, the FLOP tables and the CLI) and become the `model` group
through the same source, which builds one preset when it is loaded (experiments/config_source.py). Users can still
add YAML presets in conf/model/ (e.g. `defaults: [tiny_moe, _self_]` plus changes).

The apps find conf/ by its path next to this package (CONFIG_DIR), not as an importable module `conf`: a user's
own `conf/` folder in the working directory comes first on sys.path and would shadow ours.
"""
from __future__ import annotations

from pathlib import Path

CONFIG_MODULE = "conf"  # the package holding the YAML config groups (for tests that compose by module)
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")  # the same folder, by path (for the apps)

_registered = False


def register_configs() -> None:
    """Registers the config source (idempotent: each app and test module may call it)."""
    global _registered
    if _registered:
        return
    # Hydra discovers plugins in the hydra_plugins namespace; these are registered by hand (Hydra's public
    # Plugins.register), so a source checkout works without installing a plugin package.
    from hydra.core.plugins import Plugins

    import experiments.run_names  # noqa: F401  registers ${run_name:}, which `--cfg hydra --resolve` resolves too
    from experiments.config_source import SwitchyardSearchPath, SwitchyardSource

    Plugins.instance().register(SwitchyardSource)
    Plugins.instance().register(SwitchyardSearchPath)
    _registered = True
