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
#: sentence-transformers' MultipleNegativesRankingLoss directions, in the order its logits are laid out
DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
PARTITION_MODES = ("joint", "per_direction")
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
GUIDE_MARGIN_STRATEGIES = ("absolute", "relative")

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
        directions: sentence-transformers' MNRL interaction terms (math: :mod:`simcse_kernels.reference`),
            a tuple of "query_to_doc" (required), "query_to_query", "doc_to_query", "doc_to_doc"
            (anchors are the queries, positives the docs, negatives the extra docs, column k's row i
            at ``k·N + i``). ``None``: from the aliases ``symmetric`` (= ("query_to_doc",
            "doc_to_query") per_direction) and ``anchor_negatives`` (= ("query_to_doc",
            "query_to_query") joint). After construction ``symmetric`` / ``anchor_negatives`` hold
            what the directions mean (the backends read them).
        partition_mode: "joint" (one log-sum-exp over every selected term of a row) or
            "per_direction" (the mean of the per-direction log-sum-exps; only with "query_to_doc"
            and "doc_to_query").
        hardness_mode: None, "in_batch_negatives", "hard_negatives" or "all_negatives": which
            query_to_doc logits get ``hardness_strength · stop_grad(sim)`` added (not divided by tau).
        hardness_strength: alpha >= 0 of the hardness term (0: off).
        doc_to_doc_negatives: whether doc_to_doc's candidates include the negatives (True, ST's MNRL) or
            are the positives only (False: GISTEmbedLoss's positive-positive block).
        guide: GIST's guide embeddings ``(guide_anchors (N, G), guide_positives (P, G)[, guide_negatives
            (K, G)])`` (detached inputs, compared by cosine), or None. A candidate term of row i whose
            guide cosine exceeds the row's threshold (the guide cosine of its positive pair, minus
            ``guide_margin`` or ``|·|·guide_margin``) is removed, except the positive itself.
        guide_margin: the margin of the guide threshold (GIST's ``margin``).
        guide_margin_strategy: "absolute" (threshold ``t - m``) or "relative" (``t - |t|·m``).
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
    directions: tuple[str, ...] | None = None
    partition_mode: str = "joint"
    hardness_mode: str | None = None
    hardness_strength: float = 0.0
    doc_to_doc_negatives: bool = True
    guide: tuple | None = None
    guide_margin: float = 0.0
    guide_margin_strategy: str = "absolute"

    @property
    def doc_to_query_joint(self) -> bool:
        """doc_to_query inside the joint log-sum-exp (its terms: column i of the query-doc positive block)."""
        return self.directions is not None and "doc_to_query" in self.directions and self.partition_mode == "joint"

    @property
    def doc_to_doc(self) -> bool:
        """doc_to_doc: doc i against every doc except query i's own (joint)."""
        return self.directions is not None and "doc_to_doc" in self.directions

    @property
    def has_hardness(self) -> bool:
        """Whether a hardness term changes any logit (a mode and a strength > 0)."""
        return self.hardness_mode is not None and self.hardness_strength > 0.0

    @property
    def has_column_term(self) -> bool:
        """Whether a doc_to_query term (a column of the query-doc positive block) enters the loss."""
        return self.symmetric or self.doc_to_query_joint

    @property
    def needs_own_docs(self) -> bool:
        """Options defined on sentence-transformers' layout (P = N, K = n·N, default labels)."""
        return self.doc_to_query_joint or self.doc_to_doc or self.has_hardness or self.guide is not None

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
        self._check_directions()

    def _check_directions(self) -> None:
        """Validate directions / partition_mode / hardness and set the aliases they imply."""
        if self.partition_mode not in PARTITION_MODES:
            raise ValueError(f"partition_mode must be one of {PARTITION_MODES}, got {self.partition_mode!r}")
        if self.hardness_mode not in HARDNESS_MODES:
            raise ValueError(f"hardness_mode must be one of {HARDNESS_MODES}, got {self.hardness_mode!r}")
        h = self.hardness_strength
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h) or h < 0:
            raise ValueError(f"hardness_strength must be a finite number >= 0, got {h!r}")
        if self.hardness_mode is None and h != 0.0:
            raise ValueError(f"hardness_strength={h!r} is set but hardness_mode is None (pick one of "
                             f"{HARDNESS_MODES[1:]})")
        dirs = self.directions
        if dirs is None:
            if self.partition_mode == "per_direction" and self.anchor_negatives:
                raise ValueError("partition_mode='per_direction' is not defined with anchor_negatives=True (the "
                                 "'query_to_query' direction never holds the positive); use 'joint'")
        else:
            if isinstance(dirs, str) or not isinstance(dirs, (tuple, list)) or not dirs:
                raise ValueError(f"directions must be a non-empty tuple of {DIRECTIONS}, got {dirs!r}")
            unknown = [d for d in dirs if d not in DIRECTIONS]
            if unknown:
                raise ValueError(f"directions: unknown {unknown!r}; valid: {DIRECTIONS}")
            if len(set(dirs)) != len(dirs):
                raise ValueError(f"directions lists a direction twice: {tuple(dirs)!r}")
            if "query_to_doc" not in dirs:
                raise ValueError(f"directions must include 'query_to_doc' (it holds the positive pair), got "
                                 f"{tuple(dirs)!r}")
            if self.partition_mode == "per_direction" and {"query_to_query", "doc_to_doc"} & set(dirs):
                raise ValueError("partition_mode='per_direction' is defined only for 'query_to_doc' and "
                                 "'doc_to_query' (the same-type directions never hold the positive); use 'joint'")
            canonical = tuple(d for d in DIRECTIONS if d in dirs)
            per_dir_d2q = "doc_to_query" in dirs and self.partition_mode == "per_direction"
            if self.symmetric and not per_dir_d2q:
                raise ValueError(f"symmetric=True means directions=('query_to_doc', 'doc_to_query') with "
                                 f"partition_mode='per_direction'; it contradicts directions={tuple(dirs)!r}, "
                                 f"partition_mode={self.partition_mode!r} (pass one or the other)")
            if self.anchor_negatives and "query_to_query" not in dirs:
                raise ValueError(f"anchor_negatives=True means the 'query_to_query' direction; it contradicts "
                                 f"directions={tuple(dirs)!r} (pass one or the other)")
            object.__setattr__(self, "directions", canonical)
            object.__setattr__(self, "symmetric", per_dir_d2q)
            object.__setattr__(self, "anchor_negatives", "query_to_query" in dirs)
        if self.mix_lambda is not None and (self.doc_to_query_joint or self.doc_to_doc or self.hardness_mode
                                            or self.guide is not None):
            raise ValueError("mix_lambda (MixCSE) is not defined with a joint 'doc_to_query', 'doc_to_doc', a "
                             "hardness_mode or a guide (sentence-transformers' layout has no mixed blocks)")
        if not isinstance(self.doc_to_doc_negatives, bool):
            raise TypeError(f"doc_to_doc_negatives must be a bool, got {self.doc_to_doc_negatives!r}")
        gm = self.guide_margin
        if isinstance(gm, bool) or not isinstance(gm, (int, float)) or not math.isfinite(gm):
            raise ValueError(f"guide_margin must be a finite number, got {gm!r}")
        if self.guide_margin_strategy not in GUIDE_MARGIN_STRATEGIES:
            raise ValueError(f"guide_margin_strategy must be one of {GUIDE_MARGIN_STRATEGIES}, got "
                             f"{self.guide_margin_strategy!r}")
        g = self.guide
        if g is not None and (not isinstance(g, (tuple, list)) or len(g) not in (2, 3)
                              or not all(isinstance(t, torch.Tensor) for t in g)):
            raise ValueError("guide must be None or a tuple of 2 or 3 tensors (guide_anchors, guide_positives"
                             "[, guide_negatives])")
        if g is not None:
            object.__setattr__(self, "guide", tuple(g))


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
