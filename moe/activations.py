"""The FFN activations by config name (model.activation), shared by the dense FFN and the experts."""
from __future__ import annotations

import torch.nn.functional as F


def activation_fn(name: str):
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":  # GPT-2's "gelu_new"
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    if name == "silu":
        return F.silu
    raise ValueError(f"unknown activation {name!r}")
