"""First-use self-check of the fused backends (``"triton"``, ``"cuda"``) against the ``torch`` backend.

No GPU has run these kernels in this project's CI, so each process checks them on the user's GPU
before trusting them: the first time a fused backend runs a given **key** — device, input dtype,
D, whether there are negatives, reduction, whether ``hard_negative_weight`` is non-zero,
``symmetric``, ``anchor_negatives``, MixCSE on/off, whether the temperature is learnable (a tensor
that requires grad), for Triton ``SIMCSE_TRITON_BWD``, whether ``margin`` / ``angular_margin`` are
non-zero and ``similarity`` — :func:`checked_backend` runs the
backend on a slice of the real inputs and compares its loss and the gradients of anchors,
positives, negatives and the temperature (if learnable) with the ``torch`` backend run on float64
copies of the same slice, under the per-dtype tolerances of :mod:`simcse_kernels.tolerances`
(the ones the test suite uses against the float64 oracle).

The slice: the first :data:`SLICE_ROWS` (64) anchors, positives and negatives. A target label that
points outside the slice is wrapped modulo the slice's positive rows (a positive target) or
negative rows (a negative target), so each target keeps its kind; the default labels ``arange(N)``
stay as they are. Hard negatives stay paired with their anchors (row i with column ``P + i``).

Outcome per key, remembered for the process (a dict under a lock):

* agreement: the backend is used for that key from then on, no further checks;
* disagreement, ``backend="auto"`` (also when ``SIMCSE_KERNELS_BACKEND`` chose the backend: the
  environment override of ``"auto"`` counts as ``"auto"``): one :class:`SelfCheckWarning` per key
  saying which tensor differed, by how much against its tolerance, the versions, the GPU and how
  to report it; that call and every later one with the key use the ``torch`` backend;
* disagreement, backend requested explicitly (``backend="triton"``/``"cuda"``): every call with the
  key raises :class:`~simcse_kernels.errors.SelfCheckError`.

``SIMCSE_KERNELS_SELFCHECK``: unset/``1`` checks on CUDA devices only; ``0`` turns the check off;
``force`` also checks on other devices (the CPU tests use it with the Triton interpreter). It never
runs while ``torch.compile`` traces (a compiled graph is not checked; run the loss once eagerly to
check it), nor on meta/fake tensors. fp32 inputs are checked with tf32 matmuls disabled (tf32 does
not meet the fp32 tolerances; the kernels are the same with a different dot precision).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import warnings

import torch

from .environment import short_environment
from .errors import SelfCheckError
from .options import InfoNCEOptions
from .tolerances import compare_loss_and_grads, temperature_grad_floor, weighted_backward

ENV_VAR = "SIMCSE_KERNELS_SELFCHECK"
#: rows of anchors / positives / negatives the check runs on
SLICE_ROWS = 64
FUSED_BACKENDS = ("triton", "cuda")
REPORT_HINT = ("please report it: run `python -m simcse_kernels --json report.json` on this machine and attach "
               "report.json and this message to an issue")


class SelfCheckWarning(RuntimeWarning):
    """A fused backend disagreed with the ``torch`` backend; ``backend="auto"`` falls back to ``torch``."""


@dataclasses.dataclass
class SelfCheckResult:
    """Outcome of one check: ``rows`` as :func:`~simcse_kernels.tolerances.compare_loss_and_grads`."""

    key: tuple
    backend: str
    ok: bool
    rows: list[dict]
    shapes: str

    def failures(self) -> str:
        """One line per failing tensor: max error, allowed error, ratio."""
        lines = []
        for row in self.rows:
            if row["ok"]:
                continue
            line = (f"{row['tensor']}: error {row['err']:.3g} where {row['allowed']:.3g} is allowed "
                    f"(error/allowed {row['ratio']:.3g}; max |error| {row['max_abs_err']:.3g})")
            if row.get("note"):
                line += f" [{row['note']}]"
            lines.append(line)
        return "; ".join(lines)


_lock = threading.RLock()
_results: dict[tuple, SelfCheckResult] = {}
_warned: set[tuple] = set()
_suspended = 0


def mode() -> str:
    """``"off"``, ``"cuda"`` (default: CUDA devices only) or ``"force"`` (every device), from the environment."""
    raw = os.environ.get(ENV_VAR, "1").strip().lower()
    if raw in ("0", "off", "false", "no"):
        return "off"
    if raw in ("", "1", "on", "true", "yes", "auto"):
        return "cuda"
    if raw == "force":
        return "force"
    raise ValueError(f"{ENV_VAR} must be 0 (off), 1 (check on CUDA devices, the default) or force, got {raw!r}")


def reset() -> None:
    """Forget every remembered result and warning (the next call of each key checks again)."""
    with _lock:
        _results.clear()
        _warned.clear()


def results() -> dict[tuple, SelfCheckResult]:
    """A copy of the remembered results, by key."""
    with _lock:
        return dict(_results)


@contextlib.contextmanager
def suspended():
    """No self-check inside this block (``python -m simcse_kernels`` measures the raw backends)."""
    global _suspended
    with _lock:
        _suspended += 1
    try:
        yield
    finally:
        with _lock:
            _suspended -= 1


def _is_fake(t: torch.Tensor) -> bool:
    if t.device.type == "meta":
        return True
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - old torch
        return False
    return is_fake(t)


def check_key(backend: str, anchors: torch.Tensor, negatives: torch.Tensor | None, options: InfoNCEOptions) -> tuple:
    """The key results are remembered under (see the module docstring for what it holds)."""
    tau = options.temperature
    learnable = isinstance(tau, torch.Tensor) and tau.requires_grad
    variant = os.environ.get("SIMCSE_TRITON_BWD", "") if backend == "triton" else ""
    return (backend, str(anchors.device), anchors.dtype, anchors.shape[1], negatives is not None,
            options.reduction, options.hard_negative_weight != 0.0, options.symmetric, options.anchor_negatives,
            options.mix_lambda is not None, learnable, variant, options.margin != 0.0,
            options.angular_margin != 0.0, options.similarity)


def slice_inputs(anchors, positives, negatives, labels, rows: int = SLICE_ROWS):
    """The first ``rows`` anchors, positives and negatives, and labels valid for them.

    Args:
        anchors: (N, D); positives: (P, D); negatives: (K, D) or None; labels: (N,) in [0, P + K).
        rows: slice size.

    Returns:
        ``(anchors[:s], positives[:s_p], negatives[:s_k] or None, labels')`` with ``s = min(N, rows)``
        (likewise s_p, s_k) and ``labels'`` the first s labels, a positive target ``l >= s_p``
        wrapped to ``l mod s_p`` and a negative target ``P + j`` to ``s_p + (j mod s_k)``.
    """
    n_pos = positives.shape[0]
    s, s_p = min(anchors.shape[0], rows), min(n_pos, rows)
    lab = labels[:s].to(torch.int64)
    if negatives is None:
        return anchors[:s], positives[:s_p], None, torch.remainder(lab, s_p)
    s_k = min(negatives.shape[0], rows)
    wrapped = torch.where(lab < n_pos, torch.remainder(lab, s_p), s_p + torch.remainder(lab - n_pos, s_k))
    return anchors[:s], positives[:s_p], negatives[:s_k], wrapped


def _fused_fn(backend: str):
    if backend == "triton":
        from .ops import triton_loss

        return triton_loss.triton_info_nce
    from .ops import cuda_loss

    return cuda_loss.cuda_info_nce


def _loss_and_grads(fn, tensors, labels, options, tau):
    """Loss and gradients ``[d_anchors, d_positives, d_negatives, d_tau]`` of ``fn`` on fresh leaves."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves, labels, dataclasses.replace(options, temperature=tau))
    weighted_backward(loss)
    grads = [None if leaf is None else leaf.grad for leaf in leaves]
    grads.append(tau.grad if isinstance(tau, torch.Tensor) and tau.requires_grad else None)
    return loss.detach(), grads


def run_check(backend: str, anchors, positives, negatives, labels, options: InfoNCEOptions) -> SelfCheckResult:
    """Run ``backend`` and the ``torch`` backend (float64) on a slice of the inputs and compare.

    Args:
        backend: "triton" or "cuda".
        anchors: (N, D), positives: (P, D), negatives: (K, D) or None; validated, one device/dtype.
        labels: (N,) int targets in [0, P + K).
        options: the call's options (its backend field is ignored).

    Returns:
        A :class:`SelfCheckResult` (key, per-tensor rows, ok).
    """
    from .functional import info_nce_with_options

    key = check_key(backend, anchors, negatives, options)
    tau = options.temperature
    learnable = isinstance(tau, torch.Tensor) and tau.requires_grad
    tau_value = float(tau.detach().reshape(())) if isinstance(tau, torch.Tensor) else float(tau)
    fused_options = dataclasses.replace(options, backend=backend, check_inputs=False)
    ref_options = dataclasses.replace(options, backend="torch", check_inputs=False)
    device_type = anchors.device.type
    tf32 = device_type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    try:
        if tf32:
            torch.backends.cuda.matmul.allow_tf32 = False
        # (inference_mode off: tensors created here are normal tensors autograd may save, even when the
        # caller runs under torch.inference_mode)
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
            a, p, neg, lab = slice_inputs(anchors, positives, negatives, labels)
            lab = lab.clone()
            if isinstance(tau, torch.Tensor):
                tau_fused = torch.tensor(tau_value, dtype=tau.dtype, device=tau.device, requires_grad=learnable)
            else:
                tau_fused = tau_value
            tau_ref = (torch.tensor(tau_value, dtype=torch.float64, device=anchors.device, requires_grad=True)
                       if learnable else tau_value)
            actual = _loss_and_grads(_fused_fn(backend), (a, p, neg), lab, fused_options, tau_fused)
            to64 = [None if t is None else t.detach().to(torch.float64) for t in (a, p, neg)]
            expected = _loss_and_grads(info_nce_with_options, to64, lab, ref_options, tau_ref)
    finally:
        if tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
    tau_floor_value = temperature_grad_floor(a, p, neg, lab, ref_options) if learnable else None
    rows = compare_loss_and_grads(actual, expected, (a, p, neg), anchors.dtype, tau_value, options.reduction,
                                  tau_floor=tau_floor_value)
    shapes = (f"N={a.shape[0]}, P={p.shape[0]}, K={0 if neg is None else neg.shape[0]}, D={a.shape[1]} "
              f"(slice of N={anchors.shape[0]})")
    return SelfCheckResult(key=key, backend=backend, ok=all(r["ok"] for r in rows), rows=rows, shapes=shapes)


def _describe_key(key: tuple) -> str:
    (backend, device, dtype, d, has_neg, reduction, weighted, symmetric, anchor_neg, mix, learnable,
     variant, margin, angular_margin, similarity) = key
    flags = [f"device={device}", f"dtype={str(dtype).replace('torch.', '')}", f"D={d}",
             f"negatives={has_neg}", f"reduction={reduction}", f"hard_negative_weight!=0={weighted}",
             f"symmetric={symmetric}", f"anchor_negatives={anchor_neg}", f"mixcse={mix}",
             f"learnable_temperature={learnable}", f"margin!=0={margin}",
             f"angular_margin!=0={angular_margin}", f"similarity={similarity}"]
    if variant:
        flags.append(f"SIMCSE_TRITON_BWD={variant}")
    return ", ".join(flags)


def failure_message(result: SelfCheckResult, explicit: bool) -> str:
    """The warning / error text of a failed check."""
    device = torch.device(result.key[1])
    head = (f"simcse_kernels self-check: backend {result.backend!r} disagrees with the 'torch' backend on "
            f"{result.shapes} for {_describe_key(result.key)}: {result.failures()}.")
    action = ("backend was requested explicitly, so this is an error (use backend='auto' to fall back to "
              "'torch' with a warning, or backend='torch')" if explicit
              else "falling back to backend 'torch' for these options in this process")
    return (f"{head} The {action}. Environment: {short_environment(device)}. This is a bug in simcse_kernels "
            f"or in its toolchain on this GPU; {REPORT_HINT}. ({ENV_VAR}=0 turns the check off.)")


def checked_backend(backend: str, explicit: bool, anchors, positives, negatives, labels,
                    options: InfoNCEOptions) -> str:
    """The backend to run: ``backend`` itself, or ``"torch"`` after a failed check under ``"auto"``.

    Args:
        backend: the resolved backend ("triton", "cuda"; others pass through unchecked).
        explicit: the caller asked for this backend by name (not "auto" nor its env override).
        anchors, positives, negatives, labels: the validated inputs of the call ((N, D), (P, D),
            (K, D) or None, (N,)).
        options: the call's options.

    Raises:
        SelfCheckError: the check failed and ``explicit`` is True.
    """
    if torch.compiler.is_compiling() or backend not in FUSED_BACKENDS or _suspended:
        return backend
    check = mode()
    if check == "off" or (check == "cuda" and anchors.device.type != "cuda") or _is_fake(anchors):
        return backend
    if backend == "cuda" and anchors.dtype == torch.float64 and not explicit:
        return backend  # "auto" computes float64 with the torch backend inside cuda_info_nce
    key = check_key(backend, anchors, negatives, options)
    with _lock:
        result = _results.get(key)
        if result is None:
            result = run_check(backend, anchors, positives, negatives, labels, options)
            _results[key] = result
        if result.ok:
            return backend
        first_warning = key not in _warned and not explicit
        if first_warning:
            _warned.add(key)
    if explicit:
        raise SelfCheckError(failure_message(result, explicit=True))
    if first_warning:
        warnings.warn(failure_message(result, explicit=False), SelfCheckWarning, stacklevel=4)
    return "torch"


__all__ = ["SLICE_ROWS", "SelfCheckResult", "SelfCheckWarning", "checked_backend", "mode", "reset", "results",
           "run_check", "slice_inputs", "suspended"]
