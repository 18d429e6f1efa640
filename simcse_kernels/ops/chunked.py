"""Backend ``"torch"``: pure-PyTorch chunked loss; never builds the N x M logit matrix.

Two paths (the math is written in :mod:`simcse_kernels.reference`):

* ``reduction="mean"/"sum"`` (a scalar loss, the usual case): :class:`RowChunkedInfoNCEFunction`.
  Anchor rows are processed in chunks of R rows. For each chunk the forward pass materializes
  the chunk's full logit rows (R x M_total, every block: one GEMM into a reused buffer, the
  constant entries written in place), takes the row softmax in place (one fused, cache-friendly
  pass), forms ``∂L/∂s`` in the same buffer (minus the target, the symmetric column term, zero
  at constant logits) and immediately runs the two gradient GEMMs (``∂â[chunk] = dS @ ĉ``,
  ``∂ĉ += dS^T @ â[chunk]``). Backward only scales the saved gradients by the incoming scalar
  gradient; the normalization backward runs through autograd (:mod:`.normalize`). That is 3
  GEMM-equivalents forward+backward with no recomputation, and memory O(R·M + (N + M)·D) with R
  from the chunk budget (:mod:`simcse_kernels.ops.budget`). Symmetric: 3 as well when all N rows
  fit the budget in one chunk; otherwise a first pass over the positives block gives the column
  log-sum-exps (4), and it keeps the full logit rows of the last chunks the budget still holds,
  which the second pass then does not recompute (4 - kept/N; :func:`symmetric_cache_rows`).
  The temperature gradient needs no extra pass:
  ``Σ_ij dS_ij cos_ij = Σ_i â_i·(dS @ ĉ)_i``, a dot of the gradient GEMM's output with â.
  Under ``no_grad`` (or when no input requires grad) only the loss is computed.
  Each row's loss is ``-log σ_{i,l_i}`` (exact while σ is a normal float) or else
  ``m_i - log max_j σ_ij - s_{i,l_i}`` (never underflows), chosen without a host sync.
  sentence-transformers' directions (issue 22): doc_to_doc is a (P, P + K) block of positives rows in
  the same buffer (its own GEMMs: 3 per block); the hardness term rescales the selected query-doc
  entries in place (``sim/tau·(1 + alpha·tau)``, after the doc_to_query terms read the positives block);
  a joint doc_to_query needs each row's full log-sum-exp before any column term, so in several chunks a
  first pass computes every row (4 GEMM-equivalents per block; one chunk: 3). A GIST guide masks each
  chunk from one guide-cosine GEMM per pass (G dims, no backward).
* ``reduction="none"``: :class:`ChunkedInfoNCEFunction`: column chunks with an online
  log-sum-exp in forward; backward recomputes every chunk from the saved LSEs and accumulates
  the gradients with two matmuls per chunk (4 GEMM-equivalents; the per-row upstream gradient is
  only known in backward). Peak extra memory O(N·chunk + (N + M)·D).

Works on any device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import refuse_double_backward
from ..options import InfoNCEOptions
from ..reference import guide_cosines, margin_target_grad, margin_target_logit_cos
from .budget import budget_is_set, chunk_budget_bytes, rows_per_chunk
from .features import LogitBlock, NormalizedFeatures, logit_blocks

#: logits per chunk: 2M (8 MiB fp32) on CPU; 16M (64 MiB) on GPUs, where launches cost more
CHUNK_LOGITS = {"cpu": 1 << 21, "cuda": 1 << 24}


class TargetMargin(NamedTuple):
    """The margins' effect on each row's target entry ``(i, l_i)`` (math: :mod:`simcse_kernels.reference`).

    Attributes (each (N,), compute dtype, detached):
        delta: added to the plain target logit ``c/tau``: ``(f(c) − m − c) / tau``.
        shift: ``f(c) − m − c`` (the temperature gradient of the target is ``−dS·(c + shift)/tau²``).
        slope: ``f'(c)``; the plain logit passes ``dS·ĉ/tau``, the target ``dS·f'(c)·ĉ/tau``.
    """

    delta: torch.Tensor
    shift: torch.Tensor
    slope: torch.Tensor


def target_margin(anchors, candidates, labels, tau, margin: float, angular_margin: float) -> TargetMargin | None:
    """:class:`TargetMargin` of rows ``anchors`` (N, D) against ``candidates[labels]`` ((P + K, D)),
    or None when both margins are 0. O(N·D): one dot per row, no GEMM."""
    if not margin and not angular_margin:
        return None
    with torch.no_grad():
        cos = (anchors * candidates[labels]).sum(dim=1)
        shift = margin_target_logit_cos(cos, margin, angular_margin) - cos
        return TargetMargin(delta=shift / tau, shift=shift, slope=margin_target_grad(cos, angular_margin))


def add_target_delta(block: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor, j0: int) -> torch.Tensor:
    """``block[i, labels[i] − j0] += delta[i]`` for the rows whose target lies in the block's columns
    [j0, j0 + width) (in place; others get 0 added at a clamped column, no host sync); returns that
    row mask."""
    width = block.shape[1]
    local = labels - j0
    inside = (local >= 0) & (local < width)
    rows = torch.arange(block.shape[0], device=block.device)
    block.index_put_((rows, local.clamp(0, width - 1)), torch.where(inside, delta, torch.zeros_like(delta)),
                     accumulate=True)
    return inside


def default_chunk_size(n_rows: int, device_type: str = "cpu") -> int:
    """Columns per chunk: ``CHUNK_LOGITS`` logits per chunk, between 32 and 8192 columns."""
    budget = CHUNK_LOGITS.get(device_type, CHUNK_LOGITS["cpu"])
    return max(32, min(8192, budget // max(n_rows, 1)))


def _own_docs(rows: int, j0: int, j1: int, device) -> torch.Tensor:
    """(rows, j1 - j0) bool: doc column j (global index within a doc block whose first doc is a multiple of
    N = ``rows``) belongs to row i's query: ``j mod N == i``."""
    cols = torch.arange(j0, j1, device=device)
    return (cols[None, :] % rows) == torch.arange(rows, device=device)[:, None]


