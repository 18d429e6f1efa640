"""The package's exceptions (a leaf module: it imports nothing of the package)."""

from __future__ import annotations


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


class SelfCheckError(RuntimeError):
    """A fused backend disagreed with the ``torch`` backend in its first-use self-check."""


class DoubleBackwardError(RuntimeError):
    """A second derivative (``create_graph=True``) was asked of a backend that computes first ones only."""


def refuse_double_backward(backend: str, grad_enabled: bool, compiling: bool) -> None:
    """Raise :class:`DoubleBackwardError` from an autograd Function's backward run with ``create_graph=True``.

    The fused backends' backward passes are not themselves differentiable (the ``"torch"`` backend
    even forms its gradients in the forward pass), so a second derivative through them would be
    silently wrong. ``grad_enabled``: ``torch.is_grad_enabled()`` inside the backward (True only under
    ``create_graph=True``); ``compiling``: ``torch.compiler.is_compiling()`` (tracing is not a request).
    """
    if grad_enabled and not compiling:
        raise DoubleBackwardError(
            f"backend {backend!r} computes first derivatives only, so double backward (create_graph=True) "
            "would give wrong second derivatives; use backend='naive', which supports double backward")
