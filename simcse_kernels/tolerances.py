"""Per-dtype tolerances of a backend against the float64 oracle, shared by the tests, the first-use
self-check (:mod:`simcse_kernels.selfcheck`) and ``python -m simcse_kernels``.

A value ``actual`` agrees with its float64 reference ``expected`` when, element by element,
``|actual - expected| <= atol * scale + rtol * |expected|`` with ``scale`` the largest
``|expected|`` entry, but at least a floor that is the natural unit of the quantity's round-off:

* loss: each row's loss is ``lse - target``, a difference of logits of size up to ``1/tau``; the
  unit is ``1/tau`` (times N for ``reduction="sum"``);
* feature gradients: one gradient term is ``|g_i| |ŷ_j| / (tau |x|)`` with ``ŷ`` entries
  ``~ 1/sqrt(D)``; gradients of saturated rows (softmax ~ one-hot) are far below it and below the
  compute dtype's resolution there;
* temperature gradient: ``dL/dtau = Σ_ij dS_ij ∂s_ij/∂tau = -(1/tau) Σ dS_ij s_ij`` is a sum of
  N·M terms that cancel (``Σ_j dS_ij = 0`` per row). Its summation round-off is bounded by the
  sum of the terms' magnitudes, ``Σ_ij |g_i σ_ij s_ij| / tau + Σ_i |g_i s_{i,l_i}| / tau`` (the
  softmax terms and the target terms, which cancel to ~0 in a saturated row), whatever order the
  machine sums in: :func:`temperature_grad_floor`, from the float64 reference; never the result.

The fused backends compute in fp32 (fp64 for fp64), so the loss is accurate to fp32 round-off in
every input dtype; gradients come back in the input dtype and carry its rounding.
"""

from __future__ import annotations

import dataclasses
import math

import torch

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

#: largest upstream gradient weight of :func:`weighted_backward` (weights run from 0.5 to 1.5)
MAX_UPSTREAM_WEIGHT = 1.5


def loss_scale_floor(n_rows: int, tau: float, reduction: str) -> float:
    """The round-off unit of the loss: ``1/tau``, times ``n_rows`` for ``reduction="sum"``.

    Args:
        n_rows: N, the number of anchor rows.
        tau: the temperature value.
        reduction: "mean", "sum" or "none".
    """
    return (n_rows if reduction == "sum" else 1) / tau


def grad_scale_floor(name: str, source: torch.Tensor, n_rows: int, tau: float, reduction: str) -> float:
    """The round-off unit of the gradient of feature input ``name`` (see the module docstring); the
    temperature's is :func:`temperature_grad_floor`.

    Args:
        name: "anchors", "positives" or "negatives".
        source: the (R, D) input the gradient belongs to.
        n_rows: N, the number of anchor rows.
        tau: the temperature value.
        reduction: "mean", "sum" or "none" (upstream weights up to :data:`MAX_UPSTREAM_WEIGHT`).
    """
    if name == "temperature":
        raise ValueError("the temperature gradient's floor is temperature_grad_floor(...), the sum of its |terms|")
    g_max = MAX_UPSTREAM_WEIGHT / n_rows if reduction == "mean" else MAX_UPSTREAM_WEIGHT
    rms_norm = source.detach().double().norm(dim=1).pow(2).mean().sqrt().item() or 1.0
    return g_max / (tau * source.shape[1] ** 0.5 * rms_norm)


def temperature_grad_floor(anchors, positives, negatives, labels, options, loss_weight=None) -> float:
    """The round-off unit of ``dL/dtau`` (module docstring), in float64 from the reference.

    ``dL/dtau = Σ_ij g_i σ_ij ∂s_ij/∂tau − Σ_i g_i ∂s_{i,l_i}/∂tau`` (``g_i = ∂L/∂ℓ_i``; with
    ``symmetric`` the column softmax adds its own σ terms) is a sum whose two parts cancel, to ~0 for
    saturated rows; its round-off in any summation order is bounded by the sum of the magnitudes of
    those terms, which this returns.

    Args:
        anchors, positives, negatives: (N, D), (P, D), (K, D) or None inputs (any float dtype; promoted
            to float64).
        labels: (N,) target columns, or None for ``arange(N)``.
        options: the :class:`~simcse_kernels.options.InfoNCEOptions` of the loss (temperature a number
            or a tensor; its value is used).
        loss_weight: the upstream gradient of the loss, a number or a tensor of the loss's shape
            (default :func:`weighted_backward`'s weights).

    Every logit is ``x/tau + k`` with ``k`` independent of tau, so ``∂s/∂tau = -2 (s(tau) - s(2 tau)) / tau``
    entry by entry (0 on masked -inf entries): this reuses the reference's logits of every option.
    """
    from .reference import loss_from_logits, reference_logits
    from .validation import validate_inputs

    tau = options.temperature
    tau = float(tau.detach().reshape(())) if isinstance(tau, torch.Tensor) else float(tau)
    to64 = lambda t: None if t is None else t.detach().to(torch.float64)
    a, p, n = to64(anchors), to64(positives), to64(negatives)
    opts = dataclasses.replace(options, temperature=tau, backend="naive")
    n, labels = validate_inputs(a, p, n, labels, opts)
    with torch.enable_grad():
        logits = reference_logits(a, p, n, labels, opts).detach().requires_grad_(True)
        loss = loss_from_logits(logits, p.shape[0], labels, opts)
        if loss_weight is None:
            loss_weight = torch.linspace(0.5, MAX_UPSTREAM_WEIGHT, loss.numel(), dtype=loss.dtype,
                                         device=loss.device).reshape(loss.shape)
        loss_weight = torch.as_tensor(loss_weight, dtype=torch.float64, device=loss.device)
        (dlogits,) = torch.autograd.grad((loss * loss_weight).sum(), logits)
    doubled = reference_logits(a, p, n, labels, dataclasses.replace(opts, temperature=2.0 * tau))
    finite = torch.isfinite(logits.detach())
    dlogit_dtau = torch.where(finite, -2.0 * (logits.detach() - doubled) / tau, torch.zeros_like(doubled))
    rows = torch.arange(a.shape[0], device=a.device)
    g = loss_weight.expand(a.shape[0]) / (a.shape[0] if opts.reduction == "mean" else 1)
    softmax_part = dlogits.clone()
    if opts.symmetric:  # the target is read twice, −g/2 each: at (i, l_i) and in the doc_to_query block
        softmax_part[rows, labels] += 0.5 * g
        softmax_part[rows, logits.shape[1] - a.shape[0] + rows] += 0.5 * g
    else:
        softmax_part[rows, labels] += g  # dS = σ-terms − g at the target: put the target's g back
    target_part = g * dlogit_dtau[rows, labels]
    return ((softmax_part * dlogit_dtau).abs().sum() + target_part.abs().sum()).item()