def _hardness_chunk(block: LogitBlock, rows: int, j0: int, j1: int, mode: str, device) -> torch.Tensor | None:
    """The hardness mask (:func:`simcse_kernels.reference.hardness_mask`) of columns [j0, j1) of an
    anchors x positives / negatives block (P = N, so a negative's index mod N is its row's)."""
    own = _own_docs(rows, j0, j1, device)
    if mode == "in_batch_negatives":
        return ~own
    if block.cols == "negatives":
        return own if mode == "hard_negatives" else None  # all_negatives: every negative (None: all)
    return None if mode == "hard_negatives" else ~own  # positives: all_negatives leaves out only j = i


def _chunk(
    block: LogitBlock,
    tensors: dict[str, torch.Tensor],
    j0: int,
    j1: int,
    tau: torch.Tensor,
    options: InfoNCEOptions,
    labels: torch.Tensor | None = None,
    margins: TargetMargin | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor]:
    """Similarities, logits, the (rows, cols) index of constant logits and the logits before the
    hardness term (what doc_to_query reads) for columns [j0, j1).

    With ``margins``, the target entries ``(i, labels[i])`` of the positives / negatives blocks get
    ``margins.delta`` (``cos`` stays the plain similarity).
    """
    w = options.hard_negative_weight
    rows = tensors[block.rows]
    cos = rows @ tensors[block.cols][j0:j1].T
    logits = cos / tau
    n = rows.shape[0]
    query_doc = block.rows == "anchors" and block.cols in ("positives", "negatives")
    offset = 0 if block.cols == "positives" else tensors["positives"].shape[0]
    if margins is not None and query_doc:
        add_target_delta(logits, labels, margins.delta, j0 + offset)
    if options.guide is not None:  # GIST: drop what the guide finds as similar as the positive (never the target)
        drop = (tensors["g_" + block.rows] @ tensors["g_" + block.cols][j0:j1].T) > tensors["g_cut"][:, None]
        if query_doc:
            local = labels - offset - j0
            inside = (local >= 0) & (local < j1 - j0)
            at = (torch.arange(n, device=rows.device), local.clamp(0, j1 - j0 - 1))
            drop[at] = drop[at] & ~inside
        logits = logits.masked_fill(drop, float("-inf"))
    base = logits
    if query_doc and options.has_hardness:
        if block.cols == "negatives" and options.hardness_mode == "all_negatives":
            logits = logits + options.hardness_strength * cos
        elif not (block.cols == "positives" and options.hardness_mode == "hard_negatives"):
            mask = _hardness_chunk(block, n, j0, j1, options.hardness_mode, rows.device)
            logits = logits + options.hardness_strength * cos * mask
    if block.pattern == "none":
        return cos, logits, None, base
    if block.pattern == "owndoc":  # doc_to_doc: doc i's own docs are left out
        logits.masked_fill_(_own_docs(n, j0, j1, rows.device), float("-inf"))
        return cos, logits, None, base
    cols = torch.arange(j0, j1, device=rows.device)
    diag = torch.arange(j0, max(j0, min(j1, n)), device=rows.device)  # columns j that have a row i = j
    if block.pattern == "self":
        logits[diag, diag - j0] = float("-inf")
        return cos, logits, None, base
    if block.pattern == "hard":
        logits[diag, diag - j0] += w
        return cos, logits, None, base
    # MixCSE: zero the masked entry first, then add w on the diagonal (official order).
    shift = 1 if block.pattern == "mix3" else -1
    const = ((cols + shift) % n, cols - j0)
    logits[const] = 0.0
    logits[diag, diag - j0] += w
    return cos, logits, const, base


def _guide_tensors(options: InfoNCEOptions, dtype: torch.dtype, n_pos: int) -> dict[str, torch.Tensor]:
    """GIST's normalized guide rows by block operand name (``g_anchors``, ``g_positives``, ``g_negatives``)
    and each row's threshold ``g_cut`` (:func:`simcse_kernels.reference.guide_cosines`); {} without a guide."""
    if options.guide is None:
        return {}
    g_a, g_p, g_docs, cut = guide_cosines(options, dtype)
    return {"g_anchors": g_a, "g_positives": g_p, "g_negatives": g_docs[n_pos:], "g_cut": cut}


def _row_blocks(negatives, mix3, options: InfoNCEOptions) -> list[LogitBlock]:
    """Every logit block of a row: :func:`logit_blocks` plus doc_to_doc's positives-row blocks."""
    blocks = logit_blocks(negatives is not None, options.anchor_negatives, mix3 is not None)
    if options.doc_to_doc:
        blocks.append(LogitBlock("positives", "positives", "owndoc"))
        if negatives is not None and options.doc_to_doc_negatives:
            blocks.append(LogitBlock("positives", "negatives", "owndoc"))
    return blocks


