"""segment_sum's launch grid (moe.kernels.combine.segment_sum_grid): every program in grid x, within CUDA's limits
at the split-K weight gradients' widths (P*Q of a 4096 x 14336 expert and wider), and the kernel's decoding of
(token, column block) from the one program id, against a torch sum in slot order, bitwise.

CUDA caps grid dimensions y and z at 65,535 and x at 2^31 - 1. The split-K second pass (moe.kernels.weight_grad)
sums E rows of width P*Q, so a second grid dimension of column blocks would reach P*Q / block_d.
"""
from __future__ import annotations

import pytest
import torch

# First: test_grouped_gemm sets TRITON_INTERPRET before triton's first import, and skips this module too
# where triton is missing or CPU tensors cannot run.
from tests.moe.kernels.test_grouped_gemm import DEVICE

from moe.kernels.combine import GRID_X_MAX, segment_sum, segment_sum_grid
from moe.kernels.tile_configs import WgradBlocks
from moe.kernels.weight_grad import grouped_wgrad

CUDA_GRID_YZ_MAX = 65535


@pytest.mark.parametrize("rows, width, block_d", [
    (8, 4096 * 14336, 1024),  # E=8 experts of the large layer: 57,344 column blocks
    (64, 5120 * 13824, 1024),  # a wider layer: 69,120 column blocks, past the y / z cap
    (8, 4096 * 14336, 256),  # smaller blocks: 229,376
    (80_000, 1024, 1024),  # the token combine of the int32-overflow probe's 80k tokens
])
def test_grid_is_one_dimension_within_cudas_limits(rows, width, block_d):
    grid = segment_sum_grid(rows, width, block_d)
    col_blocks = -(-width // block_d)
    assert grid == (rows * col_blocks,) and grid[0] <= GRID_X_MAX
    if width >= 5120 * 13824 or block_d < 1024:
        assert col_blocks > CUDA_GRID_YZ_MAX  # where the former (rows, column blocks) grid would not launch


def test_grid_past_cudas_x_limit_is_refused_by_name():
    with pytest.raises(ValueError, match="block_elementwise"):
        segment_sum_grid(1 << 20, 1 << 20, 64)  # 2^34 programs


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_programs_decode_token_and_column_block(out_dtype):
    """Tokens with 0..3 rows and a width of 5 column blocks (the last one ragged): each program's (token,
    columns) is right, and the fp32 sum in slot order, rounded once, is what torch gives, bit for bit."""
    g = torch.Generator().manual_seed(0)
    per_token = torch.tensor([2, 0, 3, 1, 0, 3, 1])
    width, block_d = 70, 16  # cdiv(70, 16) = 5 column blocks
    token_offsets = torch.cat([torch.zeros(1, dtype=torch.long), per_token.cumsum(0)])
    rows = torch.randn(int(per_token.sum()), width, generator=g)
    want = torch.zeros(len(per_token), width)
    for t, (lo, hi) in enumerate(zip(token_offsets.tolist(), token_offsets[1:].tolist())):
        for j in range(lo, hi):  # slot order, in fp32: the kernel's order
            want[t] += rows[j]
    got = segment_sum(rows.to(DEVICE), token_offsets.to(DEVICE), out_dtype, block_d)
    assert torch.equal(got.cpu(), want.to(out_dtype))


def test_split_k_second_pass_with_many_column_blocks():
    """The split-K weight gradient whose second pass runs 30 column blocks per expert (P*Q = 40 x 24 = 960
    elements, 32 per block) equals the unsplit kernel to fp32 reassociation, empty experts included."""
    counts = (0, 45, 3, 0, 12)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    g = torch.Generator().manual_seed(1)
    N, P, Q = sum(counts), 40, 24
    h, gy = torch.randn(N, P, generator=g), torch.randn(20, Q, generator=g)
    row_token, scale = torch.randint(0, 20, (N,), generator=g), torch.rand(N, generator=g)
    tile = dict(block_m=32, block_n=32, block_k=16, block_elementwise=32, num_warps=1, num_stages=1)
    args = (h.to(DEVICE), None, gy.to(DEVICE), None, row_token.to(DEVICE), scale.to(DEVICE), offsets.to(DEVICE),
            len(counts), True)
    split = grouped_wgrad(*args, WgradBlocks(**tile, split_rows=16))
    whole = grouped_wgrad(*args, WgradBlocks(**tile))
    for s, w in ((split[0], whole[0]), (split[2], whole[2])):
        assert s.shape == w.shape and torch.allclose(s, w, rtol=1e-5, atol=1e-5)
    assert split[0][0].abs().max() == 0 and split[0][3].abs().max() == 0  # the empty experts
