"""``fused_info_nce``: the public functional API and the backend dispatch."""

from __future__ import annotations

import torch

from .backends import resolve_backend
from .ops.chunked import chunked_per_row_loss, chunked_scalar_loss
from .ops.chunked_class_head import class_head_applies, class_head_loss
from .ops.features import normalized_features, without_huge_rows
from .options import InfoNCEOptions, Temperature
from .reference import reduce_loss, reference_loss
from .selfcheck import checked_backend
from .validation import validate_inputs


def fused_info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    temperature: Temperature = 0.05,
    hard_negative_weight: float = 0.0,
    symmetric: bool = False,
    anchor_negatives: bool = False,
    mix_lambda: float | None = None,
    labels: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    check_inputs: bool = True,
    chunk_budget_mib: float | None = None,
    margin: float = 0.0,
    angular_margin: float = 0.0,
    similarity: str = "cosine",
    directions: tuple[str, ...] | None = None,
    partition_mode: str = "joint",
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    doc_to_doc_negatives: bool = True,
    guide: tuple | None = None,
    guide_margin: float = 0.0,
    guide_margin_strategy: str = "absolute",
) -> torch.Tensor:
    """InfoNCE over cosine similarities, without materializing the N x M matrix.

    Drop-in for ``F.cross_entropy(F.normalize(a) @ F.normalize(p).T / tau, arange(N))`` and its
    SimCSE / sup-SimCSE / MixCSE / symmetric variants (math: :mod:`simcse_kernels.reference`).

    Args:
        anchors: (N, D) anchor embeddings.
        positives: (P, D) positives; row ``labels[i]`` (default ``i``) is anchor i's target.
        negatives: (K, D) extra negatives (SimCSE hard negatives: row i pairs with anchor i).
        temperature: tau > 0, float or 0-dim tensor (learnable: its gradient is exact).
        hard_negative_weight: log-weight w added to column ``P + i`` (and to MixCSE's mixed
            diagonals).
        symmetric: also the positives -> anchors direction, averaged.
        anchor_negatives: the other anchors are negatives too.
        mix_lambda: MixCSE mixing coefficient in [0, 1] (None = off).
        labels: (N,) target columns in [0, P + K).
        reduction: "mean" | "sum" | "none".
        backend: "auto" | "naive" | "torch" | "triton" | "cuda".
        check_inputs: check NaN/inf and label range (costs one device sync).
        chunk_budget_mib: memory budget (MiB) of the (R, M) gradient chunk; None: the
            environment variable ``SIMCSE_KERNELS_CHUNK_MIB``, else 256 (the ``"torch"``
            symmetric loss: at least min(D/64, 16) x the feature bytes, for kept logit rows).
        margin: additive cosine margin m >= 0 on each target logit, ``(cos - m)/tau``
            (AM-softmax, CosFace, LaBSE).
        angular_margin: angular margin in radians, [0, pi), on each target: ``cos(theta + m)``
            (ArcFace, ArcCSE); combines with ``margin``.
        similarity: "cosine" (default) or "dot" (raw dot products ``a_i·c_j / tau``).
        directions: sentence-transformers' MNRL terms, a tuple of "query_to_doc" (required),
            "query_to_query", "doc_to_query", "doc_to_doc"; None: from ``symmetric`` /
            ``anchor_negatives`` (their aliases).
        partition_mode: "joint" (one log-sum-exp over every term) or "per_direction" (mean of the
            directions' log-sum-exps; query_to_doc / doc_to_query only).
        hardness_mode: None | "in_batch_negatives" | "hard_negatives" | "all_negatives": the
            query_to_doc logits that get ``hardness_strength · stop_grad(sim)`` (not divided by tau).
        hardness_strength: alpha >= 0 of the hardness term.
        doc_to_doc_negatives: False: doc_to_doc against the positives only (GIST's positive-positive block).
        guide: GIST's guide embeddings ``(guide_anchors, guide_positives[, guide_negatives])``: candidates the
            guide finds more similar than the row's positive pair (minus the margin) are removed.
        guide_margin, guide_margin_strategy: the guide threshold's margin, "absolute" or "relative".

    Returns:
        The loss in float32 (float64 for float64 inputs); shape () or (N,) for "none".
        Gradients reach anchors, positives, negatives and temperature in their own dtypes.
    """
    options = InfoNCEOptions(
        temperature=temperature,
        hard_negative_weight=hard_negative_weight,
        symmetric=symmetric,
        anchor_negatives=anchor_negatives,
        mix_lambda=mix_lambda,
        reduction=reduction,
        backend=backend,
        check_inputs=check_inputs,
        chunk_budget_mib=chunk_budget_mib,
        margin=margin,
        angular_margin=angular_margin,
        similarity=similarity,
        directions=directions,
        partition_mode=partition_mode,
        hardness_mode=hardness_mode,
        hardness_strength=hardness_strength,
        doc_to_doc_negatives=doc_to_doc_negatives,
        guide=guide,
        guide_margin=guide_margin,
        guide_margin_strategy=guide_margin_strategy,
    )
    return info_nce_with_options(anchors, positives, negatives, labels, options)


def _n_logits(anchors, positives, negatives, options: InfoNCEOptions) -> int:
    n, p = anchors.shape[0], positives.shape[0]
    k = 0 if negatives is None else negatives.shape[0]
    extra = n * (int(options.anchor_negatives) + (2 if options.mix_lambda is not None else 0)
                 + int(options.has_column_term)) + (p + k if options.doc_to_doc_negatives else p) * int(
        options.doc_to_doc)
    return n * (p + k + extra)


def info_nce_with_options(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    labels: torch.Tensor | None,
    options: InfoNCEOptions,
) -> torch.Tensor:
    """:func:`fused_info_nce` with its options already bundled (used by the module)."""
    negatives, labels = validate_inputs(anchors, positives, negatives, labels, options)
    backend = resolve_backend(options.backend, anchors.device, _n_logits(anchors, positives, negatives, options))
    if backend == "naive":
        return reference_loss(anchors, positives, negatives, labels, options)
    anchors, positives, negatives = without_huge_rows(anchors, positives, negatives, options)
    if backend in ("triton", "cuda") and options.needs_own_docs:
        # TODO(issue 22): a joint doc_to_query, doc_to_doc, hardness and the guide in the Triton / CUDA kernels
        if options.backend != "auto":
            raise NotImplementedError(f"a joint 'doc_to_query', 'doc_to_doc', hardness_mode and guide are not yet "
                                      f"implemented in backend {backend!r}; use backend='torch' or 'naive'")
        backend = "torch"  # auto: the chunked torch backend implements them
    if backend in ("triton", "cuda"):  # first use of this option set: compare with "torch" (selfcheck.py)
        backend = checked_backend(backend, options.backend != "auto", anchors, positives, negatives, labels,
                                  options)
    if backend == "triton":
        from .ops.triton_loss import triton_info_nce

        return triton_info_nce(anchors, positives, negatives, labels, options)
    if backend == "cuda":
        from .ops.cuda_loss import cuda_info_nce

        return cuda_info_nce(anchors, positives, negatives, labels, options)
    if class_head_applies(anchors, positives, negatives, options):  # P >> N class weights: no (P, D) copy
        return class_head_loss(anchors, positives, labels, options)
    feats = normalized_features(anchors, positives, negatives, options)
    if options.reduction != "none":  # gradient formed in the forward pass (3 GEMM-equivalents)
        return chunked_scalar_loss(feats, labels, options)
    return reduce_loss(chunked_per_row_loss(feats, labels, options), options.reduction)