class ChunkedInfoNCEFunction(torch.autograd.Function):
    """Per-row InfoNCE losses (N,) from normalized features, chunked; see module docstring.

    Inputs: anchors (N, D), positives (P, D), negatives (K, D) or None, mix3/mix4 (N, D) or None, tau
    0-dim, labels (N,) int64, options (:class:`InfoNCEOptions`), chunk_size (columns per chunk).
    """

    @staticmethod
    def forward(ctx, anchors, positives, negatives, mix3, mix4, tau, labels, options, chunk_size):
        tensors = {"anchors": anchors, "positives": positives, "negatives": negatives, "mix3": mix3, "mix4": mix4}
        tensors.update(_guide_tensors(options, anchors.dtype, positives.shape[0]))
        n, n_pos = anchors.shape[0], positives.shape[0]
        w = options.hard_negative_weight
        candidates = positives if negatives is None else torch.cat([positives, negatives])
        margins = target_margin(anchors, candidates, labels, tau, options.margin, options.angular_margin)
        lse = torch.full((n,), float("-inf"), device=anchors.device, dtype=anchors.dtype)
        column = options.has_column_term
        col_lse = torch.empty(n_pos, device=anchors.device, dtype=anchors.dtype) if column else None
        for block in _row_blocks(negatives, mix3, options):
            width = tensors[block.cols].shape[0]
            for j0 in range(0, width, chunk_size):
                j1 = min(j0 + chunk_size, width)
                _, logits, _, base = _chunk(block, tensors, j0, j1, tau, options, labels, margins)
                lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
                if column and block.cols == "positives" and block.rows == "anchors":
                    col_lse[j0:j1] = torch.logsumexp(base, dim=0)
        target_cos = (anchors * candidates[labels]).sum(dim=1)
        target = target_cos / tau if margins is None else (target_cos + margins.shift) / tau
        if negatives is not None and w != 0.0:
            target = target + w * (labels == n_pos + torch.arange(n, device=labels.device)).to(target.dtype)
        if options.doc_to_query_joint:  # row i's joint lse also holds column i of the positives block
            lse = torch.logaddexp(lse, col_lse)
        loss = lse - target
        if options.symmetric:
            loss = 0.5 * (loss + col_lse[labels] - target)
        ctx.save_for_backward(anchors, positives, negatives, mix3, mix4, tau, labels, lse, col_lse, target_cos,
                              target)
        ctx.options = (options, chunk_size)
        ctx.margins = margins
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_double_backward('torch', torch.is_grad_enabled(), torch.compiler.is_compiling())
        anchors, positives, negatives, mix3, mix4, tau, labels, lse, col_lse, target_cos, target = ctx.saved_tensors
        options, chunk_size = ctx.options
        symmetric = options.symmetric
        margins = ctx.margins
        tensors = {"anchors": anchors, "positives": positives, "negatives": negatives, "mix3": mix3, "mix4": mix4}
        tensors.update(_guide_tensors(options, anchors.dtype, positives.shape[0]))
        g = grad_loss.to(anchors.dtype)
        row_weight = 0.5 * g if symmetric else g
        col_weight = col_shift = None
        if symmetric:
            col_weight = torch.zeros(positives.shape[0], device=g.device, dtype=g.dtype)
            col_weight.index_add_(0, labels, 0.5 * g)
            col_shift = col_lse
        elif options.doc_to_query_joint:  # column j's terms belong to row j's joint lse
            col_weight, col_shift = g, lse
        grads = {name: torch.zeros_like(t) for name, t in tensors.items() if t is not None and name in
                 ("anchors", "positives", "negatives")}
        dtau_cos = torch.zeros((), device=g.device, dtype=g.dtype)
        for block in _row_blocks(negatives, mix3, options):
            width = tensors[block.cols].shape[0]
            for j0 in range(0, width, chunk_size):
                j1 = min(j0 + chunk_size, width)
                cos, logits, const, base = _chunk(block, tensors, j0, j1, tau, options, labels, margins)
                d_logits = row_weight[:, None] * torch.exp(logits - lse[:, None])
                if col_weight is not None and block.cols == "positives" and block.rows == "anchors":
                    d_logits += col_weight[None, j0:j1] * torch.exp(base - col_shift[None, j0:j1])
                if const is not None:
                    d_logits[const] = 0.0
                if block.rows in grads:
                    grads[block.rows] += d_logits @ tensors[block.cols][j0:j1]
                if block.cols in grads:
                    grads[block.cols][j0:j1] += d_logits.T @ tensors[block.rows]
                dtau_cos += (d_logits * cos).sum()
        # Target logits: d/ds_{i,l_i} = -g_i (row and column parts together). With margins the
        # target logit is (c + shift)/tau with slope f'(c): the chunks passed its softmax part
        # `soft` as if the slope were 1, so the target adds (dS_t·f' − soft) (dS_t = soft − g).
        n_pos = positives.shape[0]
        candidates = positives if negatives is None else torch.cat([positives, negatives])
        coef = -g
        if margins is not None:
            soft = row_weight * torch.exp(target - lse)
            if col_weight is not None:
                in_pos = labels < n_pos
                col = labels.clamp(max=n_pos - 1)
                soft = soft + torch.where(in_pos, col_weight[col] * torch.exp(target - col_shift[col]),
                                          torch.zeros_like(soft))
            coef = (soft - g) * margins.slope - soft
            dtau_cos += ((soft - g) * margins.shift).sum()
        grads["anchors"] += coef[:, None] * candidates[labels]
        d_candidates = torch.zeros_like(candidates).index_add_(0, labels, coef[:, None] * anchors)
        grads["positives"] += d_candidates[:n_pos]
        if negatives is not None:
            grads["negatives"] += d_candidates[n_pos:]
        dtau_cos -= (g * target_cos).sum()
        d_tau = -dtau_cos / (tau * tau)
        return (
            grads["anchors"] / tau,
            grads["positives"] / tau,
            None if negatives is None else grads["negatives"] / tau,
            None,
            None,
            d_tau,
            None, None, None,
        )


