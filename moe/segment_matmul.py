"""Grouped matmul over contiguous per-expert row segments: y[seg_e] = x[seg_e] @ w[e].

Shape legend: N rows (sorted by expert), E experts, a input width, b output width.

Two implementations, chosen by `impl`:
- "grouped_mm": torch.nn.functional.grouped_mm where its layout rules hold: one fused kernel on CUDA (bf16 on
  Hopper); on CPU a loop inside ATen, measured 2-4% faster than the loop below (docs/benchmarks.md).
- "loop": one matmul per expert, written straight into a preallocated output (forward, grad-input and
  grad-weight alike), so no split/cat/stack copies appear in forward or backward. It needs the split sizes on
  the host (a sync on CUDA, free on CPU), and takes every shape and dtype.
"auto" takes grouped_mm where it applies and the loop everywhere else.

Not taken, by measurement at the demo twins' small widths (docs/benchmarks.md, the bare training step): a padded
batched matmul over [E, C_max, a] (0.8-1.4x the loop's time: the padding to the busiest expert), and grouped_mm on
weights padded on the fly to an aligned width (0.93-1.1x the loop, copies included). Under torch.compile the loop
is one custom operator (see _loop), and CPU grouped_mm goes through one too (grouped_mm_cpu).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

IMPLS = ("auto", "grouped_mm", "loop")


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward rejects
    the expanded (stride-0) gradients that reductions such as .sum() produce."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _loop_forward(x: Tensor, w: Tensor, splits: list[int]) -> Tensor:
    out = x.new_empty(x.shape[0], w.shape[2])
    # split / unbind make every expert's views in one call each: at E = 256 the loop is 3 * 256 matmuls per
    # layer and direction, and a slice per operand per expert was a third of its Python time.
    # Inputs arrive in one dtype (Experts._weights casts); autocast must not re-cast them against `out`.
    with torch.autocast(device_type=x.device.type, enabled=False):
        for x_e, w_e, out_e in zip(x.split(splits), w.unbind(0), out.split(splits)):
            if x_e.shape[0]:
                torch.mm(x_e, w_e, out=out_e)
    return out


def _loop_backward(grad: Tensor, x: Tensor, w: Tensor, splits: list[int], need_x: bool, need_w: bool
                   ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    grad = grad.contiguous()
    grad_x = x.new_empty(x.shape) if need_x else None
    grad_w = w.new_empty(w.shape) if need_w else None
    grad_xs = grad_x.split(splits) if need_x else [None] * len(splits)
    grad_ws = grad_w.unbind(0) if need_w else [None] * len(splits)
    with torch.autocast(device_type=x.device.type, enabled=False):
        for x_e, g_e, w_e, gx_e, gw_e in zip(x.split(splits), grad.split(splits), w.unbind(0), grad_xs, grad_ws):
            if not x_e.shape[0]:
                if need_w:
                    gw_e.zero_()  # an expert without rows gets a zero gradient, never garbage
                continue
            if need_x:
                torch.mm(g_e, w_e.t(), out=gx_e)
            if need_w:
                torch.mm(x_e.t(), g_e, out=gw_e)
    return grad_x, grad_w


class _SegmentMatmul(torch.autograd.Function):
    """The per-expert loop as one autograd node: every matmul writes into its slice of one output buffer.

    Autograd through split / unbind / cat would copy the rows' gradient once more (cat) and stack E weight
    gradients into a fresh [E, a, b] tensor; here grad_x and grad_w are filled in place, expert by expert.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, splits: list[int]) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.splits = splits
        return _loop_forward(x, w, splits)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        return (*_loop_backward(grad, x, w, ctx.splits, *ctx.needs_input_grad[:2]), None)


