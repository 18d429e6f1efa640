"""The test-only patch of the Triton interpreter's bf16 arithmetic (tests/conftest.py).

The interpreter stores bf16 as uint16 bit patterns (numpy has no bf16): its ``tl.dot`` multiplies
those bits, and its fp32 -> bf16 casts truncate the mantissa (a GPU rounds to nearest even).
conftest's session fixture ``interpreter_bf16_dot`` widens bf16 dot operands to fp32 (fp32
accumulation) and rounds the casts to nearest even. Here: a tiny bf16 ``tl.dot`` kernel equals the
fp32 matmul of the bf16 values, casts equal torch's ``.to(torch.bfloat16)``, and (to show why the
patch exists) the unpatched interpreter does neither.
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


@triton.jit
def _cast_kernel(x_ptr, y_ptr, z_ptr, N: tl.constexpr):
    """y = x.to(bf16) (explicit cast); z = x stored into a bf16 tensor (implicit cast)."""
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, x.to(tl.bfloat16))
    tl.store(z_ptr + offs, x)


def _cast(x):
    y, z = (torch.empty(x.shape[0], dtype=torch.bfloat16) for _ in range(2))
    _cast_kernel[(1,)](x, y, z, N=x.shape[0])
    return y, z


def test_fp32_to_bf16_casts_round_to_nearest_even():
    x = torch.randn(1024, generator=torch.Generator().manual_seed(0))
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3.0e38, 1e-40, 1.00390625,
                             1.01171875])  # the last two: exact ties, rounding to even down and up
    x[1000:1000 + specials.numel()] = specials
    want = x.to(torch.bfloat16)
    for got in _cast(x):
        same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
        assert same.all(), f"{(~same).sum().item()} casts differ from round-to-nearest-even"


def test_unpatched_interpreter_cast_truncates(monkeypatch):
    from triton.runtime.interpreter import InterpreterBuilder

    original = getattr(InterpreterBuilder.cast_impl, "original", None)
    assert original is not None, "the conftest patch is not active"
    monkeypatch.setattr(InterpreterBuilder, "cast_impl", original)
    x = torch.randn(256, generator=torch.Generator().manual_seed(1))
    truncated = (x.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    y, _ = _cast(x)
    assert torch.equal(y, truncated) and not torch.equal(y, x.to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# the Triton backend in bf16, on inputs whose gradients the tolerances can see

def _unsaturated_inputs(n, d, k, seed):
    """bf16 inputs with cos(a_i, p_i) ~ 0.3: at tau = 0.05 the softmax is not one-hot, so the gradients are
    larger than GRAD_TOL's floors (conftest.make_inputs' positives, 1.5 a + noise, saturate it: there a
    zero bf16 gradient would pass for some tensors)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    p = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.3 * a
    neg = torch.randn(k, d, generator=g, dtype=torch.float64) if k else None
    return [None if t is None else t.to(torch.bfloat16) for t in (a, p, neg)]


def _assert_not_vacuous(a, p, neg, tau, **options):
    """A zero gradient must fail the bf16 tolerance for every input (the test can see a wrong gradient)."""
    from conftest import loss_and_grads, reference_temperature_floor

    from simcse_kernels import info_nce_reference
    from simcse_kernels.tolerances import GRAD_TOL, grad_scale_floor, scaled_error

    to64 = [None if t is None else t.double() for t in (a, p, neg)]
    _, grads = loss_and_grads(info_nce_reference, *to64, tau.double(), **options)
    for name, grad, src in zip(("anchors", "positives", "negatives", "temperature"), grads, (a, p, neg, tau)):
        if grad is None:
            continue
        if name == "temperature":
            floor = reference_temperature_floor(a, p, neg, float(tau), **options)
        else:
            floor = grad_scale_floor(name, src, a.shape[0], float(tau), options.get("reduction", "mean"))
        assert not scaled_error(torch.zeros_like(grad), grad, GRAD_TOL[torch.bfloat16], floor)["ok"], name


@pytest.mark.parametrize("option_set,bwd", [
    ("unsup", "default"), ("hard_neg", "default"), ("symmetric", "default"), ("anchor_neg", "default"),
    ("mixcse", "default"), ("everything", "default"), ("none", "default"), ("everything", "atomic")])
def test_triton_bf16_parity_unsaturated(option_set, bwd, monkeypatch):
    from conftest import assert_backend_matches_reference, split_option_set

    pytest.importorskip("simcse_kernels.ops.triton_loss", reason="triton is not installed")
    if bwd == "atomic":
        monkeypatch.setenv("SIMCSE_TRITON_BWD", "atomic")
    k, opts = split_option_set(option_set, 45)
    a, p, neg = _unsaturated_inputs(45, 80, k, seed=7)
    tau = torch.tensor(0.05)
    _assert_not_vacuous(a, p, neg, tau, **opts)
    assert_backend_matches_reference("triton", a, p, neg, tau=tau, **opts)
