"""Plain mappings become typed config dataclasses through OmegaConf, by the same rules Hydra applies to overrides.

One checker for both ways a config arrives: composed by Hydra from conf/ (the schemas in the ConfigStore type every
group, so a wrong type or an unknown key fails at composition) and read back from a file (a run's run.json, a
checkpoint's config). A wrong type or an unknown key is a ValueError that names the dotted key; the dataclasses'
own `__post_init__` checks (ranges, choices, combinations) run when the objects are built.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")


def from_mapping(cls: type[T], d: Any, where: str = "") -> T:
    """d as an instance of the dataclass cls (nested dataclasses included), typed as Hydra types a config.
    where: the dotted prefix of d's keys in the user's config ("trainer"), for the error messages."""
    prefix = f"{where}." if where else ""
    if not isinstance(d, dict):
        raise ValueError(f"{where or 'the config'} must be a mapping of keys to values, got {type(d).__name__}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), d))
    except OmegaConfBaseException as e:
        raise ValueError(describe(e, prefix)) from None


def describe(e: OmegaConfBaseException, prefix: str = "") -> str:
    """An OmegaConf (or Hydra) typing error in one line that names the dotted key and what would be accepted."""
    key = f"{prefix}{e.full_key}" if e.full_key else prefix.rstrip(".") or "the config"
    if dataclasses.is_dataclass(e.object_type):
        if isinstance(e, ConfigKeyError):
            known = sorted(f.name for f in dataclasses.fields(e.object_type))
            return f"unknown field {key}; the known fields there are {known}"
        wanted = _type_name(typing.get_type_hints(e.object_type).get(str(e.key)))
        if wanted is not None:
            return f"{key}={e.value!r} must be {wanted}"
    return f"{key}: {str(e.msg).splitlines()[0]}"


def _type_name(hint: Any) -> str | None:
    """int, 'int or null' for Optional[int]; None for the types whose OmegaConf message is clearer (containers)."""
    args = typing.get_args(hint)
    base = next((a for a in args if a is not type(None)), None) if args else hint
    if base not in (bool, int, float, str):
        return None
    return base.__name__ + (" or null" if type(None) in args else "")