def chunked_per_row_loss(
    feats: NormalizedFeatures,
    labels: torch.Tensor,
    options: InfoNCEOptions,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-anchor losses (N,) in the compute dtype, differentiable w.r.t. the features and tau.

    Args:
        feats: normalized features; labels: (N,) int64 targets; options: the loss options (every
            option but ``reduction`` is read here); chunk_size: columns per chunk (None: by device).
    """
    chunk = chunk_size or default_chunk_size(feats.anchors.shape[0], feats.anchors.device.type)
    return ChunkedInfoNCEFunction.apply(
        feats.anchors, feats.positives, feats.negatives, feats.mix3, feats.mix4, feats.tau, labels.to(torch.int64),
        options, chunk,
    )


# ---------------------------------------------------------------------------------------------
# Scalar reductions: row chunks, gradient formed in the forward pass (3 GEMM-equivalents).
# ---------------------------------------------------------------------------------------------

#: most rows per chunk by device type (the budget may allow more): on CPU 256-1024 rows measured
#: alike and fewer slower (per-chunk overhead); see benchmarks/README.md, "CPU results"
MAX_ROWS = {"cpu": 512}


def scalar_rows_per_chunk(n_rows: int, n_cols: int, n_pos: int, symmetric: bool, itemsize: int,
                          device_type: str, chunk_budget_mib: float | None) -> int:
    """Rows R of one chunk of the scalar-reduction path.

    Args:
        n_rows: N anchors; n_cols: M_total logit columns of a row; n_pos: P (the symmetric
        column-term buffer is R x P); itemsize: bytes of the compute dtype; device_type: e.g. "cpu";
        chunk_budget_mib: the budget option (None: ``$SIMCSE_KERNELS_CHUNK_MIB`` or 256 MiB).

    Returns:
        R in [1, N]: the (R, M_total) buffer (plus (R, P) when symmetric) fits the budget, and R is
        at most ``MAX_ROWS[device_type]`` when set, except that a symmetric loss whose N rows all
        fit the budget gets R = N: one chunk needs no first pass for the column log-sum-exps
        (3 GEMM-equivalents instead of 4).
    """
    per_row_cols = n_cols + (n_pos if symmetric else 0)
    rows = rows_per_chunk(n_rows, per_row_cols, itemsize, chunk_budget_bytes(chunk_budget_mib))
    if symmetric and rows >= n_rows:
        return n_rows
    cap = MAX_ROWS.get(device_type)
    return max(1, min(rows, cap)) if cap else rows


#: with the default budget, a symmetric loss may keep first-pass logit rows worth up to
#: min(D / KEEP_DIM_UNIT, KEEP_MAX_MULTIPLE) times the bytes of its feature operands
KEEP_DIM_UNIT = 64
KEEP_MAX_MULTIPLE = 16


def symmetric_cache_rows(n_rows: int, n_cols: int, n_pos: int, rows_per: int, itemsize: int, dim: int,
                         feature_bytes: int, chunk_budget_mib: float | None) -> int:
    """Trailing anchor rows whose full logit rows the symmetric first pass keeps for the second.

    The first pass of a multi-chunk symmetric loss computes each row's positives block only for
    the column log-sum-exps; the second recomputes it. A kept row (all M_total logits, constants
    applied, stored by the first pass) skips that recompute: it saves 2·M_total·D FLOPs for
    M_total·itemsize bytes, so keeping rows pays more the larger D is, and the default room for
    them grows with D.

    Args:
        n_rows: N; n_cols: M_total; n_pos: P; rows_per: R of the working chunks; itemsize: bytes
        of the compute dtype; dim: D; feature_bytes: bytes of every feature operand (anchors,
        positives, negatives, MixCSE rows); chunk_budget_mib: the budget option.

    Returns:
        A row count that is N minus a multiple of R (whole trailing chunks; all N possible), 0
        when R >= N. The rows fit what the budget leaves after the working buffers
        (R·(M_total + P) logits). With the default budget (no option, no env var) the budget is
        at least ``min(D / KEEP_DIM_UNIT, KEEP_MAX_MULTIPLE)`` x ``feature_bytes`` (e.g. 12x at
        D = 768): extra memory stays O(R·M + (N + M)·D), never O(N·M).
    """
    if rows_per >= n_rows:
        return 0
    budget = chunk_budget_bytes(chunk_budget_mib)
    if not budget_is_set(chunk_budget_mib):
        budget = max(budget, int(min(dim / KEEP_DIM_UNIT, KEEP_MAX_MULTIPLE) * feature_bytes))
    free = budget - rows_per * (n_cols + n_pos) * itemsize
    capacity = max(0, free) // max(1, n_cols * itemsize)
    first = max(0, -(-(n_rows - capacity) // rows_per) * rows_per)  # first kept chunk's start
    return max(0, n_rows - first)


class _Layout:
    """Column layout of a chunk's logit rows: [P | K | N (anchor negatives) | N (mix3) | N (mix4) |
    P + K (doc_to_doc)].

    The first ``mc`` columns are ``anchors[chunk] @ cols^T`` (one GEMM); mix4 rows against the
    positives fill the next N, positives rows against the docs ``[p̂; n̂]`` the last P + K (doc_to_doc).
    ``mg``: the columns whose operand needs a gradient (mix3 is detached). ``pk``: P + K, the docs.
    """

    def __init__(self, n: int, n_pos: int, n_neg: int, anchor_negatives: bool, mix: bool, doc_to_doc: bool = False,
                 doc_to_doc_negatives: bool = True):
        self.n, self.p, self.k = n, n_pos, n_neg
        self.pk = n_pos + n_neg
        self.dd_w = self.pk if doc_to_doc_negatives else n_pos  # doc_to_doc's columns
        self.o_self = n_pos + n_neg if anchor_negatives else None
        self.mg = n_pos + n_neg + (n if anchor_negatives else 0)
        self.o_mix3 = self.mg if mix else None
        self.mc = self.mg + (n if mix else 0)
        self.o_mix4 = self.mc if mix else None
        self.o_dd = self.mc + (n if mix else 0) if doc_to_doc else None
        self.m = self.mc + (n if mix else 0) + (self.dd_w if doc_to_doc else 0)


class _ScalarGuide(NamedTuple):
    """GIST's guide on the scalar path: normalized guide rows laid out like the logit operands, each row's
    threshold and an (R·M) scratch buffer for a chunk's guide cosines."""

    rows: torch.Tensor  # (N, G) ĝa
    cols: torch.Tensor  # (mc, G) [ĝp; ĝn; ĝa]
    docs_rows: torch.Tensor  # (P, G) ĝp
    docs_cols: torch.Tensor  # (dd_w, G)
    cut: torch.Tensor  # (N,)
    scratch: torch.Tensor  # (R·M,)


def _guide_mask_(buf, guide: _ScalarGuide, lay: _Layout, r0: int, r1: int, labels) -> None:
    """Set to -inf the logits of rows [r0, r1) whose guide cosine exceeds the row's threshold (never the
    target ``labels[i]``); the guide cosines of the chunk are computed into ``guide.scratch`` (R x M)."""
    r = r1 - r0
    g = guide.scratch[: r * lay.m].view(r, lay.m)
    torch.mm(guide.rows[r0:r1], guide.cols.T, out=g[:, : lay.mc])
    if lay.o_dd is not None:
        torch.mm(guide.docs_rows[r0:r1], guide.docs_cols.T, out=g[:, lay.o_dd:])
    g.view(-1)[torch.arange(r, device=buf.device) * lay.m + labels[r0:r1]] = float("-inf")
    buf.masked_fill_(g > guide.cut[r0:r1, None], float("-inf"))


