"""Switchyard's model library: configs, the shared Transformer backbone, experts and dispatchers.

The names below load on first use (PEP 562), so that `import moe.config` (a Hydra composition, `--help`, tab
completion) does not import torch through this package's other modules.
"""
import importlib

_WHERE = {"ModelConfig": "moe.config", "MoEConfig": "moe.config", "ModelOutput": "moe.model",
          "Transformer": "moe.model", "PRESETS": "moe.presets", "get_preset": "moe.presets"}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'moe' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
