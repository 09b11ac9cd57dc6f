"""The activations of the Triton expert MLP, in fp32 inside kernels: value and derivative.

Shared by the up projection's epilogue (moe.kernels.up_projection) and the grad-h epilogue that fuses the
activation backward (moe.kernels.down_combine). Names as in moe.experts: gelu (exact, torch's default), gelu_tanh,
relu, silu.
"""
from __future__ import annotations

import triton
import triton.language as tl

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


@triton.jit
def act(z, ACT: tl.constexpr):
    """Activation of fp32 z (tanh written through sigmoid: tl has no tanh of its own)."""
    if ACT == "gelu":  # exact GELU, torch's default
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        out = 0.5 * z * (2.0 * tl.sigmoid(2.0 * inner))  # 1 + tanh(u) = 2 sigmoid(2u)
    elif ACT == "relu":
        out = tl.maximum(z, 0.0)
    else:  # silu
        out = z * tl.sigmoid(z)
    return out


@triton.jit
def act_grad(z, ACT: tl.constexpr):
    """d act / dz of fp32 z."""
    if ACT == "gelu":  # Phi(z) + z phi(z)
        out = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == "gelu_tanh":
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        th = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        out = 0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACT == "relu":
        out = tl.where(z > 0.0, 1.0, 0.0)  # torch's relu has gradient 0 at 0
    else:  # silu
        s = tl.sigmoid(z)
        out = s * (1.0 + z * (1.0 - s))
    return out


@triton.jit
def mlp_value(u, g, GLU: tl.constexpr, ACT: tl.constexpr):
    """h from the fp32 pre-activations: GLU act(g) * u, else act(u) (g unused)."""
    if GLU:
        h = act(g, ACT) * u
    else:
        h = act(u, ACT)
    return h


@triton.jit
def mlp_backward(gh, u, g, GLU: tl.constexpr, ACT: tl.constexpr):
    """Gradients of the pre-activations from grad h, all fp32: GLU (gh act(g), gh u act'(g)); else
    (gh act'(u), same again: the second is unused)."""
    if GLU:
        gu = gh * act(g, ACT)
        gg = gh * u * act_grad(g, ACT)
    else:
        gu = gh * act_grad(u, ACT)
        gg = gu
    return gu, gg