def _fill_logits(buf, rows_s, mix4_s, cols, lay: _Layout, r0: int, r1: int, docs_s=None, labels=None, delta=None,
                 guide=None):
    """Logits of anchor rows [r0, r1) into ``buf`` (R, M_total) without the hardness term and the
    hard-negative weight (:func:`_finish_query_doc` adds them, after the doc_to_query terms have read
    the positives block); returns the flat indices of constant (MixCSE-masked) entries, or None.

    Args:
        buf: (R, M_total) contiguous output; rows_s: (N, D) â / tau; mix4_s: (N, D) or None;
        cols: (mc, D) concatenated column operands [p̂; n̂; â; mix3̂]; lay: the layout; docs_s: (P, D)
        p̂ / tau (doc_to_doc rows) or None; labels (N,) and delta (N,) or None: the margins' change of
        each target logit (:class:`TargetMargin`); guide: :class:`_ScalarGuide` or None.
    """
    dev = buf.device
    m = lay.m
    torch.mm(rows_s[r0:r1], cols.T, out=buf[:, : lay.mc])
    if lay.o_mix4 is not None:
        torch.mm(mix4_s[r0:r1], cols[: lay.p].T, out=buf[:, lay.o_mix4: lay.o_mix4 + lay.n])
    if lay.o_dd is not None:
        torch.mm(docs_s[r0:r1], cols[: lay.dd_w].T, out=buf[:, lay.o_dd:])
    if guide is not None:
        _guide_mask_(buf, guide, lay, r0, r1, labels)
    rows = torch.arange(r1 - r0, device=dev)
    glob = rows + r0
    flat = buf.view(-1)
    base = rows * m
    if delta is not None:
        flat[base + labels[r0:r1]] += delta[r0:r1]
    if lay.o_self is not None:
        flat[base + lay.o_self + glob] = float("-inf")
    if lay.o_dd is not None:  # doc_to_doc: doc i's own docs (itself and negatives k·N + i) are left out
        own = torch.arange(0, lay.dd_w, lay.n, device=dev)
        flat[(base + lay.o_dd + glob)[:, None] + own[None, :]] = float("-inf")
    if lay.o_mix3 is None:
        return None
    # MixCSE: zero the masked entry first, then add w on the diagonal (official order).
    const = torch.cat([base + lay.o_mix3 + (glob - 1) % lay.n, base + lay.o_mix4 + (glob + 1) % lay.n])
    flat[const] = 0.0
    return const


def _finish_query_doc(buf, lay: _Layout, r0: int, r1: int, w: float, options: InfoNCEOptions, tau) -> None:
    """Add the hardness term ``alpha·sim`` (query_to_doc entries of the mode; ``buf`` holds sim/tau there, so
    the entry becomes ``sim/tau·(1 + alpha·tau)``) and the hard-negative weight ``w`` (column P + i, and
    MixCSE's diagonals) to rows [r0, r1) of a :func:`_fill_logits` buffer, in place."""
    dev = buf.device
    rows = torch.arange(r1 - r0, device=dev)
    glob = rows + r0
    flat = buf.view(-1)
    base = rows * lay.m
    if options.has_hardness:
        factor = 1.0 + options.hardness_strength * tau
        mode = options.hardness_mode
        own = (base + glob)[:, None] + torch.arange(0, lay.pk, lay.n, device=dev)[None, :]  # positive i, negatives
        if mode == "hard_negatives":
            flat[own[:, 1:]] *= factor
        else:
            keep = own if mode == "in_batch_negatives" else own[:, :1]
            saved = flat[keep]
            buf[:, : lay.pk].mul_(factor)
            flat[keep] = saved
    n_hard = min(r1, lay.k) - r0  # rows of this chunk that have a paired hard negative
    if n_hard > 0 and w != 0.0:
        flat[(base + lay.p + glob)[:n_hard]] += w
    if lay.o_mix3 is not None and w != 0.0:
        flat[torch.cat([base + lay.o_mix3 + glob, base + lay.o_mix4 + glob])] += w


def _softmax_(buf: torch.Tensor) -> torch.Tensor:
    """Row softmax of a contiguous (R, M) tensor, in place where possible (one fused pass)."""
    if torch.compiler.is_compiling():
        return buf.copy_(torch.softmax(buf, dim=1))
    return torch.ops.aten._softmax.out(buf, 1, False, out=buf)


