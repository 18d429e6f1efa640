"""Backend registry: which implementations exist here, and what ``"auto"`` picks."""

from __future__ import annotations

import importlib
import os

import torch

from .errors import BackendUnavailableError

#: below this many logits the naive matrix is faster than chunking on CPU (and small in memory)
NAIVE_MAX_LOGITS_ON_CPU = 1 << 22


def _triton_unavailable_reason(device: torch.device) -> str | None:
    try:
        module = importlib.import_module("simcse_kernels.ops.triton_loss")
    except ImportError as exc:  # triton missing, or the kernels not built into this version
        return f"the Triton backend cannot be imported ({exc})"
    reason = getattr(module, "unavailable_reason", None)
    return reason(device) if reason is not None else None


def _cuda_unavailable_reason(device: torch.device) -> str | None:
    try:
        module = importlib.import_module("simcse_kernels.ops.cuda_loss")
    except ImportError as exc:
        return f"the CUDA extension backend cannot be imported ({exc})"
    reason = getattr(module, "unavailable_reason", None)
    return reason(device) if reason is not None else None


@torch.compiler.assume_constant_result
def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device``, else a sentence saying why not.

    Evaluated once at trace time under ``torch.compile`` (it imports modules, which dynamo
    cannot trace), so ``fused_info_nce`` compiles with ``fullgraph=True``.
    """
    if backend in ("naive", "torch"):
        return None
    if backend == "triton":
        return _triton_unavailable_reason(device)
    if backend == "cuda":
        return _cuda_unavailable_reason(device)
    return f"unknown backend {backend!r}"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device``, in order of preference for ``"auto"``."""
    device = torch.device(device)
    order = ["triton", "cuda", "torch", "naive"] if device.type == "cuda" else ["torch", "naive", "triton"]
    return [b for b in order if unavailable_reason(b, device) is None]


def resolve_backend(backend: str, device: torch.device, n_logits: int) -> str:
    """Map ``backend`` (maybe ``"auto"``) to a concrete backend, or raise if unavailable.

    ``"auto"``: on CUDA the Triton kernels (then the CUDA extension, then chunked torch); on
    other devices the naive matrix while it is small (``NAIVE_MAX_LOGITS_ON_CPU`` logits),
    else the chunked torch backend. ``SIMCSE_KERNELS_BACKEND`` overrides ``"auto"``.
    """
    if backend == "auto":
        backend = os.environ.get("SIMCSE_KERNELS_BACKEND", "auto")
    if backend == "auto":
        if device.type == "cuda":
            for candidate in ("triton", "cuda"):
                if unavailable_reason(candidate, device) is None:
                    return candidate
            return "torch"
        return "naive" if n_logits <= NAIVE_MAX_LOGITS_ON_CPU else "torch"
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} is unavailable on {device}: {reason}")
    return backend
