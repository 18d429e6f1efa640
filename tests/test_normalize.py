"""``ops.normalize.unit_rows``: the values and gradient of ``F.normalize(x, dim=-1, eps=eps)``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from simcse_kernels.ops.normalize import unit_rows
from simcse_kernels.reference import NORM_EPS


def rows_with_a_tiny_one(dtype, n=7, d=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[3] *= 1e-14  # norm < eps: F.normalize divides by eps there
    x[5] *= 1e3
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradient_match_f_normalize(dtype):
    x = rows_with_a_tiny_one(dtype)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = unit_rows(x1, NORM_EPS), F.normalize(x2, dim=-1, eps=NORM_EPS)
    (y1 * grad_out).sum().backward()
    (y2 * grad_out).sum().backward()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(y1, y2, **tol)
    # relative to each row's gradient scale (the clamped row's is 1/eps = 1e12)
    scale = x2.grad.abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(x1.grad / scale, x2.grad / scale, **tol)
    assert x1.grad[3].abs().max() > 1e11  # the clamped row: ∂y / eps


def test_gradcheck_float64():
    x = rows_with_a_tiny_one(torch.float64, n=6, d=6)[[0, 1, 2, 4, 5]].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: unit_rows(t, NORM_EPS), (x,))


def test_without_grad_is_f_normalize():
    x = rows_with_a_tiny_one(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(unit_rows(x, NORM_EPS), F.normalize(x, dim=-1, eps=NORM_EPS), rtol=0, atol=0)
    assert unit_rows(x, NORM_EPS).grad_fn is None
