r"""The naive full-matrix loss: the oracle every backend is tested against, and the baseline.

This file is the one place where the math of every option is written down.

Notation
--------
``a`` (N, D) anchors, ``p`` (P, D) positives (P = N in the usual case), ``n`` (K, D) optional
negatives, ``x̂ = x / max(‖x‖, eps)`` (``F.normalize``; a zero vector stays zero, no NaN; a row with
|x| >= 2^40 is first scaled by an exact power of two, :func:`huge_row_scale`, so no norm
overflows), and
temperature ``tau``. Candidates are ``c = [p; n]`` (M = P + K rows); row ``i``'s target is column
``l_i = labels[i]`` (default ``i``).

Blocks of row ``i`` (each column a logit; the row's loss is a cross-entropy over all of them):

1. positives ``s_ij = â_i·p̂_j / tau`` for j < P.
2. negatives ``s_i,P+j = â_i·n̂_j / tau + w·[j == i]`` — ``hard_negative_weight`` w is a
   log-weight on row i's own paired hard negative, column ``P + i`` (SimCSE's ``z3_weight``).
3. ``anchor_negatives=True``: ``â_i·â_k / tau`` for k != i (column k = i is left out), the
   2N-2-negatives form of NT-Xent.
4. ``mix_lambda`` λ (MixCSE, Zhang et al. AAAI 2022; official code
   ``BDBC-KG-NLP/MixCSE_AAAI2022/mixcse/models_mix.py``, ``cl_forward``):

   * ``mix3_j = λ·p_j + (1-λ)·p_{(j+1) mod N}``, detached (stop-gradient). Block
     ``â_i·mix3̂_j / tau``; entry ``(i, (i-1) mod N)`` — the mixture that contains row i's own
     positive — is set to logit 0 (the official code multiplies by a shifted-eye mask after the
     division by tau); then ``+w`` on the block's diagonal (the official code adds
     ``hard_negative_weight`` to each mixed block's diagonal).
   * ``mix4_i = λ·a_i + (1-λ)·a_{(i+1) mod N}``, detached. Block ``mix4̂_i·p̂_j / tau`` (gradient
     only to p); entry ``(i, (i+1) mod N)`` set to 0; ``+w`` on the diagonal.

   Mixing happens on the raw (un-normalized) embeddings, then the cosine is taken, as there.

Margins and similarity (``margin`` m, ``angular_margin`` m_a, ``similarity``)
---------------------------------------------------------------------------
Only the target entry ``(i, l_i)`` of each row changes. With ``c = â_i·ĉ_{l_i}`` its cosine, the
target logit is ``(f(c) − m) / tau`` (+ the entry's constant, e.g. ``w`` when the target is the
paired hard negative), where ``f(c) = c`` without an angular margin, and with one (ArcFace,
ArcCSE; as pytorch-metric-learning's ArcFaceLoss and InsightFace)::

    c' = clamp(c, −1 + 1e−7, 1 − 1e−7),  θ = acos(c')
    f(c) = cos(θ + m_a)            if θ <= π − m_a
           c' − m_a·sin(m_a)       otherwise (keeps the logit monotonic in c)

``f'(c) = cos(m_a) + sin(m_a)·c'/sqrt(1 − c'²)`` on the first branch and 1 on the second, times
0 where the clamp is active (finite at c ≈ 1: at most ~2.2e3·sin(m_a)). ``similarity="dot"``
uses raw dot products ``a_i·c_j`` (no normalization) in every block; ``m`` still applies, ``m_a``
and MixCSE do not exist there. With ``symmetric=True`` the column direction reads the same
modified matrix, so a margin on entry (i, l_i) also acts on column l_i's target (bidirectional
AM-softmax, LaBSE).

Row loss ``ℓ_i = logsumexp_j s_ij − s_{i,l_i}``.

``symmetric=True`` (sentence-transformers' symmetric MNRL): with ``S`` the positives block,
``ℓ'_i = logsumexp_k S_{k,l_i} − S_{i,l_i}`` (target column against all anchors; labels must be
< P) and the per-row loss becomes ``(ℓ_i + ℓ'_i) / 2``. For default labels this is
``(CE(S_full, arange) + CE(S.T, arange)) / 2``.

sentence-transformers' MultipleNegativesRankingLoss (``directions``, ``partition_mode``, ``hardness_mode``)
-------------------------------------------------------------------------------------------------------
Layout (ST 6.3, ``compute_loss_from_embeddings``): queries ``q = a`` (N), docs ``d = [p; n]`` with
``p`` the positives (P = N) and ``n`` the n negative columns stacked (K = n·N, column k's row i at
``k·N + i``). Query i's *own docs* are positive i and the negatives ``k·N + i``; ``own(i, j)`` means
``j mod N == i`` for a doc index j in [0, P + K). ``sim`` is the cosine (or the dot product) and
``s = sim / tau`` (margins: the target entry ``(i, i)`` of the query-doc block is ``(f(c) − m)/tau``
wherever it is read, so also inside doc_to_query). The terms of row i, by direction:

* ``query_to_doc`` (always): ``QD_ij = s(q_i, d_j) + h_ij`` for every doc j < P + K (+ ``w`` at
  ``j = P + i``, ``hard_negative_weight``). The positive score is ``QD_ii`` (its h is 0).
* ``query_to_query``: ``s(q_i, q_k)`` for k != i (= ``anchor_negatives``).
* ``doc_to_query``: ``S_ki = s(q_k, p_i)`` for every k (column i of the query-doc positive block,
  without h; its k = i entry is the positive pair again).
* ``doc_to_doc``: ``s(p_i, d_j)`` for every doc j with ``not own(i, j)`` (doc i's own docs, itself
  included, are left out).

Hardness (``hardness_mode``, alpha = ``hardness_strength``): ``h_ij = alpha·stop_grad(sim(q_i, d_j))``
(not divided by tau) on the query_to_doc entries the mode selects, 0 elsewhere:
``"in_batch_negatives"``: ``not own(i, j)``; ``"hard_negatives"``: ``own(i, j) and j >= P`` (row i's
own negatives only); ``"all_negatives"``: every j except the positive ``j = i``. h has no gradient
(neither to the features nor to tau): it only reweights the softmax.

Partition: ``"joint"``: ``ℓ_i = logsumexp(all selected terms of row i) − QD_ii``.
``"per_direction"`` (query_to_doc, and doc_to_query, only): ``ℓ_i = mean over the directions of their
logsumexp − QD_ii``; with both it is ``symmetric=True`` (the hardness h enters only query_to_doc's
lse). The aliases: ``symmetric=True`` = (query_to_doc, doc_to_query) per_direction;
``anchor_negatives=True`` = (query_to_doc, query_to_query) joint; both = the two lse's
``lse(QD_i ∪ QQ_i)`` and ``lse(S_{:,l_i})``, averaged. A joint doc_to_query, doc_to_doc and any
hardness need ST's layout: default labels, P = N, K a multiple of N; MixCSE is not defined with
them (``ValueError``). Margins keep their meaning (the target entry only).

Guide (GISTEmbedLoss, Solatorio 2024; ``guide=(ĝa, ĝp[, ĝn])``, ``guide_margin`` m): with the guide rows
compared by cosine, row i's threshold is ``t_i = cos(ĝa_i, ĝp_i)`` and ``cut_i = t_i − m`` ("absolute") or
``t_i − |t_i|·m`` ("relative"). Every term of row i whose guide cosine exceeds ``cut_i`` is removed (logit
−inf, no gradient): query_to_doc ``cos(ĝa_i, ĝd_j)`` (never the positive j = i), query_to_query
``cos(ĝa_i, ĝa_k)``, doc_to_doc ``cos(ĝp_i, ĝd_j)``; doc_to_query reads the masked query-doc block (its
entry (k, i) is removed by row k's rule). ``doc_to_doc_negatives=False`` restricts doc_to_doc to the
positives (GIST's positive-positive block). GIST is (query_to_doc [, query_to_query if contrast_anchors]
[, doc_to_doc over the positives if contrast_positives]) joint with the guide. The guide needs ST's layout
(default labels, P = N, K = n·N).

Gradient: with ``L_i`` the joint lse of row i and ``g_i = ∂L/∂ℓ_i``, every term t of row i gets
``g_i·exp(t − L_i)``, the target ``QD_ii`` gets ``−g_i`` more. A query-doc positive entry
``S_kj`` is read twice: as ``QD_kj`` (row k, with h_kj) and as row j's doc_to_query term, so
``∂L/∂S_kj = g_k exp(QD_kj − L_k) + g_j exp(S_kj − L_j) − g_k [k = j]``; per_direction halves each
row part and uses ``lse_j(S_{:,j})`` for the column part (the ``symmetric`` formula above). A
doc_to_doc entry passes ``dS·d̂_j/tau`` to p̂_i and ``dS·p̂_i/tau`` to d̂_j (d = p for j < P).
The hardness term passes nothing; ``∂QD_ij/∂tau = −sim_ij/tau²`` as for any logit.

Reduction: ``mean`` over rows, ``sum``, or ``none`` (N,).

Gradient (used by every fused backend; see :mod:`simcse_kernels.ops.chunked`)
----------------------------------------------------------------------------
With ``g_i = ∂L/∂ℓ_i`` and ``σ_ij = exp(s_ij − lse_i)``, ``∂L/∂s_ij = g_i (σ_ij − [j = l_i])``
(×½ on the softmax part when symmetric, plus ``G_j exp(S_kj − clse_j)`` on the positives block,
``G_j = ½ Σ_{i: l_i = j} g_i``). A logit ``s = x̂·ŷ/tau`` passes ``dS·ŷ/tau`` to x̂, ``dS·x̂/tau``
to ŷ and ``−dS·s_cos/tau²`` to tau; constant (masked) logits pass nothing. A margined target
``(f(c) − m)/tau`` passes ``dS·f'(c)·ŷ/tau`` to x̂ (likewise to ŷ) and ``−dS·(f(c) − m)/tau²`` to
tau (:func:`margin_target_grad`). The normalization backward is
``∂x = (∂x̂ − x̂ (x̂·∂x̂)) / max(‖x‖, eps)``; ``similarity="dot"`` has no normalization.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .options import InfoNCEOptions, Temperature
from .validation import validate_inputs

NORM_EPS = 1e-12
#: ArcFace's clamp of the target cosine before acos (keeps f'(c) finite at c = ±1)
ARC_COS_CLAMP = 1e-7
#: a row whose largest |x| reaches this is scaled by a power of two before its norm (see ``huge_row_scale``)
HUGE_ROW = 2.0 ** 40


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def huge_row_scale(x: torch.Tensor, per_tensor: bool = False) -> torch.Tensor:
    """The power of two ``2^-e`` (shape (rows, 1), dtype of ``x``) that brings a huge row's max |x| into [0.5, 1).

    ``e`` is the binary exponent of the row's largest |x| (``torch.frexp``). Rows below ``HUGE_ROW``
    (2^40) get 1. The cosine is scale-invariant, so ``x * scale`` has the same cosines and, with the
    scale held constant (detached), the same first and second derivatives; a power of two makes the
    product exact. Without it, fp32 rows with |x| >= 1e19 overflow the sum of squares (and the raw
    dots of the fused kernels). Tiny rows need nothing: their norm is below ``NORM_EPS``, where
    ``F.normalize`` divides by the constant eps anyway. ``per_tensor``: one scale for the whole tensor
    (the largest row's), for MixCSE's mixtures of neighbouring rows, whose direction a per-row scale
    would change.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    # max |x| per row from the row's min and max: no (rows, D) temporary (the inf-norm makes |x|)
    if x.shape[-1] > 0:
        lo, hi = torch.aminmax(x.detach(), dim=-1, keepdim=True)
        amax = torch.maximum(hi, -lo).to(compute)
    else:
        amax = torch.linalg.vector_norm(x.detach(), float("inf"), dim=-1, keepdim=True).to(compute)
    if per_tensor:
        amax = amax.amax().reshape(1, 1)
    _, exponent = torch.frexp(amax)
    one = torch.ones_like(amax, dtype=torch.float64)
    scale = torch.where(amax >= HUGE_ROW, torch.pow(2.0, -exponent.to(torch.float64)), one)
    return scale.to(x.dtype)


def unit_rows_reference(x: torch.Tensor) -> torch.Tensor:
    """``x̂ = x / max(‖x‖, eps)``: ``F.normalize`` after ``huge_row_scale`` (no overflow up to finfo.max)."""
    return F.normalize(x * huge_row_scale(x), dim=-1, eps=NORM_EPS)


def mixed_features(x: torch.Tensor, mix_lambda: float) -> torch.Tensor:
    """MixCSE's detached mixture ``λ·x_j + (1-λ)·x_{(j+1) mod N}`` (raw, not normalized)."""
    x = x.detach()
    return mix_lambda * x + (1.0 - mix_lambda) * torch.roll(x, shifts=-1, dims=0)


def margin_target_logit_cos(cos: torch.Tensor, margin: float, angular_margin: float) -> torch.Tensor:
    """``f(c) − m``: the margin-modified target similarity (before ``/ tau``; see the module docstring)."""
    if angular_margin:
        c = cos.clamp(-1.0 + ARC_COS_CLAMP, 1.0 - ARC_COS_CLAMP)
        theta = torch.acos(c)
        cos = torch.where(theta <= math.pi - angular_margin, torch.cos(theta + angular_margin),
                          c - angular_margin * math.sin(angular_margin))
    return cos - margin


def margin_target_grad(cos: torch.Tensor, angular_margin: float) -> torch.Tensor:
    """``f'(c)``: the derivative of :func:`margin_target_logit_cos` in ``c`` (the additive margin's is 1)."""
    if not angular_margin:
        return torch.ones_like(cos)
    lo, hi = -1.0 + ARC_COS_CLAMP, 1.0 - ARC_COS_CLAMP
    c = cos.clamp(lo, hi)
    arc = math.cos(angular_margin) + math.sin(angular_margin) * c / torch.sqrt(1.0 - c * c)
    grad = torch.where(torch.acos(c) <= math.pi - angular_margin, arc, torch.ones_like(c))
    return torch.where((cos >= lo) & (cos <= hi), grad, torch.zeros_like(c))


def _similarity_features(x: torch.Tensor, options: InfoNCEOptions) -> torch.Tensor:
    return x if options.similarity == "dot" else unit_rows_reference(x)


def hardness_mask(n_rows: int, n_docs: int, mode: str | None, device) -> torch.Tensor | None:
    """(N, P + K) bool: the query_to_doc entries that get the hardness term (module docstring), or None."""
    if mode is None:
        return None
    i = torch.arange(n_rows, device=device)[:, None]
    j = torch.arange(n_docs, device=device)[None, :]
    own = (j % n_rows) == i
    if mode == "in_batch_negatives":
        return ~own
    if mode == "hard_negatives":
        return own & (j >= n_rows)
    return j != i  # all_negatives: everything but the positive


def guide_cosines(options: InfoNCEOptions, dtype: torch.dtype):
    """``(ĝa (N, G), ĝp (P, G), ĝd = [ĝp; ĝn] (P + K, G), cut (N,))``: the normalized, detached guide rows in
    ``dtype`` and each row's threshold (module docstring, "Guide")."""
    rows = [F.normalize(t.detach().to(dtype), dim=-1, eps=NORM_EPS) for t in options.guide]
    g_a, g_p = rows[0], rows[1]
    g_docs = torch.cat(rows[1:]) if len(rows) > 2 else g_p
    t = (g_a * g_p[: g_a.shape[0]]).sum(dim=1)
    cut = t - options.guide_margin if options.guide_margin_strategy == "absolute" else \
        t - t.abs() * options.guide_margin
    return g_a, g_p, g_docs, cut


def reference_logits(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    labels: torch.Tensor,
    options: InfoNCEOptions,
) -> torch.Tensor:
    """The full (N, M_total) logit matrix, blocks in the order of the module docstring.

    Columns: [positives (P) | negatives (K) | anchors (N, query_to_query) | mix3 (N) | mix4 (N) |
    docs (P + K, doc_to_doc) | doc_to_query (N, whenever a doc_to_query term exists: row i holds column
    ``labels[i]`` of the positives block, without hardness)]; the target entries ``(i, labels[i])``
    carry the margins (also inside the doc_to_query block). Computed in float32 (float64 for float64
    inputs).
    """
    dt = _compute_dtype(anchors.dtype)
    temperature, w = options.temperature, options.hard_negative_weight
    a = _similarity_features(anchors.to(dt), options)
    p = _similarity_features(positives.to(dt), options)
    tau = temperature.to(device=anchors.device, dtype=dt) if isinstance(temperature, torch.Tensor) else temperature
    n_rows, n_pos = a.shape[0], p.shape[0]
    eye = torch.eye(n_rows, device=a.device, dtype=dt)
    docs = p
    if negatives is not None and negatives.shape[0] > 0:
        docs = torch.cat([p, _similarity_features(negatives.to(dt), options)])
    sim = a @ docs.T  # (N, P + K) query-doc similarities
    qd = sim / tau
    if options.has_margin:  # target entries: (c - m)/tau -> (f(c) - m)/tau
        cos = sim[torch.arange(n_rows, device=a.device), labels]
        delta = (margin_target_logit_cos(cos, options.margin, options.angular_margin) - cos) / tau
        qd = qd.scatter_add(1, labels[:, None], delta[:, None])
    # row i: column l_i of the positives block (no hardness)
    guide = guide_cosines(options, dt) if options.guide is not None else None
    if guide is not None:  # GIST: remove the candidates the guide finds at least as similar as the positive
        g_a, g_p, g_docs, cut = guide
        drop = (g_a @ g_docs.T) > cut[:, None]
        drop[torch.arange(n_rows, device=a.device), labels] = False  # never the positive
        qd = qd.masked_fill(drop, float("-inf"))
    doc_to_query = qd[:, :n_pos][:, labels].T if options.has_column_term else None
    mask = hardness_mask(n_rows, docs.shape[0], options.hardness_mode, a.device) if options.has_hardness else None
    if mask is not None:
        qd = qd + options.hardness_strength * sim.detach() * mask
    k = docs.shape[0] - n_pos
    if k:
        diag = torch.zeros(n_rows, docs.shape[0], device=a.device, dtype=dt)
        m = min(n_rows, k)
        diag[torch.arange(m), n_pos + torch.arange(m)] = w
        qd = qd + diag
    blocks = [qd]
    if options.anchor_negatives:
        qq = a @ a.T / tau
        if guide is not None:
            qq = qq.masked_fill((guide[0] @ guide[0].T) > guide[3][:, None], float("-inf"))
        blocks.append(qq.masked_fill(eye.bool(), float("-inf")))
    if options.mix_lambda is not None:
        lam = options.mix_lambda
        mix3 = unit_rows_reference(mixed_features(positives.to(dt), lam))
        keep3 = 1.0 - torch.roll(eye, shifts=1, dims=0)  # zero at (i, i-1)
        blocks.append(keep3 * (a @ mix3.T / tau) + w * eye)
        mix4 = unit_rows_reference(mixed_features(anchors.to(dt), lam))
        keep4 = 1.0 - torch.roll(eye, shifts=1, dims=1)  # zero at (i, i+1)
        blocks.append(keep4 * (mix4 @ p.T / tau) + w * eye)
    if options.doc_to_doc:
        dd_docs = docs if options.doc_to_doc_negatives else p
        own = (torch.arange(dd_docs.shape[0], device=a.device)[None, :] % n_rows) == torch.arange(
            n_rows, device=a.device)[:, None]
        dd = p @ dd_docs.T / tau
        if guide is not None:
            dd = dd.masked_fill((guide[1] @ guide[2][: dd_docs.shape[0]].T) > guide[3][:, None], float("-inf"))
        blocks.append(dd.masked_fill(own, float("-inf")))
    if options.has_column_term:
        blocks.append(doc_to_query)
    return torch.cat(blocks, dim=1)


def info_nce_reference(
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
    check_inputs: bool = True,
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
    """Naive full-matrix InfoNCE (the oracle). Same arguments as :func:`fused_info_nce`.

    Memory O(N·M_total): builds every logit. Returns a float32 loss (float64 for float64 inputs).
    """
    options = InfoNCEOptions(
        temperature=temperature,
        hard_negative_weight=hard_negative_weight,
        symmetric=symmetric,
        anchor_negatives=anchor_negatives,
        mix_lambda=mix_lambda,
        reduction=reduction,
        backend="naive",
        check_inputs=check_inputs,
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
    negatives, labels = validate_inputs(anchors, positives, negatives, labels, options)
    return reference_loss(anchors, positives, negatives, labels, options)


def reference_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    labels: torch.Tensor,
    options: InfoNCEOptions,
) -> torch.Tensor:
    """The naive loss on already validated inputs (the ``"naive"`` backend)."""
    logits = reference_logits(anchors, positives, negatives, labels, options)
    return loss_from_logits(logits, positives.shape[0], labels, options)


def loss_from_logits(logits: torch.Tensor, n_positives: int, labels: torch.Tensor,
                     options: InfoNCEOptions) -> torch.Tensor:
    """The reduced loss of a :func:`reference_logits` matrix (N, M_total) whose first
    ``n_positives`` columns are the positives block (and whose last N the doc_to_query block when
    there is one)."""
    if not options.symmetric:  # one joint log-sum-exp over every column; the target is QD_{i,l_i}
        return reduce_loss(F.cross_entropy(logits, labels, reduction="none"), options.reduction)
    n = logits.shape[0]
    rows = torch.arange(n, device=logits.device)
    main, column = logits[:, :-n], logits[:, -n:]
    per_row = 0.5 * (F.cross_entropy(main, labels, reduction="none")
                     + torch.logsumexp(column, dim=1) - column[rows, rows])
    return reduce_loss(per_row, options.reduction)


def reduce_loss(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``mean`` / ``sum`` / ``none`` to the per-anchor losses."""
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row
