"""The package's exceptions (a leaf module: it imports nothing of the package)."""

from __future__ import annotations


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


class SelfCheckError(RuntimeError):
    """A fused backend disagreed with the ``torch`` backend in its first-use self-check."""
