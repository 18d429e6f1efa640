"""The loss options, bundled in one dataclass (as apple's ml-cross-entropy does).

Every backend receives the same :class:`InfoNCEOptions`; the math each option adds is written
once, in :mod:`simcse_kernels.reference`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "sum", "none")
SIMILARITIES = ("cosine", "dot")
BACKENDS = ("auto", "naive", "torch", "triton", "cuda")

Temperature = float | torch.Tensor


@dataclass(frozen=True)
class InfoNCEOptions:
    """Options of the InfoNCE loss family.

    Attributes:
        temperature: tau > 0, a Python number or a 0-dim tensor (may require grad: learnable).
        hard_negative_weight: w, a log-weight added to the logit of each row's own paired hard
            negative (column ``P + i``) and, with MixCSE, to the diagonal of both mixed blocks
            (as MixCSE's official code does). 0 means no weighting.
        symmetric: average the row loss with the column-direction loss (each positive against
            all anchors), as sentence-transformers' MultipleNegativesSymmetricRankingLoss.
        anchor_negatives: also use the other anchors as negatives (cos(a_i, a_k)/tau, k != i).
        mix_lambda: MixCSE's lambda; ``None`` disables the mixed-negative blocks.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per anchor row).
        backend: ``"auto"``, ``"naive"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
        check_inputs: scan inputs for NaN/inf and labels for range (one device sync). Turn off in
            tight loops once the pipeline is known to be sane.
        margin: additive cosine margin m >= 0 on each row's target logit (AM-softmax, CosFace,
            LaBSE): the target logit becomes ``(cos - m) / tau`` (``(a·c - m) / tau`` with
            ``similarity="dot"``).
        angular_margin: additive angular margin m_a in [0, pi) radians on each row's target
            (ArcFace, ArcCSE): the target cosine becomes ``cos(theta + m_a)`` (monotonic fallback
            ``cos - m_a·sin(m_a)`` where ``theta > pi - m_a``); combines with ``margin``.
        similarity: ``"cosine"`` (normalized rows) or ``"dot"`` (raw dot products, no
            normalization; ``angular_margin`` and ``mix_lambda`` are undefined there).
        chunk_budget_mib: memory budget (MiB) of the (R, M) gradient chunk of the row-chunked
            gradient paths (``"torch"`` and the fused backends); ``None``: the environment
            variable ``SIMCSE_KERNELS_CHUNK_MIB``, else 256 (the ``"torch"`` backend's symmetric
            loss: at least min(D/64, 16) x the feature bytes, room for first-pass logit rows it
            keeps; :func:`simcse_kernels.ops.chunked.symmetric_cache_rows`). Extra memory is
            O(R·M + (N + M)·D). Class-weight heads (P >= 4N candidates, no other option; the
            ``"torch"`` backend, :mod:`simcse_kernels.ops.chunked_class_head`): the budget of the one
            logit buffer, default 64 MiB; extra memory is the budget + O(N + P) + O(N·D).
    """

    temperature: Temperature = 0.05
    hard_negative_weight: float = 0.0
    symmetric: bool = False
    anchor_negatives: bool = False
    mix_lambda: float | None = None
    reduction: str = "mean"
    backend: str = "auto"
    check_inputs: bool = True
    chunk_budget_mib: float | None = None
    margin: float = 0.0
    angular_margin: float = 0.0
    similarity: str = "cosine"

    @property
    def has_margin(self) -> bool:
        """Whether any margin modifies the target logits."""
        return self.margin != 0.0 or self.angular_margin != 0.0

    def __post_init__(self) -> None:
        check_temperature_value(self.temperature)
        w = self.hard_negative_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"hard_negative_weight must be a finite number, got {w!r}")
        if self.mix_lambda is not None:
            lam = self.mix_lambda
            if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (0.0 <= lam <= 1.0):
                raise ValueError(f"mix_lambda must be a number in [0, 1] or None, got {lam!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        budget = self.chunk_budget_mib
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not math.isfinite(budget) or budget <= 0):
            raise ValueError(f"chunk_budget_mib must be a positive number of MiB or None, got {budget!r}")
        m = self.margin
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0:
            raise ValueError(f"margin must be a finite number >= 0 (an additive cosine margin), got {m!r}")
        ma = self.angular_margin
        if isinstance(ma, bool) or not isinstance(ma, (int, float)) or not (0.0 <= ma < math.pi):
            raise ValueError(f"angular_margin must be a number of radians in [0, pi), got {ma!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.similarity == "dot" and ma != 0.0:
            raise ValueError("angular_margin needs similarity='cosine': an angle is defined between "
                             "normalized rows, not for raw dot products")
        if self.similarity == "dot" and self.mix_lambda is not None:
            raise ValueError("mix_lambda (MixCSE) needs similarity='cosine': its mixtures are compared by "
                             "cosine, as in MixCSE")
        for name in ("symmetric", "anchor_negatives", "check_inputs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")


def check_temperature_value(temperature: Temperature) -> None:
    """Raise unless ``temperature`` is a positive finite number or a 1-element float tensor."""
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1 or temperature.dim() > 1:
            raise ValueError(
                f"temperature tensor must be 0-dim (a scalar), got shape {tuple(temperature.shape)}"
            )
        if not temperature.is_floating_point():
            raise TypeError(f"temperature tensor must be floating point, got {temperature.dtype}")
        if temperature.device.type == "meta" or torch.compiler.is_compiling():
            return  # no value to read (meta) or no sync wanted inside a compiled graph
        value = float(temperature.detach().reshape(()).item())
    elif isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float or a 0-dim tensor, got {type(temperature).__name__}")
    else:
        value = float(temperature)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"temperature must be positive and finite, got {value}")
