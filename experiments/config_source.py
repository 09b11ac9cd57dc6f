"""Switchyard's Hydra config source: the train config's typed schema and the model presets, built when loaded.

Held in Hydra's ConfigStore, the 27 presets (moe.presets) were deep-copied whole each time Hydra set up a config
repository, about a hundred times for one `--help` (17 of its 20 s in a profile). A config source holds nothing:
listing the `model` group reads the preset names, and loading `model=NAME` converts that one preset; the schema
(experiments.config.TrainConfig, `train_schema` in conf/train.yaml's defaults) is converted when a config that
names it is composed. SwitchyardSearchPath puts the source on Hydra's search path everywhere, also where no
primary config is loaded yet (the group listings of `--help` and tab completion). A user's YAML presets in
conf/model/ are listed beside ours.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

MODEL_GROUP = "model"
SCHEMA = "train_schema"


def _presets():
    from moe.presets import PRESETS  # plain dataclasses, no torch: cheap, and only when the group is used
    return PRESETS


class SwitchyardSource(ConfigSource):
    @staticmethod
    def scheme() -> str:
        return "switchyard"

    @staticmethod
    def _key(config_path: str) -> tuple[str, str]:
        group, _, name = config_path.strip("/").removesuffix(".yaml").rpartition("/")
        return group, name

    def load_config(self, config_path: str) -> ConfigResult:
        group, name = self._key(config_path)
        if (group, name) == ("", SCHEMA):
            from experiments.config import TrainConfig
            node = OmegaConf.structured(TrainConfig)
        elif group == MODEL_GROUP and name in _presets():
            node = OmegaConf.create(dataclasses.asdict(_presets()[name]))  # typed by the schema when composed
        else:
            raise ConfigLoadError(f"no config {config_path!r} here; the model presets are {sorted(_presets())}")
        return ConfigResult(config=node, path=self.full_path(), provider=self.provider, header={"package": None})

    def available(self) -> bool:
        return True

    def is_group(self, config_path: str) -> bool:
        return config_path.strip("/") in ("", MODEL_GROUP)

    def is_config(self, config_path: str) -> bool:
        group, name = self._key(config_path)
        return (group, name) == ("", SCHEMA) or (group == MODEL_GROUP and name in _presets())

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        path = config_path.strip("/")
        out = []
        if path == "":
            out += [MODEL_GROUP] if results_filter in (None, ObjectType.GROUP) else []
            out += [SCHEMA] if results_filter in (None, ObjectType.CONFIG) else []
        elif path == MODEL_GROUP and results_filter in (None, ObjectType.CONFIG):
            out = sorted(_presets())
        return out


class SwitchyardSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="switchyard", path=f"{SwitchyardSource.scheme()}://experiments")
