"""Drop-ins for pytorch-metric-learning's ``CosFaceLoss`` and ``ArcFaceLoss`` (issue 21).

Same constructor arguments and units as PML (``margin`` of ArcFace in degrees, ``scale`` the logit
scale s = 1/tau), the same weight ``W`` of shape (embedding_size, num_classes) with PML's
initialization (``torch.nn.init.normal_``), so a ``state_dict`` moves between the two, and
``forward(embeddings, labels)`` returns PML's loss value (the mean over rows of the margin
cross-entropy). The loss runs through :func:`simcse_kernels.fused_info_nce` with the class
weights as candidates: it never builds the N x C logit matrix (PML builds it several times).

PML is not imported here (it stays optional). PML options that change the loss and are not
implemented here (``reducer``, ``distance``, ``weight_regularizer``, ``embedding_regularizer``,
``indices_tuple`` miners, ``ref_emb``) raise a ``ValueError`` naming the argument.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..functional import fused_info_nce

#: PML keyword arguments whose default (None / no-op) is the only supported value
_UNSUPPORTED = ("reducer", "distance", "weight_regularizer", "embedding_regularizer")


class _FusedMarginSoftmaxLoss(torch.nn.Module):
    """Shared body: ``W`` (embedding_size, num_classes), scale, margins in radians / cosine units."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float, scale: float, *,
                 additive_margin: float, angular_margin: float, weight_init_func: Callable | None = None,
                 collect_stats: bool = False, backend: str = "auto", chunk_budget_mib: float | None = None,
                 **pml_kwargs):
        super().__init__()
        for name, value in pml_kwargs.items():
            if name in _UNSUPPORTED and value is None:
                continue
            if name in ("weight_reg_weight", "embedding_reg_weight"):
                continue  # only used together with a regularizer (refused above when set)
            raise ValueError(f"{name} is not supported by {type(self).__name__} (pytorch-metric-learning's "
                             f"option; use PML's loss for it)")
        if int(num_classes) < 1 or int(embedding_size) < 1:
            raise ValueError(f"num_classes and embedding_size must be >= 1, got {num_classes}, {embedding_size}")
        if not math.isfinite(float(scale)) or float(scale) <= 0:
            raise ValueError(f"scale must be a finite positive number, got {scale!r}")
        self.num_classes = int(num_classes)
        self.margin = margin
        self.scale = float(scale)
        self.collect_stats = collect_stats
        self._additive_margin = float(additive_margin)
        self._angular_margin = float(angular_margin)
        self.backend = backend
        self.chunk_budget_mib = chunk_budget_mib
        self.W = torch.nn.Parameter(torch.empty(int(embedding_size), int(num_classes)))
        (weight_init_func or torch.nn.init.normal_)(self.W)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple=None, ref_emb=None,
                ref_labels=None) -> torch.Tensor:
        """Mean margin cross-entropy of ``embeddings`` (N, D) against the classes ``labels`` (N,)."""
        if labels is None:
            raise ValueError("labels are required (class ids, shape (N,))")
        for name, value in (("indices_tuple", indices_tuple), ("ref_emb", ref_emb), ("ref_labels", ref_labels)):
            if value is not None:
                raise ValueError(f"{name} is not supported by {type(self).__name__}")
        if embeddings.dtype != self.W.dtype or embeddings.device != self.W.device:
            # as PML's cast_types: the weight follows the embeddings' dtype and device
            self.W.data = self.W.data.to(device=embeddings.device, dtype=embeddings.dtype)
        return fused_info_nce(embeddings, self.W.t(), labels=labels.to(torch.int64), temperature=1.0 / self.scale,
                              margin=self._additive_margin, angular_margin=self._angular_margin,
                              backend=self.backend, chunk_budget_mib=self.chunk_budget_mib).to(embeddings.dtype)


class FusedCosFaceLoss(_FusedMarginSoftmaxLoss):
    """CosFace / AM-softmax: target logit ``scale·(cos − margin)``; PML's ``CosFaceLoss``."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.35, scale: float = 64, **kwargs):
        if not math.isfinite(float(margin)) or float(margin) < 0:
            raise ValueError(f"margin must be a finite non-negative number, got {margin!r}")
        super().__init__(num_classes, embedding_size, margin, scale, additive_margin=margin, angular_margin=0.0,
                         **kwargs)


class FusedArcFaceLoss(_FusedMarginSoftmaxLoss):
    """ArcFace: target logit ``scale·cos(θ + m)`` with ``margin`` in degrees; PML's ``ArcFaceLoss``.

    After construction ``self.margin`` is in radians, as in PML (its ``init_margin``).
    """

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6, scale: float = 64, **kwargs):
        if not math.isfinite(float(margin)) or not 0 <= float(margin) < 180:
            raise ValueError(f"margin must be in [0, 180) degrees, got {margin!r}")
        radians = math.radians(float(margin))
        super().__init__(num_classes, embedding_size, radians, scale, additive_margin=0.0, angular_margin=radians,
                         **kwargs)
