"""The dense feed-forward network: what a dense FFN slot holds, and what copy-upcycling copies into experts."""
from __future__ import annotations

from torch import Tensor, nn

from moe.activations import activation_fn


class DenseFFN(nn.Module):
    """down(act(up(x))) or, gated, down(act(gate(x)) * up(x)) (SwiGLU / GEGLU)."""

    def __init__(self, d_model: int, d_ff: int, activation: str, glu: bool, bias: bool):
        super().__init__()
        self.act = activation_fn(activation)
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.gate = nn.Linear(d_model, d_ff, bias=bias) if glu else None
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)
        h = self.act(self.gate(x)) * h if self.gate is not None else self.act(h)
        return self.down(h)
