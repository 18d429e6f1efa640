"""Edges of the loss API: temperatures at the limits of the compute dtype, rows near finfo.max,
hard-negative weights with fewer negatives than anchors, double backward, the README's first example.

The huge-row truth is the plain ``F.normalize`` formula in float64 on the same fp32 values (no row
scaling: float64 does not overflow there), so it is independent of the code under test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TRITON_DEVICE, needs_triton_runtime

from simcse_kernels import DoubleBackwardError, FusedInfoNCE, fused_info_nce
from simcse_kernels.reference import HUGE_ROW, huge_row_scale
from simcse_kernels.tolerances import GRAD_TOL, LOSS_TOL

ROOT = Path(__file__).resolve().parents[1]


def _inputs(n=6, d=12, k=0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, d, generator=g).to(dtype) for rows in (n, n, k)]


# ---------------------------------------------------------------------------------------------
# temperature
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1e-39, 1e-45, 1e-300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_temperature_not_normal_in_fp32_is_rejected(tau, dtype):
    a, p, _ = _inputs(dtype=dtype)
    for backend in ("naive", "torch"):
        with pytest.raises(ValueError, match="temperature"):
            fused_info_nce(a, p, temperature=tau, backend=backend)
        with pytest.raises(ValueError, match="temperature"):
            fused_info_nce(a, p, temperature=torch.tensor(tau, dtype=torch.float64), backend=backend)


def test_temperature_limits_in_fp64():
    a, p, _ = _inputs(dtype=torch.float64)
    for tau in (1e-320, 5e-324):  # subnormal in fp64
        with pytest.raises(ValueError, match="temperature"):
            fused_info_nce(a, p, temperature=tau)
    # 1e-300 is a normal fp64 with a finite 1/tau: accepted, and every backend gives the same finite loss
    naive = fused_info_nce(a, p, temperature=1e-300, backend="naive")
    torch_ = fused_info_nce(a, p, temperature=1e-300, backend="torch")
    assert torch.isfinite(naive)
    torch.testing.assert_close(torch_, naive, **LOSS_TOL[torch.float64])
    # a learnable 1e-300 would need 1/tau² = 1e600 in its gradient: rejected, not an infinite gradient
    with pytest.raises(ValueError, match="learnable temperature"):
        fused_info_nce(a, p, temperature=torch.tensor(1e-300, dtype=torch.float64, requires_grad=True))


def test_learnable_temperature_gradient_never_overflows_silently():
    a, p, _ = _inputs()
    with pytest.raises(ValueError, match="learnable temperature"):
        fused_info_nce(a, p, temperature=torch.tensor(1e-20, requires_grad=True))
    tau = torch.tensor(1e-15, requires_grad=True)  # 1/tau² = 1e30: representable
    for backend in ("naive", "torch"):
        tau.grad = None
        fused_info_nce(a, p, temperature=tau, backend=backend).backward()
        assert torch.isfinite(tau.grad)


def test_module_rejects_subnormal_temperature():
    a, p, _ = _inputs()
    with pytest.raises(ValueError, match="temperature"):
        FusedInfoNCE(temperature=1e-39)(a, p)


# ---------------------------------------------------------------------------------------------
# huge rows
# ---------------------------------------------------------------------------------------------


def _truth(a, p, neg, w):
    """Loss and gradients in float64 by the plain formula (no overflow in float64 up to fp32's max)."""
    a, p = a.double().requires_grad_(), p.double().requires_grad_()
    neg = neg.double().requires_grad_()
    an, cn = F.normalize(a, dim=-1), F.normalize(torch.cat([p, neg]), dim=-1)
    logits = an @ cn.T / 0.05
    logits[:, p.shape[0]:] += w * torch.eye(a.shape[0], neg.shape[0], dtype=torch.float64)
    loss = F.cross_entropy(logits, torch.arange(a.shape[0]))
    loss.backward()
    return loss, a.grad, p.grad, neg.grad


def _huge_inputs(magnitude, dtype=torch.float32, n=6, d=12):
    a, p, neg = _inputs(n=n, d=d, k=n, dtype=torch.float32, seed=3)
    scale = torch.logspace(0, 0.5, n).unsqueeze(1)  # rows of different magnitudes (up to 3.2x)
    big = [(t / t.abs().amax() * scale / scale.max() * magnitude).to(dtype) for t in (a, p, neg)]
    big[1][0] = big[1][0] * 1e-30  # one ordinary-sized row next to the huge ones
    return big


def _check_huge(backend, magnitude, device="cpu", dtype=torch.float32):
    a, p, neg = (t.to(device).requires_grad_() for t in _huge_inputs(magnitude, dtype))
    loss = fused_info_nce(a, p, neg, temperature=0.05, hard_negative_weight=0.5, backend=backend)
    loss.backward()
    truth = _truth(a.detach().cpu(), p.detach().cpu(), neg.detach().cpu(), 0.5)
    got, want = float(loss.detach()), float(truth[0])
    # the suite's fp32 tolerances: the loss relative to max(|loss|, 1/tau), a gradient to its tensor's scale
    assert abs(got - want) <= LOSS_TOL[dtype]["rtol"] * max(abs(want), 1 / 0.05), (got, want)
    tol = GRAD_TOL[dtype]
    for got, want in zip((a.grad, p.grad, neg.grad), truth[1:]):
        got = got.detach().cpu().double()
        assert torch.isfinite(got).all()
        row_scale = want.abs().max()
        # + one subnormal spacing: at |x| ~ 3e38 the gradients (~1e-40) are subnormal in fp32, where
        # the final rounding alone costs up to half of 2^-149
        floor = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
        assert ((got - want).abs() <= tol["rtol"] * row_scale + floor).all(), (
            ((got - want).abs() / row_scale).max())


@pytest.mark.parametrize("magnitude", [1e19, 1e30, 3e38])
@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_huge_rows_match_float64(backend, magnitude):
    _check_huge(backend, magnitude)


@needs_triton_runtime
@pytest.mark.parametrize("magnitude", [1e19, 3e38])
def test_huge_rows_match_float64_triton(magnitude):
    _check_huge("triton", magnitude, device=TRITON_DEVICE)


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_huge_bf16_rows_loss_matches_float64(backend):
    a, p, neg = _huge_inputs(1e30, torch.bfloat16)
    loss = fused_info_nce(a, p, neg, hard_negative_weight=0.5, backend=backend)
    truth = _truth(a, p, neg, 0.5)[0]
    got, want = float(loss), float(truth.detach())
    assert abs(got - want) <= 1e-4 * abs(want), (got, want)


def test_huge_rows_mixcse_and_reduction_none_match_naive():
    a, p, _ = _huge_inputs(1e35)
    p[0] = p[1] * 0.5  # MixCSE scales per tensor (its mixtures mix rows): rows within 2^86 of the largest
    for opts in (dict(mix_lambda=0.3), dict(reduction="none", symmetric=True), dict(anchor_negatives=True)):
        naive = fused_info_nce(a.double() / 1e35, p.double() / 1e35, backend="naive", **opts)
        got = fused_info_nce(a, p, backend="torch", **opts)
        torch.testing.assert_close(got.double(), naive, rtol=1e-4, atol=1e-5)


def test_huge_row_scale_is_an_exact_power_of_two_and_one_for_ordinary_rows():
    x = torch.tensor([[3e38, -1.0], [2.0 ** 40, 0.0], [2.0 ** 40 * 0.99, 1.0], [0.0, 0.0], [1e-30, 0.0]])
    s = huge_row_scale(x)
    assert s.dtype == x.dtype and s.shape == (5, 1)
    mantissa, _ = torch.frexp(s.double())
    assert (mantissa == 0.5).all()  # powers of two
    assert s[2:].eq(1).all()  # below HUGE_ROW, zero and tiny rows: untouched
    scaled = (x[:2] * s[:2]).abs().amax(dim=1)
    assert ((scaled >= 0.5) & (scaled < 1)).all()
    assert float(x[1, 0]) == HUGE_ROW


def test_ordinary_inputs_are_bitwise_unchanged():
    """No row reaches 2^40: the backends see the inputs as before (same bits, loss and gradients)."""
    a, p, neg = _inputs(k=6)
    a.requires_grad_()
    loss = fused_info_nce(a, p, neg, backend="torch")
    loss.backward()
    a2 = a.detach().clone().requires_grad_()
    from simcse_kernels.ops.features import without_huge_rows
    from simcse_kernels.options import InfoNCEOptions

    same = without_huge_rows(a2, p, neg, InfoNCEOptions())
    assert same[0] is a2 and same[1] is p and same[2] is neg


# ---------------------------------------------------------------------------------------------
# hard negatives: K < N
# ---------------------------------------------------------------------------------------------


def test_hard_negative_weight_needs_k_at_least_n():
    a, p, neg = _inputs(n=8, k=3)
    for backend in ("naive", "torch"):
        with pytest.raises(ValueError, match=r"hard_negative_weight pairs anchor i with negative i.*K=3.*N=8"):
            fused_info_nce(a, p, neg, hard_negative_weight=1.0, backend=backend)
        fused_info_nce(a, p, neg, backend=backend)  # no weight: 3 shared negatives are fine
    _, _, more = _inputs(n=8, k=11)
    naive = fused_info_nce(a, p, more, hard_negative_weight=1.0, backend="naive")  # K >= N: allowed
    torch.testing.assert_close(fused_info_nce(a, p, more, hard_negative_weight=1.0, backend="torch"), naive,
                               **LOSS_TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# double backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_torch_backend_raises_clear_error(reduction):
    a, p, _ = (t.double().requires_grad_() for t in _inputs())
    loss = fused_info_nce(a, p, backend="torch", reduction=reduction).sum()
    with pytest.raises(DoubleBackwardError, match="backend 'torch'.*backend='naive'"):
        torch.autograd.grad(loss, (a, p), create_graph=True)
    # first order still works, with or without retain_graph
    loss = fused_info_nce(a, p, backend="torch", reduction=reduction).sum()
    torch.autograd.grad(loss, (a, p))


@needs_triton_runtime
def test_double_backward_triton_backend_raises_clear_error():
    a, p, _ = (t.to(TRITON_DEVICE).requires_grad_() for t in _inputs())
    loss = fused_info_nce(a, p, backend="triton")
    with pytest.raises(DoubleBackwardError, match="backend 'triton'"):
        torch.autograd.grad(loss, (a, p), create_graph=True)


@pytest.mark.parametrize("opts", [dict(), dict(hard_negative_weight=0.7, symmetric=True),
                                  dict(anchor_negatives=True, reduction="sum")])
def test_naive_backend_is_twice_differentiable(opts):
    a, p, neg = (t.double().requires_grad_() for t in _inputs(n=4, d=5, k=4, seed=1))
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    neg_arg = neg if "hard_negative_weight" in opts or not opts else None

    def fn(a, p, neg, tau):
        return fused_info_nce(a, p, neg_arg if neg_arg is None else neg, temperature=tau, backend="naive", **opts)

    assert torch.autograd.gradgradcheck(fn, (a, p, neg, tau))


def test_naive_second_derivative_with_huge_rows_is_the_scaled_one():
    """The row scale is a detached power of two: second derivatives match the unscaled rows'."""
    a, p, _ = _inputs(n=3, d=4, dtype=torch.float64, seed=2)
    big = 2.0 ** 60

    def grad_norm(x):
        x = x.requires_grad_()
        (g,) = torch.autograd.grad(fused_info_nce(x, p, backend="naive"), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), x)
        return g, gg

    g1, gg1 = grad_norm(a.clone())
    g2, gg2 = grad_norm(a.clone() * big)
    torch.testing.assert_close(g2 * big, g1, rtol=1e-12, atol=0)
    torch.testing.assert_close(gg2 * big ** 3, gg1, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------
# the README's first example
# ---------------------------------------------------------------------------------------------


def test_readme_first_python_block_runs_when_pasted():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S)
    assert block, "README.md has no python code block"
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    assert torch.isfinite(namespace["loss"]) and namespace["z1"].grad is not None
