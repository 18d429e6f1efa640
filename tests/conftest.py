"""Shared test helpers: inputs, per-dtype tolerances, and the parity check against the float64 oracle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from simcse_kernels import fused_info_nce, info_nce_reference

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Tolerances per input dtype, relative to the scale of the float64 reference value:
# the fused backends compute in fp32 (fp64 for fp64), so the loss is accurate to fp32 round-off;
# gradients come back in the input dtype and carry its rounding.
LOSS_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-5, atol=1e-6),
}
GRAD_TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=2e-3),
}


# Option sets every backend's parity suite runs ("k": "n" means K = N hard negatives).
OPTION_SETS = {
    "unsup": dict(),
    "hard_neg": dict(k="n", hard_negative_weight=0.7),
    "hard_neg_w0": dict(k="n"),
    "symmetric": dict(symmetric=True),
    "anchor_neg": dict(anchor_negatives=True),
    "mixcse": dict(mix_lambda=0.2),
    "mixcse_sup": dict(k="n", mix_lambda=0.35, hard_negative_weight=0.4),
    "sym_hard_neg": dict(k="n", symmetric=True, hard_negative_weight=-0.3),
    "sym_anchor_mix": dict(symmetric=True, anchor_negatives=True, mix_lambda=0.6),
    "everything": dict(k="n", symmetric=True, anchor_negatives=True, mix_lambda=0.5, hard_negative_weight=1.0),
    "sum": dict(reduction="sum"),
    "none": dict(k="n", reduction="none", anchor_negatives=True),
}


def split_option_set(option_set, n):
    """(K, loss options) of an ``OPTION_SETS`` entry for a batch of n anchors."""
    opts = dict(OPTION_SETS[option_set])
    k = opts.pop("k", 0)
    return (n if k == "n" else k), opts


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def make_inputs(n, d, k=0, *, dtype=torch.float32, device="cpu", seed=0, n_pos=None):
    """Random anchors (n, d), positives (n_pos or n, d), negatives (k, d) or None, rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    n_pos = n if n_pos is None else n_pos
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    # positives correlated with anchors so the softmax is not flat
    p = torch.randn(n_pos, d, generator=g, dtype=torch.float64)
    p[: min(n, n_pos)] += 1.5 * a[: min(n, n_pos)]
    neg = torch.randn(k, d, generator=g, dtype=torch.float64) if k else None
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)
    return cast(a), cast(p), cast(neg)


def loss_and_grads(loss_fn, a, p, neg, tau, **options):
    """Loss and gradients w.r.t. (anchors, positives, negatives, tau) of ``loss_fn``."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (a, p, neg)]
    tau_leaf = tau.detach().clone().requires_grad_(True) if isinstance(tau, torch.Tensor) else tau
    loss = loss_fn(leaves[0], leaves[1], leaves[2], temperature=tau_leaf, **options)
    weight = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    (loss * weight).sum().backward()
    grads = [t.grad if t is not None else None for t in leaves]
    grads.append(tau_leaf.grad if isinstance(tau_leaf, torch.Tensor) else None)
    return loss.detach(), grads


def _assert_close_scaled(actual, expected, tol, what, min_scale=0.0):
    """``atol`` is relative to the largest |expected| entry (at least ``min_scale``; 1 if all zero)."""
    expected = expected.double().cpu()
    actual = actual.double().cpu()
    scale = max(expected.abs().max().item(), min_scale) or 1.0
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=lambda m: f"{what}: {m}")


def assert_backend_matches_reference(backend, a, p, neg, tau=0.05, **options):
    """Loss and every gradient of ``backend`` equal the float64 naive oracle on the same inputs."""
    dtype = a.dtype
    # the float64 oracle runs on the inputs' device (fp64 on a GPU is quick for the large cases)
    tau64 = tau.double().to(a.device) if isinstance(tau, torch.Tensor) else tau
    to64 = lambda t: None if t is None else t.double()
    exp_loss, exp_grads = loss_and_grads(info_nce_reference, to64(a), to64(p), to64(neg), tau64, **options)
    act_loss, act_grads = loss_and_grads(fused_info_nce, a, p, neg, tau, backend=backend, **options)
    assert act_loss.shape == exp_loss.shape
    # Each row's loss is lse - target, a difference of logits of size up to 1/tau: that is the
    # unit of its round-off (times N for a sum).
    tau_value = float(tau64)
    loss_unit = (a.shape[0] if options.get("reduction") == "sum" else 1) / tau_value
    _assert_close_scaled(act_loss, exp_loss, LOSS_TOL[dtype], "loss", min_scale=loss_unit)
    for name, act, exp, src in zip(("anchors", "positives", "negatives", "temperature"), act_grads, exp_grads,
                                   (a, p, neg, tau)):
        if exp is None:
            assert act is None, f"{name}: unexpected gradient"
            continue
        assert act is not None, f"{name}: missing gradient"
        # Unit of one gradient term: |g_i| |ŷ_j| / (tau |x|) with ŷ entries ~ 1/sqrt(D). Gradients of
        # saturated rows (softmax ~ one-hot) are far below it and below fp32 resolution there.
        g_max = 1.5 / a.shape[0] if options.get("reduction", "mean") == "mean" else 1.5
        min_scale = 0.0
        if name != "temperature":
            rms_norm = src.double().norm(dim=1).pow(2).mean().sqrt().item() or 1.0
            min_scale = g_max / (tau_value * src.shape[1] ** 0.5 * rms_norm)
        if name == "temperature":
            # dL/dtau = -(1/tau) sum dS_ij s_ij is a cancelling sum of terms of size ~1/tau^2:
            # its round-off is relative to that unit, not to the (possibly ~0) result.
            min_scale = g_max / tau_value**2
        else:
            assert act.dtype == src.dtype, f"{name}: grad dtype {act.dtype} != input dtype {src.dtype}"
        _assert_close_scaled(act, exp, GRAD_TOL[dtype], f"grad {name}", min_scale=min_scale)


def interpret_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
