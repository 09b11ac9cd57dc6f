"""Grouped matmul over contiguous per-expert row segments: y[seg_e] = x[seg_e] @ w[e].

Shape legend: N rows (sorted by expert), E experts, a input width, b output width.
Uses torch.nn.functional.grouped_mm where its layout rules hold, else a per-expert loop over `w.unbind(0)`
(indexing w[e] in a loop would make autograd allocate a full [E, a, b] gradient per expert).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward rejects
    the expanded (stride-0) gradients that reductions such as .sum() produce."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _grouped_mm_ok(x: Tensor, w: Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or x.dtype != w.dtype or not x.is_contiguous() or not w.is_contiguous():
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
    return (x.shape[1] * size) % 16 == 0 and (w.shape[2] * size) % 16 == 0 and (w.shape[1] * w.shape[2] * size) % 16 == 0


def grouped_matmul(x: Tensor, w: Tensor, counts: Tensor, use_grouped_mm: bool = True) -> Tensor:
    """x [N, a] rows sorted by expert, w [E, a, b], counts [E] rows per expert -> [N, b]."""
    if use_grouped_mm and _grouped_mm_ok(x, w):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        return _ContiguousGrad.apply(F.grouped_mm(x, w, offs=offs))
    outs = [xs @ we for xs, we in zip(x.split(counts.tolist()), w.unbind(0))]
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[2])