def scaled_error(actual: torch.Tensor, expected: torch.Tensor, tol: dict, min_scale: float = 0.0) -> dict:
    """How far ``actual`` is from ``expected`` under tolerance ``tol`` (rtol/atol, atol scaled).

    Args:
        actual: the tested values (any float dtype, any device).
        expected: the float64 reference, same shape.
        tol: ``dict(rtol=..., atol=...)``, e.g. ``GRAD_TOL[dtype]``.
        min_scale: floor of the atol scale (the quantity's round-off unit).

    Returns:
        ``dict(max_abs_err, err, allowed, ratio, ok)``: the largest ``|actual - expected|``; the error
        and the allowed error at the element with the worst ratio error / allowed; that ratio (inf
        for NaN or a shape mismatch); and ``ratio <= 1``.
    """
    if tuple(actual.shape) != tuple(expected.shape):
        return dict(max_abs_err=math.inf, err=math.inf, allowed=0.0, ratio=math.inf, ok=False,
                    note=f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    expected = expected.detach().double().cpu()
    actual = actual.detach().double().cpu()
    if expected.numel() == 0:
        return dict(max_abs_err=0.0, err=0.0, allowed=0.0, ratio=0.0, ok=True)
    scale = max(expected.abs().max().item(), min_scale) or 1.0
    allowed = tol["atol"] * scale + tol["rtol"] * expected.abs()
    err = (actual - expected).abs()
    err = torch.where(torch.isnan(err) | torch.isnan(actual), torch.full_like(err, math.inf), err)
    ratios = err / allowed
    worst = int(torch.argmax(ratios).item())
    ratio = ratios.reshape(-1)[worst].item()
    return dict(max_abs_err=err.max().item(), err=err.reshape(-1)[worst].item(),
                allowed=allowed.reshape(-1)[worst].item(), ratio=ratio, ok=bool(ratio <= 1.0))


def weighted_backward(loss: torch.Tensor) -> None:
    """Back-propagate ``Σ loss * w`` with fixed weights ``w = linspace(0.5, 1.5)`` over the entries of
    ``loss`` (() or (N,)), so every row's gradient is exercised with a different upstream value."""
    weight = torch.linspace(0.5, MAX_UPSTREAM_WEIGHT, loss.numel(), dtype=loss.dtype,
                            device=loss.device).reshape(loss.shape)
    (loss * weight).sum().backward()


GRAD_NAMES = ("anchors", "positives", "negatives", "temperature")


def compare_loss_and_grads(actual, expected, sources, dtype: torch.dtype, tau: float, reduction: str,
                           tau_floor: float | None = None) -> list[dict]:
    """Compare a backend's loss and gradients with their float64 references.

    Args:
        actual: ``(loss, [d_anchors, d_positives, d_negatives, d_tau])`` of the tested backend
            (absent gradients None).
        expected: the same from the float64 reference (same inputs, same upstream weights).
        sources: ``(anchors, positives, negatives)`` inputs, (N, D), (P, D), (K, D) or None.
        dtype: the input dtype (selects the tolerances).
        tau: the temperature value.
        reduction: the loss reduction.
        tau_floor: :func:`temperature_grad_floor` of the compared loss (needed when a temperature
            gradient is compared).

    Returns:
        One row per compared tensor: ``dict(tensor, max_abs_err, allowed, ratio, ok)``; a gradient
        present on one side only is a failed row (``ratio`` inf) with a ``note``.
    """
    n_rows = sources[0].shape[0]
    (act_loss, act_grads), (exp_loss, exp_grads) = actual, expected
    rows = [dict(tensor="loss", **scaled_error(act_loss, exp_loss, LOSS_TOL[dtype],
                                               loss_scale_floor(n_rows, tau, reduction)))]
    for name, act, exp, src in zip(GRAD_NAMES, act_grads, exp_grads, (*sources, None)):
        if exp is None and act is None:
            continue
        if exp is None or act is None:
            rows.append(dict(tensor=f"grad {name}", max_abs_err=math.inf, err=math.inf, allowed=0.0,
                             ratio=math.inf, ok=False, note="missing gradient" if act is None else "unexpected gradient"))
            continue
        if name == "temperature":
            if tau_floor is None:
                raise ValueError("comparing a temperature gradient needs tau_floor")
            floor = tau_floor
        else:
            floor = grad_scale_floor(name, src, n_rows, tau, reduction)
        row = dict(tensor=f"grad {name}", **scaled_error(act, exp, GRAD_TOL[dtype], floor))
        if name != "temperature" and act.dtype != src.dtype:
            row.update(ok=False, note=f"gradient dtype {act.dtype} != input dtype {src.dtype}")
        rows.append(row)
    return rows