def _column_exp_(s: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``out = exp(s - colmax)`` for a finite (R, P) ``s`` (``out`` may be ``s``); returns
    ``(colmax, colsum)``, (P,) each: the column log-sum-exp is ``colmax + log(colsum)``.

    Four passes and no temporary (``torch.logsumexp(s, 0)`` allocates an (R, P) one). A column that is -inf
    in every row (a guide can remove all of a chunk's entries of a column) gets colmax 0 and colsum 0 (its
    log-sum-exp -inf), not NaN.
    """
    colmax = s.amax(dim=0)
    colmax = colmax.masked_fill(colmax == float("-inf"), 0.0)
    torch.sub(s, colmax, out=out)
    out.exp_()
    return colmax, out.sum(dim=0)


def _column_lse(rows_s, mix4_s, cols, lay: _Layout, rows_per: int, buf, cache, docs_s=None, labels=None,
                delta=None, joint=None, guide=None):
    """First pass of a loss with doc_to_query terms when the rows take several chunks: the
    log-sum-exp over all anchors of each positive's column, (P,) (before the hardness term).

    Rows from ``lay.n - cache.shape[0]`` on (whole chunks) get their full logit rows filled into
    ``cache`` (kept, M_total, without :func:`_finish_query_doc`) for the second pass; the other chunks
    only their positives block, in ``buf``. ``joint`` ((w, options, tau), a joint doc_to_query): every
    chunk's full rows are computed (``buf`` holds R x M_total) and each row's log-sum-exp over them is
    returned too. Returns ``(clse, consts, row_lse or None)``: consts maps a kept chunk's first row to
    the flat indices (within its rows) of its constant logits, or None.
    """
    clse = torch.full((lay.p,), float("-inf"), device=cols.device, dtype=cols.dtype)
    row_lse = torch.empty(lay.n, device=cols.device, dtype=cols.dtype) if joint is not None else None
    first_kept = lay.n - (0 if cache is None else cache.shape[0])
    consts = {}
    for r0 in range(0, lay.n, rows_per):
        r1 = min(r0 + rows_per, lay.n)
        scratch = buf.view(-1)[: (r1 - r0) * lay.p].view(r1 - r0, lay.p)
        if joint is not None:
            rows = buf.view(-1)[: (r1 - r0) * lay.m].view(r1 - r0, lay.m)
            _fill_logits(rows, rows_s, mix4_s, cols, lay, r0, r1, docs_s, labels, delta, guide)
            colmax, colsum = _column_exp_(rows[:, : lay.p], out=torch.empty_like(rows[:, : lay.p]))
            clse = torch.logaddexp(clse, colmax + colsum.log())
            _finish_query_doc(rows, lay, r0, r1, *joint)
            row_max = rows.amax(dim=1)
            row_lse[r0:r1] = row_max + rows.sub_(row_max[:, None]).exp_().sum(dim=1).log()
            continue
        if r0 >= first_kept:
            rows = cache[r0 - first_kept: r1 - first_kept]
            consts[r0] = _fill_logits(rows, rows_s, mix4_s, cols, lay, r0, r1, docs_s, labels, delta, guide)
            s = rows[:, : lay.p]  # no constant entries in the positives block
        else:
            s = scratch
            torch.mm(rows_s[r0:r1], cols[: lay.p].T, out=s)
            if guide is not None:
                g = guide.rows[r0:r1] @ guide.cols[: lay.p].T
                add_target_delta(g, labels[r0:r1], torch.full((r1 - r0,), float("-inf"), device=g.device,
                                                                dtype=g.dtype), 0)
                s.masked_fill_(g > guide.cut[r0:r1, None], float("-inf"))
            if delta is not None:
                add_target_delta(s, labels[r0:r1], delta[r0:r1], 0)
        colmax, colsum = _column_exp_(s, out=scratch)
        clse = torch.logaddexp(clse, colmax + colsum.log())
    return clse, consts, row_lse


def _scalar_pass(anchors, positives, negatives, mix3, mix4, tau, labels, options, reduction_sum, rows_per,
                 cache_rows, need):
    """Loss and (when ``need`` asks) the unscaled gradients of the scalar-reduction path.

    Args:
        anchors (N, D), positives (P, D), negatives (K, D) or None, mix3/mix4 (N, D) or None:
        unit-norm features in the compute dtype (detached). tau: 0-dim tensor. labels: (N,) int64.
        options: the loss options (:class:`InfoNCEOptions`; margins act through :class:`TargetMargin`:
        the target's own gradient terms are rank-1 per row, O(N·D), no extra GEMM); reduction_sum:
        "sum" (else "mean"); rows_per: R; cache_rows: trailing rows whose logits the symmetric first
        pass keeps (:func:`symmetric_cache_rows`; 0 for none); need: (anchors, positives, negatives,
        tau) booleans.

    Returns:
        (loss (0-dim), grads dict or None). grads holds ``dA`` (N, D), ``dC`` (mg, D) (columns
        [p̂; n̂; â]), ``dPmix`` (P, D) (the mix4 block's part of ∂p̂), ``dDrow`` (P, D) (the doc_to_doc
        rows' part of ∂p̂), each equal to the true gradient times ``tau / scale``, ``scale`` (g, or g/2
        when symmetric) and ``dtau`` (true value).
    """
    w = options.hard_negative_weight
    anchor_negatives, symmetric, joint = options.anchor_negatives, options.symmetric, options.doc_to_query_joint
    column = symmetric or joint
    n, d = anchors.shape
    n_pos, n_neg = positives.shape[0], 0 if negatives is None else negatives.shape[0]
    dev, dt = anchors.device, anchors.dtype
    lay = _Layout(n, n_pos, n_neg, anchor_negatives, mix3 is not None, options.doc_to_doc,
                  options.doc_to_doc_negatives)
    parts = [positives] + ([negatives] if n_neg else []) + ([anchors] if anchor_negatives else [])
    parts += [mix3] if mix3 is not None else []
    cols = torch.cat(parts) if len(parts) > 1 else positives
    inv_tau = 1.0 / tau
    rows_s = anchors * inv_tau
    mix4_s = None if mix4 is None else mix4 * inv_tau
    docs_s = positives * inv_tau if options.doc_to_doc else None
    need_a, need_p, need_n, need_tau = need
    any_grad = any(need)
    margins = target_margin(anchors, cols[: n_pos + n_neg], labels, tau, options.margin, options.angular_margin)
    delta = None if margins is None else margins.delta
    d_target = torch.empty(n, device=dev, dtype=dt) if margins is not None and any_grad else None
    buf_all = torch.empty(rows_per * lay.m, device=dev, dtype=dt)
    finish = (w, options, tau)
    guide = None
    if options.guide is not None:
        g_a, g_p, g_docs, cut = guide_cosines(options, dt)
        g_cols = torch.cat([g_docs] + ([g_a] if anchor_negatives else []))
        guide = _ScalarGuide(rows=g_a, cols=g_cols, docs_rows=g_p, docs_cols=g_docs[: lay.dd_w], cut=cut,
                             scratch=torch.empty(rows_per * lay.m, device=dev, dtype=dt))
    clse = cshift = log_counts = cache = joint_lse = tbuf = None
    kept_consts = {}
    one_chunk = rows_per >= n  # doc_to_query: the column LSEs come from the chunk itself, no first pass
    first_kept = n
    if column:
        if not one_chunk:
            if cache_rows > 0 and symmetric:
                first_kept = n - cache_rows
                cache = torch.empty(cache_rows, lay.m, device=dev, dtype=dt)
            clse, kept_consts, row_lse = _column_lse(rows_s, mix4_s, cols, lay, rows_per, buf_all, cache, docs_s,
                                                     labels, delta, finish if joint else None, guide)
            if joint:
                joint_lse = torch.logaddexp(row_lse, clse)  # L_i: row i's terms and column i
        if symmetric:
            counts = torch.zeros(n_pos, device=dev, dtype=dt).index_add_(
                0, labels, torch.ones(n, device=dev, dtype=dt))
            log_counts = torch.log(counts)  # -inf where no row targets the column: no column term
        tbuf = torch.empty(rows_per * n_pos, device=dev, dtype=dt) if any_grad or (joint and one_chunk) else None
    # which differentiable columns [lo, hi) of the dC GEMM are needed
    lo = 0 if need_p else (n_pos if need_n else n_pos + n_neg)
    hi = lay.mg if (need_a and anchor_negatives) else (n_pos + n_neg if need_n else (n_pos if need_p else 0))
    dd_lo, dd_hi = (0 if need_p else n_pos), (lay.dd_w if need_n else (n_pos if need_p else 0))
    has_dd = lay.o_dd is not None
    grads = None
    if any_grad:
        grads = dict(
            dA=torch.empty(n, d, device=dev, dtype=dt) if (need_a or need_tau) else None,
            dC=torch.zeros(lay.mg, d, device=dev, dtype=dt) if hi > lo or (has_dd and dd_hi > dd_lo) else None,
            dPmix=torch.zeros(n_pos, d, device=dev, dtype=dt) if mix4 is not None and (need_p or need_tau) else None,
            dDrow=torch.empty(n_pos, d, device=dev, dtype=dt) if has_dd and (need_p or need_tau) else None,
        )
    total = torch.zeros((), device=dev, dtype=dt)
    tiny = torch.finfo(dt).tiny
    for r0 in range(0, n, rows_per):
        r1 = min(r0 + rows_per, n)
        r = r1 - r0
        if r0 >= first_kept:  # logits kept by the symmetric first pass
            buf = cache[r0 - first_kept: r1 - first_kept]
            const = kept_consts[r0]
        else:
            buf = buf_all[: r * lay.m].view(r, lay.m)
            const = _fill_logits(buf, rows_s, mix4_s, cols, lay, r0, r1, docs_s, labels, delta, guide)
        tcol = tbuf[: r * n_pos].view(r, n_pos) if tbuf is not None else None
        if column and one_chunk:
            # the column terms exp(s_ij - clse_j) from exp(s - colmax): no separate LSE pass
            scratch = tcol if tcol is not None else torch.empty_like(buf[:, :n_pos])
            colmax, colsum = _column_exp_(buf[:, :n_pos], out=scratch)
            clse = colmax + colsum.log()
            if tcol is not None and symmetric:
                tcol.mul_(counts / colsum)
        elif tcol is not None:
            if cshift is None:
                cshift = clse - log_counts if symmetric else joint_lse
            torch.sub(buf[:, :n_pos], cshift, out=tcol)
            tcol.exp_()
        _finish_query_doc(buf, lay, r0, r1, *finish)
        rows = torch.arange(r, device=dev)
        tgt_idx = rows * lay.m + labels[r0:r1]
        t = buf.view(-1)[tgt_idx]  # target logits s_{i,l_i}
        row_max = buf.amax(dim=1)  # amax: vectorized, ~20x faster than max with indices
        probs = _softmax_(buf)
        p_t = probs.view(-1)[tgt_idx]
        p_max = probs.amax(dim=1)  # σ at the row max: exp(m - lse) >= 1/M
        if joint:
            row_lse = row_max - torch.log(p_max)
            if one_chunk:  # all rows here: L and the column terms exp(S_kj - L_j) = exp(S_kj - colmax_j)·(...)
                joint_lse = torch.logaddexp(row_lse, clse)
                if tcol is not None:
                    tcol.mul_(torch.exp(colmax - joint_lse))
            lse_i = joint_lse[r0:r1]
            row_loss = lse_i - t
            probs.mul_(torch.exp(row_lse - lse_i)[:, None])  # softmax over the row -> exp(s - L_i)
        else:
            # lse - t: -log σ_t is exact while σ_t is normal; m - log σ_max - t never underflows
            row_loss = torch.where(p_t > tiny, -torch.log(p_t.clamp_min(tiny)), row_max - torch.log(p_max) - t)
        if symmetric:
            row_loss = 0.5 * (row_loss + clse[labels[r0:r1]] - t)
        total = total + row_loss.sum()
        if not any_grad:
            continue
        # ∂L/∂s up to the factor `scale`: σ - Y (+ the column terms), or σ + colterm - 2Y when symmetric (g/2)
        if column:
            probs[:, :n_pos] += tcol
        probs.view(-1)[tgt_idx] -= 2.0 if symmetric else 1.0
        if const is not None:
            probs.view(-1)[const] = 0.0
        if d_target is not None:
            d_target[r0:r1] = probs.view(-1)[tgt_idx]
        if grads["dA"] is not None:
            torch.mm(probs[:, : lay.mc], cols, out=grads["dA"][r0:r1])
        if grads["dC"] is not None and hi > lo:
            acc = grads["dC"][lo:hi]  # addmm with out= (not addmm_: FlopCounterMode counts it)
            torch.addmm(acc, probs[:, lo:hi].T, anchors[r0:r1], out=acc)
        if grads["dPmix"] is not None:
            torch.addmm(grads["dPmix"], probs[:, lay.o_mix4: lay.o_mix4 + n].T, mix4[r0:r1], out=grads["dPmix"])
        if has_dd:
            dd = probs[:, lay.o_dd:]
            if grads["dDrow"] is not None:
                torch.mm(dd, cols[: lay.dd_w], out=grads["dDrow"][r0:r1])
            if dd_hi > dd_lo:
                acc = grads["dC"][dd_lo:dd_hi]
                torch.addmm(acc, dd[:, dd_lo:dd_hi].T, positives[r0:r1], out=acc)
    g = 1.0 if reduction_sum else 1.0 / n
    loss = total if reduction_sum else total / n
    if grads is not None:
        scale = 0.5 * g if symmetric else g
        grads["scale"] = scale
        if need_tau:
            # Σ dS_ij sim_ij over every non-constant logit = Σ_i â_i·(dS @ ĉ)_i (+ the mix4 / doc_to_doc blocks')
            dot = (anchors * grads["dA"]).sum()
            if grads["dPmix"] is not None:
                dot = dot + (positives * grads["dPmix"]).sum()
            if grads["dDrow"] is not None:
                dot = dot + (positives * grads["dDrow"]).sum()
            if d_target is not None:  # a target logit is (c + shift)/tau: the dot above has its c
                dot = dot + (d_target * margins.shift).sum()
            grads["dtau"] = -scale * dot / (tau * tau)
        if d_target is not None:
            # the GEMMs passed the target's dS with slope 1; f'(c) needs (f'(c) − 1)·dS more, rank-1 per row
            coef = (d_target * (margins.slope - 1.0))[:, None]
            if grads["dA"] is not None:
                grads["dA"] += coef * cols[: n_pos + n_neg][labels]
            if grads["dC"] is not None:
                grads["dC"].index_add_(0, labels, coef * anchors)
    return loss, grads


class RowChunkedInfoNCEFunction(torch.autograd.Function):
    """Scalar InfoNCE loss (``mean``/``sum``) from normalized features; gradients formed in forward.

    Inputs: anchors (N, D), positives (P, D), negatives (K, D) or None, mix3/mix4 (N, D) or None
    (detached), tau 0-dim, labels (N,) int64, then options (:class:`InfoNCEOptions`), reduction_sum,
    rows_per (R), cache_rows (symmetric first-pass rows kept) and need (which of anchors,
    positives, negatives, tau need a gradient).
    Output: the 0-dim loss in the features' dtype.
    """

    @staticmethod
    def forward(ctx, anchors, positives, negatives, mix3, mix4, tau, labels, options, reduction_sum, rows_per,
                cache_rows, need):
        loss, grads = _scalar_pass(anchors, positives, negatives, mix3, mix4, tau, labels, options, reduction_sum,
                                   rows_per, cache_rows, need)
        n_pos, n_neg = positives.shape[0], 0 if negatives is None else negatives.shape[0]
        need_a, need_p, need_n, need_tau = need
        factor = grads["scale"] / tau
        d_a = d_p = d_n = None
        d_c = grads["dC"]
        # in place: the accumulators are this function's own buffers
        if need_a:
            d_a = grads["dA"]
            if options.anchor_negatives:
                d_a.add_(d_c[n_pos + n_neg:])
            d_a.mul_(factor)
        if need_p:
            d_p = d_c[:n_pos]
            if grads["dPmix"] is not None:
                d_p.add_(grads["dPmix"])
            if grads["dDrow"] is not None:
                d_p.add_(grads["dDrow"])
            d_p.mul_(factor)
        if need_n:
            d_n = d_c[n_pos:n_pos + n_neg].mul_(factor)
        d_tau = grads.get("dtau") if need_tau else None
        ctx.save_for_backward(*(x if x is not None else torch.empty(0) for x in (d_a, d_p, d_n, d_tau)))
        ctx.present = (d_a is not None, d_p is not None, d_n is not None, d_tau is not None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_double_backward('torch', torch.is_grad_enabled(), torch.compiler.is_compiling())
        saved = [x if present else None for x, present in zip(ctx.saved_tensors, ctx.present)]
        d_a, d_p, d_n, d_tau = (None if x is None else x * grad_loss.to(x.dtype) for x in saved)
        return d_a, d_p, d_n, None, None, d_tau, None, None, None, None, None, None


def chunked_scalar_loss(
    feats: NormalizedFeatures,
    labels: torch.Tensor,
    options: InfoNCEOptions,
    rows_per: int | None = None,
) -> torch.Tensor:
    """The reduced (``"mean"``/``"sum"``) loss, 0-dim in the compute dtype, on the row-chunked path.

    Args:
        feats: normalized features (see :class:`NormalizedFeatures`); gradients flow to the
            differentiable ones and to tau when it requires grad.
        labels: (N,) int64 targets.
        options: the loss options (:class:`InfoNCEOptions`; ``reduction`` "mean" or "sum",
            ``chunk_budget_mib`` the budget of the (R, M) chunk).
        rows_per: R, overriding the budget (tests).
    """
    reduction = options.reduction
    if reduction not in ("mean", "sum"):
        raise ValueError(f"chunked_scalar_loss needs reduction 'mean' or 'sum', got {reduction!r}")
    a, p, neg, tau = feats.anchors, feats.positives, feats.negatives, feats.tau
    n, n_pos = a.shape[0], p.shape[0]
    n_neg = 0 if neg is None else neg.shape[0]
    budget = options.chunk_budget_mib
    lay = _Layout(n, n_pos, n_neg, options.anchor_negatives, feats.mix3 is not None, options.doc_to_doc,
                  options.doc_to_doc_negatives)
    if rows_per is None:  # a guide's cosines take a second (R, M) buffer
        rows_per = scalar_rows_per_chunk(n, lay.m * (2 if options.guide is not None else 1), n_pos,
                                         options.has_column_term, a.element_size(), a.device.type, budget)
    cache_rows = 0
    if options.symmetric:
        operands = [t for t in (a, p, neg, feats.mix3, feats.mix4) if t is not None]
        feature_bytes = sum(t.numel() * t.element_size() for t in operands)
        cache_rows = symmetric_cache_rows(n, lay.m, n_pos, rows_per, a.element_size(), a.shape[1],
                                          feature_bytes, budget)
    grad_on = torch.is_grad_enabled()
    need = tuple(bool(grad_on and t is not None and t.requires_grad) for t in (a, p, neg, tau))
    labels = labels.to(torch.int64)
    args = (a, p, neg, feats.mix3, feats.mix4, tau, labels, options, reduction == "sum", rows_per, cache_rows, need)
    if not any(need):
        with torch.no_grad():
            loss, _ = _scalar_pass(*args)
        return loss
    return RowChunkedInfoNCEFunction.apply(*args)
