"""The gated experts' first half on rows in expert order, fused: h = act(x Wg) * (x Wu) [* s], as ONE grouped GEMM
of twice the width (CPU).

Shape legend: N rows sorted by expert, E experts, d model width, f expert hidden width, fp = f rounded up to a
16-byte multiple, s [N] the combine weight of each row (optional).

Why (measured, docs/benchmarks.md "The experts' path on CPU"): per-expert `torch.mm` calls from Python cost
about 4 us each, and a GLU layer makes 9 per expert per step (3 projections x forward, grad-input, grad-weight):
at E = 256 that is 2,304 calls on 64-row segments. torch._grouped_mm runs the same loop inside ATen, but only on
operands whose strides are 16-byte multiples, which the demo twins' widths (f = 191, 181, 37) are not. So:

    W12 [E, d, 2 fp] = [Wg | 0 | Wu | 0]   copied once per forward (the only weight copy; zero pad columns)
    a   [N, 2 fp]    = grouped_mm(x, W12)  gate = a[:, :f], up = a[:, fp:fp + f]: aligned views, one GEMM
    h   [N, f]       = act(gate) * up * s  written into an aligned [N, fp] buffer, so the down projection's
                                           grouped_mm takes it without a copy (moe.segment_matmul)
    backward         one [N, 2 fp] gradient buffer (pad columns zero): grad-input is ONE grouped_mm against
                     W12 (no sum of two [N, d] products), grad-weight ONE grouped_mm, split into Wg's and Wu's.

The activation's derivative is aten's own (silu_backward, gelu_backward, threshold_backward), so the result equals
autograd's through the unfused ops to fp32 round-off (tests/moe/test_fast_path.py).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from moe.segment_matmul import grouped_mm_cpu

# activation name -> (forward, aten's backward op, its keyword arguments): op(grad, pre-activation, **kw) is the
# gradient, op.grad_input(..., grad_input=out) writes it into `out`
_ACTS: dict[str, tuple[Callable[[Tensor], Tensor], Any, dict]] = {
    "silu": (F.silu, torch.ops.aten.silu_backward, {}),
    "gelu": (F.gelu, torch.ops.aten.gelu_backward, {}),
    "gelu_tanh": (lambda z: F.gelu(z, approximate="tanh"), torch.ops.aten.gelu_backward, {"approximate": "tanh"}),
    "relu": (F.relu, torch.ops.aten.threshold_backward, {"threshold": 0}),
}


# The fused path wins where the per-call overhead of the loop dominates, i.e. where an average expert's GEMM is small:
# (rows per expert) x f up to this many numbers per hidden segment. Measured (docs/benchmarks.md, d = 128, fp32, one
# thread, fused vs loop, forward + backward): 2,368 (E = 256, f = 37) 0.83x; 11,584 (E = 64, f = 181) 1.04x;
# 48,384 (E = 16) 0.97x; 97,792 (E = 8) 1.13x: above the cut the weight copy and the strided elementwise passes cost
# what the saved calls gain.
FUSED_MAX_SEGMENT = 4096


def prefer_fused_glu(rows: int, num_experts: int, hidden: int) -> bool:
    """Whether the fused path is the faster one for `rows` rows over `num_experts` experts of width `hidden` (CPU)."""
    return rows * hidden <= FUSED_MAX_SEGMENT * max(num_experts, 1)


def aligned_width(width: int, dtype: torch.dtype) -> int:
    """width rounded up so that a row of it is a multiple of 16 bytes (grouped_mm's stride rule)."""
    q = max(16 // torch.empty((), dtype=dtype).element_size(), 1)
    return -(-width // q) * q


def fused_glu_ok(x: Tensor, activation: str) -> bool:
    """Whether grouped_glu runs here: CPU fp32/bf16 rows (CUDA keeps grouped_matmul's bf16 kernel or the Triton
    dispatcher), rows present and 16-byte aligned, a known activation. The weights must arrive in x's dtype
    (Experts._weights casts)."""
    if not hasattr(torch, "_grouped_mm") or x.is_cuda:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16) or activation not in _ACTS:
        return False
    return x.dim() == 2 and x.shape[0] > 0 and x.is_contiguous() and (x.shape[1] * x.element_size()) % 16 == 0


class _GroupedGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w_gate: Tensor, w_up: Tensor, row_scale: Optional[Tensor], offs: Tensor,
                activation: str) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):  # one dtype already; keep it
            return _GroupedGLU._forward(ctx, x, w_gate, w_up, row_scale, offs, activation)

    @staticmethod
    def _forward(ctx, x: Tensor, w_gate: Tensor, w_up: Tensor, row_scale: Optional[Tensor], offs: Tensor,
                 activation: str) -> Tensor:
        E, d, f = w_gate.shape
        fp = aligned_width(f, x.dtype)
        w12 = x.new_empty(E, d, 2 * fp)  # [Wg | 0 | Wu | 0]: the zero columns keep both halves aligned
        w12[:, :, :f] = w_gate
        w12[:, :, fp:fp + f] = w_up
        if fp > f:  # only the pad columns are zeroed: one pass over the weights, not two
            w12[:, :, f:fp].zero_()
            w12[:, :, fp + f:].zero_()
        a = grouped_mm_cpu(x, w12, offs=offs)  # [N, 2 fp]; the pad columns are exact zeros
        # Every elementwise pass runs over the full aligned width fp, pads included (act(0) * 0 = 0): on a view of
        # an odd width f the vectorised loops stop at every row's tail, which measured 2x slower at f = 191.
        gate, up = a[:, :fp], a[:, fp:]
        act = _ACTS[activation][0](gate)  # [N, fp], kept for backward
        if row_scale is None:
            h = unscaled = act * up
        else:
            unscaled = act * up  # kept for the combine weight's gradient
            h = unscaled * row_scale.to(x.dtype)[:, None]
        ctx.save_for_backward(x, w12, a, act, unscaled, row_scale, offs)
        ctx.f, ctx.activation = f, activation
        return h[:, :f]  # [N, f], row stride fp: grouped_mm takes it as it is

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: Tensor):
        x, w12, a, act, unscaled, row_scale, offs = ctx.saved_tensors
        f, fp = ctx.f, w12.shape[2] // 2
        gate, up = a[:, :fp], a[:, fp:]
        # the one pass at width f: the incoming gradient into a full-width buffer with zero pads (its own pad
        # columns, if it has any, are not ours to read)
        g = x.new_empty(x.shape[0], fp)
        g[:, :f] = grad_h
        g[:, f:].zero_()
        grad_scale = None
        if row_scale is not None:
            if ctx.needs_input_grad[3]:
                grad_scale = (g * unscaled).sum(1).to(row_scale.dtype)
            g.mul_(row_scale.to(g.dtype)[:, None])
        _, act_backward, kw = _ACTS[ctx.activation]
        # grad_a [N, 2 fp] = [d/d gate | d/d up]; its pads come out zero (zero gradient times zero activations)
        if torch.compiler.is_compiling():  # dynamo refuses out= into views: a cat, which inductor may fuse with them
            grad_a = torch.cat([act_backward(g * up, gate, **kw), g * act], 1)
        else:
            grad_a = torch.empty_like(a)
            torch.mul(g, act, out=grad_a[:, fp:])
            act_backward.grad_input(g.mul_(up), gate, **kw, grad_input=grad_a[:, :fp])
        grad_x = grouped_mm_cpu(grad_a, w12.transpose(1, 2), offs=offs) if ctx.needs_input_grad[0] else None
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_w12 = grouped_mm_cpu(x.t(), grad_a, offs=offs)  # [E, d, 2 fp]; an empty expert's block is zero
            grad_gate = grad_w12[:, :, :f].contiguous()
            grad_up = grad_w12[:, :, fp:fp + f].contiguous()
        return grad_x, grad_gate, grad_up, grad_scale, None, None


def grouped_glu(x: Tensor, w_gate: Tensor, w_up: Tensor, counts: Tensor, activation: str,
                row_scale: Optional[Tensor] = None) -> Tensor:
    """x [N, d] rows sorted by expert, w_gate / w_up [E, d, f], counts [E] -> h [N, f] = act(x Wg) * (x Wu), each
    row times row_scale [N] when given; h is an aligned view (row stride fp) that grouped_mm takes as it is.
    Callers check fused_glu_ok first."""
    offs = torch.cumsum(counts, 0).to(torch.int32)
    return _GroupedGLU.apply(x, w_gate, w_up, row_scale, offs, activation)