def grouped_mm_cpu(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """torch._grouped_mm on CPU tensors, or while compiling the operator below (torch 2.13's fake-tensor rule for
    grouped_mm demands bf16 whatever the device, so dynamo cannot trace the fp32 CPU call itself)."""
    if torch.compiler.is_compiling():
        return torch.ops.switchyard.cpu_grouped_mm(a, b, offs)
    return torch._grouped_mm(a, b, offs=offs)


# needs_exact_strides: inductor hands the operator its inputs with the strides eager has (aligned padded views,
# transposes), which grouped_mm's 16-byte stride rule depends on (torch releases without that tag: the fixed order).
_EXACT_STRIDES = getattr(torch.Tag, "needs_exact_strides", torch.Tag.needs_fixed_stride_order)


@torch.library.custom_op("switchyard::cpu_grouped_mm", mutates_args=(), tags=(_EXACT_STRIDES,))
def _cpu_grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    return torch._grouped_mm(a, b, offs=offs)


@_cpu_grouped_mm.register_fake
def _(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    # [N, k] x [E, k, n] -> [N, n] (rows grouped by expert); [k, N] x [N, n] -> [E, k, n] (the weight gradient)
    return a.new_empty(a.shape[0], b.shape[2]) if b.dim() == 3 else a.new_empty(offs.shape[0], a.shape[0], b.shape[1])


class _CompiledGroupedMM(torch.autograd.Function):
    """grouped_mm with its two backward products, each through grouped_mm_cpu: the compiled CPU form of
    F.grouped_mm's own autograd, which dynamo cannot trace in fp32."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
        ctx.save_for_backward(x, w, offs)
        return grouped_mm_cpu(x, w, offs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w, offs = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grouped_mm_cpu(grad, w.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
        grad_w = grouped_mm_cpu(x.t(), grad, offs) if ctx.needs_input_grad[1] else None  # empty experts: zero
        return grad_x, grad_w, None


def _grouped_mm_ok(x: Tensor, w: Tensor) -> bool:
    # x may be a padded view (row stride above its width, as moe.grouped_glu's hidden rows are): only its strides
    # must follow the rule below.
    if not hasattr(F, "grouped_mm") or x.dtype != w.dtype or x.dim() != 2 or x.stride(1) != 1 or not w.is_contiguous():
        return False
    if x.shape[0] == 0:  # no rows (an expert-parallel rank none of whose experts got a token): backward rejects it
        return False
    if x.is_cuda:  # the CUDA kernel is bf16-only on Hopper; other dtypes take the loop
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    elif x.dtype not in (torch.float32, torch.bfloat16):
        return False
    # Every stride must be a multiple of 16 bytes.
    size = x.element_size()
    return (x.stride(0) * size) % 16 == 0 and (w.shape[2] * size) % 16 == 0 and (w.shape[1] * w.shape[2] * size) % 16 == 0


def grouped_matmul(x: Tensor, w: Tensor, counts: Tensor, impl: str = "auto") -> Tensor:
    """x [N, a] rows sorted by expert, w [E, a, b], counts [E] rows per expert -> [N, b]."""
    if impl not in IMPLS:
        raise ValueError(f"grouped matmul impl={impl!r} must be one of {IMPLS}")
    if impl != "loop" and _grouped_mm_ok(x, w):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        if not x.is_cuda and torch.compiler.is_compiling():
            return _CompiledGroupedMM.apply(x, w, offs)
        y = F.grouped_mm(x, w, offs=offs)
        # The identity only serves the backward; without autograd (generation) it is a Python call for nothing.
        return _ContiguousGrad.apply(y) if y.requires_grad else y
    return _loop(x, w, counts)


def _loop(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """The per-expert loop; under torch.compile (moe.compile) it is one opaque operator (switchyard::segment_mm):
    its split sizes are data (a host read of counts), which a traced loop would specialise on and recompile for
    every step, and a graph break around it would cut the block's graph in two at every projection."""
    if torch.compiler.is_compiling():
        return torch.ops.switchyard.segment_mm(x, w, counts)
    return segment_loop(x, w, counts)


def segment_loop(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """The per-expert loop as one autograd node: x [N, a], w [E, a, b], counts [E] -> [N, b]."""
    return _SegmentMatmul.apply(x, w, counts.tolist())


# The loop as a custom operator for compiled code: dynamo and inductor see only its output's shape ([N, b], the
# fake below), and autograd calls the backward operator, which runs the same loops as _SegmentMatmul. Eager keeps
# the autograd.Function, a few microseconds cheaper per call than the operator's dispatch.
@torch.library.custom_op("switchyard::segment_mm", mutates_args=())
def _segment_mm(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    return _loop_forward(x, w, counts.tolist())


@_segment_mm.register_fake
def _(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("switchyard::segment_mm_backward", mutates_args=())
def _segment_mm_backward(grad: Tensor, x: Tensor, w: Tensor, counts: Tensor, need_x: bool, need_w: bool
                         ) -> tuple[Tensor, Tensor]:
    grad_x, grad_w = _loop_backward(grad, x, w, counts.tolist(), need_x, need_w)
    # an operator returns tensors: an empty one stands for a gradient nobody asked for
    return (grad_x if need_x else x.new_empty(0)), (grad_w if need_w else w.new_empty(0))


@_segment_mm_backward.register_fake
def _(grad: Tensor, x: Tensor, w: Tensor, counts: Tensor, need_x: bool, need_w: bool) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape if need_x else (0,)), w.new_empty(w.shape if need_w else (0,))


def _setup_segment_mm(ctx, inputs, output) -> None:
    x, w, counts = inputs
    ctx.save_for_backward(x, w, counts)


def _backward_segment_mm(ctx, grad: Tensor):
    x, w, counts = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x, grad_w = torch.ops.switchyard.segment_mm_backward(grad, x, w, counts, need_x, need_w)
    return (grad_x if need_x else None), (grad_w if need_w else None), None


_segment_mm.register_autograd(_backward_segment_mm, setup_context=_setup_segment_mm)

