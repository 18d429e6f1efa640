"""The test-only patch of the Triton interpreter's bf16 ``tl.dot`` (tests/conftest.py).

The interpreter stores bf16 as uint16 bit patterns (numpy has no bf16) and its ``tl.dot`` multiplies
those bits; conftest's session fixture ``interpreter_bf16_dot`` widens bf16 operands to fp32 and
accumulates in fp32. Here: a tiny bf16 ``tl.dot`` kernel equals the fp32 matmul of the bf16 values,
and (to show why the patch exists) the unpatched interpreter does not.
"""

from __future__ import annotations

import pytest
import torch
from conftest import interpreter_bf16_dot_patchable

pytestmark = pytest.mark.skipif(not interpreter_bf16_dot_patchable(),
                                reason="needs TRITON_INTERPRET=1 and triton's interpreter")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c (M, N) fp32 = a (M, K) @ b (K, N), both bf16, accumulated over K blocks of BLOCK_K."""
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    acc = tl.zeros((M, N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
        b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)


def _run(a, b):
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32)
    _dot_kernel[(1,)](a, b, out, M=a.shape[0], K=a.shape[1], N=b.shape[1], BLOCK_K=32)
    return out


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(16, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(64, 32, generator=g).to(torch.bfloat16)
    return a, b


def test_bf16_dot_equals_fp32_matmul_of_bf16_values():
    for seed in range(3):
        a, b = _inputs(seed)
        got = _run(a, b)
        exact = a.double() @ b.double()  # bf16 products are exact in fp32; only the fp32 sums round
        torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(got, a.float() @ b.float(), rtol=1e-6, atol=1e-5)


def test_unpatched_interpreter_bf16_dot_is_wrong(monkeypatch):
    from triton.runtime.interpreter import InterpreterBuilder

    original = getattr(InterpreterBuilder.create_dot, "original", None)
    assert original is not None, "the conftest patch is not active"
    monkeypatch.setattr(InterpreterBuilder, "create_dot", original)
    a, b = _inputs(0)
    got = _run(a, b)
    assert not torch.allclose(got, a.float() @ b.float(), rtol=1e-2, atol=1e-2)
