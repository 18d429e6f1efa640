"""The shared gradient GEMM of the fused backends' default backward (simcse_kernels/ops/gemm.py),
and the choice between it and the atomic backward.

On CPU the 16-bit operands are upcast; the CUDA call form (``torch.mm``/``torch.addmm`` with
``out_dtype=torch.float32`` into a row slice of an fp32 buffer, transposed operand views) has no
CPU kernel, so it is checked on the meta device: same arguments, shapes and dtypes as on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from simcse_kernels.ops.gemm import accumulate_gemm, ds_storage_dtype


def test_storage_dtype_rule():
    assert ds_storage_dtype(torch.bfloat16) == torch.bfloat16
    assert ds_storage_dtype(torch.float16) == torch.float32
    assert ds_storage_dtype(torch.float32) == torch.float32
    assert ds_storage_dtype(torch.float64) == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("accumulate", [False, True])
def test_cpu_matches_float64_product(dtype, accumulate):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 19, generator=g).to(dtype)
    b = torch.randn(11, 37, generator=g).to(dtype).T  # (37, 11) transposed view, as dsᵀ
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    buf = torch.randn(50, 11, generator=g, dtype=acc_dtype)
    before = buf.clone()
    out = buf[5:24]  # a row slice, as a chunk's rows of the gradient buffer
    lhs = a[:19]  # (19, 19)
    rhs = b[:19]  # (19, 11) rows of a transposed view
    accumulate_gemm(out, lhs, rhs, accumulate)
    expected = lhs.double() @ rhs.double() + (before[5:24].double() if accumulate else 0.0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(out.double(), expected, rtol=tol, atol=tol)
    assert torch.equal(buf[:5], before[:5]) and torch.equal(buf[24:], before[24:])  # only the slice


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("accumulate", [False, True])
def test_cuda_call_form_on_meta(dtype, accumulate):
    with torch.device("meta"):
        ds = torch.empty(64, 300, dtype=dtype)  # (R, M) chunk
        feats = torch.empty(300, 96, dtype=dtype)  # (M, D) raw column features
        rows = torch.empty(64, 96, dtype=dtype)
        grad_rows = torch.empty(1000, 96, dtype=torch.float32)
        grad_cols = torch.empty(300, 96, dtype=torch.float32)
        accumulate_gemm(grad_rows[128:192], ds, feats, accumulate)  # ∂rows[chunk] (+)= ds @ cols
        accumulate_gemm(grad_cols, ds.T, rows, accumulate=True)  # ∂cols += dsᵀ @ rows[chunk]
        accumulate_gemm(grad_cols[:100], ds[:, 200:].T, rows, accumulate)  # a column block of ds
    assert grad_rows.dtype == grad_cols.dtype == torch.float32


@pytest.mark.parametrize(("module", "env_var"), [("triton_loss", "SIMCSE_TRITON_BWD"), ("cuda_loss", "SIMCSE_CUDA_BWD")])
def test_backward_mode_from_env(module, env_var, monkeypatch):
    """Both fused backends read their backward from their own variable: chunked unless "atomic"."""
    import importlib

    backward_mode = importlib.import_module(f"simcse_kernels.ops.{module}").backward_mode
    monkeypatch.delenv(env_var, raising=False)
    assert backward_mode() == "chunked"
    monkeypatch.setenv(env_var, "atomic")
    assert backward_mode() == "atomic"
    monkeypatch.setenv(env_var, "Atomic")
    with pytest.raises(ValueError, match=rf"{env_var} must be 'chunked' or 'atomic', got 'Atomic'"):
        backward_mode()
