"""The fp32 dot precision the Triton GEMMs pick follows torch's TF32 setting, through the API torch has (issue 20, 4a).

torch >= 2.9 raises on reading the legacy `allow_tf32` once anything has set `fp32_precision`; the kernels must read
the new attribute there and the old one only where it is the only one.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

# First: test_grouped_gemm sets TRITON_INTERPRET before triton's first import, and skips this module too
# where triton is missing or CPU tensors cannot run.
from tests.moe.kernels.test_grouped_gemm import CUDA, FF, D, E, T, check, default_plan, make_params

import moe.kernels.gemm_tiles as tiles
NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


@pytest.fixture
def restore_precision():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision if NEW_API else matmul.allow_tf32
    yield matmul
    if NEW_API:
        matmul.fp32_precision = before
    else:
        matmul.allow_tf32 = before


@pytest.mark.skipif(not NEW_API, reason="torch < 2.9 has no fp32_precision")
@pytest.mark.parametrize("setting,want", [("ieee", "ieee"), ("tf32", "tf32")])
def test_new_api_is_read_and_the_kernels_run(restore_precision, setting, want):
    """With the new API set (after which torch 2.13 raises on reading allow_tf32 = "tf32", what the kernels used
    to read), the kernels run and pick the setting."""
    restore_precision.fp32_precision = setting
    assert tiles._precision(torch.float32) == want
    assert tiles._precision(torch.bfloat16) == "tf32"  # 16-bit operands: Triton's default, setting ignored
    row_token, offsets = default_plan()
    # Under the interpreter both precisions compute in fp32 (so the elementwise 1e-5 check holds for both); on a
    # GPU tf32 rounds the operands to 10 mantissa bits, checked as a relative error of each tensor.
    rel_tol = 5e-3 if (CUDA and want == "tf32") else None
    check(make_params(T, D, FF, E, True, True, torch.float32), row_token, offsets, T, "silu", rel_tol=rel_tol)


def test_legacy_api_where_it_is_the_only_one(monkeypatch):
    """A torch without fp32_precision: allow_tf32 decides."""
    for allow, want in ((False, "ieee"), (True, "tf32")):
        monkeypatch.setattr(tiles.torch.backends.cuda, "matmul", SimpleNamespace(allow_tf32=allow))
        assert tiles.tf32_allowed() is allow
        assert tiles._precision(torch.float32) == want


@pytest.mark.skipif(not NEW_API, reason="torch < 2.9 has no fp32_precision")
def test_inherited_and_legacy_settings_read_back_through_the_new_api(restore_precision):
    """"none" inherits torch.backends.fp32_precision; set_float32_matmul_precision updates the new attribute."""
    root = torch.backends.fp32_precision
    try:
        restore_precision.fp32_precision = "none"
        torch.backends.fp32_precision = "tf32"
        assert tiles.tf32_allowed()
        torch.backends.fp32_precision = "ieee"
        assert not tiles.tf32_allowed()
    finally:
        torch.backends.fp32_precision = root
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert tiles._precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert tiles._precision(torch.float32) == "ieee"
    finally:
        torch.set_float32_matmul_precision(old)
