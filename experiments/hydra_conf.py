"""Hydra registration: model presets become the `model` config group, typed by ModelConfig.

The presets live in moe.presets (one source of truth for the library, the FLOP tables and the CLI); storing
them as structured configs gives typed overrides such as `model.moe.num_experts=16` with errors for typos.
Users can still add YAML presets in conf/model/ (e.g. `defaults: [tiny_moe, _self_]` plus changes).
"""
from __future__ import annotations

from hydra.core.config_store import ConfigStore

from moe.presets import PRESETS

CONFIG_MODULE = "conf"  # the importable package holding the YAML config groups


def register_configs() -> None:
    cs = ConfigStore.instance()
    for name, cfg in PRESETS.items():
        cs.store(group="model", name=name, node=cfg)
