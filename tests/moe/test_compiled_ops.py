"""The expert GEMMs' custom operators for torch.compile (moe.segment_matmul: switchyard::segment_mm and its backward,
switchyard::cpu_grouped_mm for grouped_matmul and moe.grouped_glu): torch's own operator checks (schema, fake tensors against the real
kernel, autograd registration), and the operators' values and gradients equal the eager paths' bit for bit."""
import pytest
import torch

from moe.segment_matmul import grouped_mm_cpu, segment_loop

COUNTS = [3, 0, 5, 1]  # an empty expert among them
N, A, B = sum(COUNTS), 8, 12  # rows, input and output widths (16-byte aligned in fp32, as grouped_mm needs)


def _inputs(requires_grad: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, A, generator=g, requires_grad=requires_grad)
    w = torch.randn(len(COUNTS), A, B, generator=g, requires_grad=requires_grad)
    return x, w, torch.tensor(COUNTS)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_segment_mm_passes_torch_opcheck(requires_grad):
    torch.library.opcheck(torch.ops.switchyard.segment_mm, _inputs(requires_grad))


def test_segment_mm_equals_the_eager_loop_with_its_gradients():
    x, w, counts = _inputs(True)
    grad = torch.randn(N, B, generator=torch.Generator().manual_seed(1))
    y = torch.ops.switchyard.segment_mm(x, w, counts)
    gx, gw = torch.autograd.grad(y, (x, w), grad)
    y_ref = segment_loop(x, w, counts)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), grad)
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref) and torch.equal(gw, gw_ref)
    assert torch.equal(gw[1], torch.zeros(A, B))  # the empty expert's weight gradient is zero, not garbage
    # only the weight asked for: the backward operator's empty stand-in for grad_x is never handed out
    (gw_only,) = torch.autograd.grad(torch.ops.switchyard.segment_mm(x.detach(), w, counts), (w,), grad)
    assert torch.equal(gw_only, gw_ref)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
def test_cpu_grouped_mm_passes_opcheck_in_both_layouts():
    x, w, counts = _inputs(False)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    torch.library.opcheck(torch.ops.switchyard.cpu_grouped_mm, (x, w, offs))  # [N, A] x [E, A, B] -> [N, B]
    grad = torch.randn(N, B, generator=torch.Generator().manual_seed(2))
    torch.library.opcheck(torch.ops.switchyard.cpu_grouped_mm, (x.t(), grad, offs))  # [A, N] x [N, B] -> [E, A, B]
    assert torch.equal(torch.ops.switchyard.cpu_grouped_mm(x, w, offs), grouped_mm_cpu(x, w, offs))  # eager's call
