"""Switchyard's model library: configs, the shared Transformer backbone, experts and dispatchers."""
from moe.config import ModelConfig, MoEConfig
from moe.model import ModelOutput, Transformer
from moe.presets import PRESETS, get_preset

__all__ = ["ModelConfig", "MoEConfig", "ModelOutput", "Transformer", "PRESETS", "get_preset"]
