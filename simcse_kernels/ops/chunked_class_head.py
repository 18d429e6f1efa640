r"""Backend ``"torch"``, class-weight heads: many candidates, ``P = C >> N`` (issue 21).

``fused_info_nce(embeddings, class_weights, labels=class_ids, margin=..., temperature=1/scale)``
(CosFace, ArcFace, AM-softmax; math in :mod:`simcse_kernels.reference`) with up to millions of
classes. The general row-chunked path (:mod:`.chunked`) normalizes the candidates into a (C, D)
copy and keeps (C, D) gradient buffers besides the one the caller gets; here the only (C, D)
buffer is the class-weight gradient itself, and extra memory stays within the chunk budget plus
O(N + C) vectors and O(N·D) anchor-side matrices, whatever N·C is.

* The class weights ``W`` (C, D) are never normalized into a copy: their inverse norms
  ``inv_j = 1 / max(‖W_j‖, eps)`` (C,) scale each logit column, ``s_ij = (â_i·W_j)·inv_j / tau``,
  and scale ``∂L/∂s`` once more before the gradient GEMMs, so that the column GEMM accumulates
  ``G'_j = inv_j Σ_i dS_ij â_i``. The normalization backward then runs in place on that buffer:
  ``∂W_j = (G'_j − inv_j² W_j (W_j·G'_j)) / tau`` (``G'_j / tau`` where the norm is clamped), in
  blocks of rows. The buffer has W's strides (``PML``'s W is (D, C): the candidates are its
  transpose), so autograd hands it to ``W.grad`` without a copy.
* The gradients are formed in the forward pass, as in :mod:`.chunked`; the first backward scales
  them in place by the incoming gradient and gives them away (a later backward of a retained
  graph forms them again from the saved inputs).
* Two plans (:func:`class_head_plan`), both exact:

  - ``"rows"``: when at least ``min(N, ROWS_MIN)`` full logit rows (R x C) fit the budget, row
    chunks of full rows, the row softmax in place, the gradient GEMMs right away: 3
    GEMM-equivalents.
  - ``"columns"``: otherwise (one row of C logits is a large part of the budget, e.g. N = 512,
    C = 2^20, 8 MiB), (R, C_c) tiles: a first pass takes each row's log-sum-exp online over the
    column chunks, the second recomputes each tile and forms ``∂L/∂s = σ − Y`` from it: 4
    GEMM-equivalents (the column gradient needs each row's final log-sum-exp).

  ``similarity="dot"`` skips the inverse norms; ``margin`` / ``angular_margin`` change the target
  logits and add the rank-1 ``f'(c)`` correction per row (no GEMM), as in :mod:`.chunked`.

It applies (:func:`class_head_applies`) to the plain configuration only: no negatives, anchor
negatives, MixCSE or symmetric loss, a scalar reduction, fp32/fp64 class weights in the compute
dtype, at least ``MIN_CLASSES_PER_ROW`` x N candidates, and not while ``torch.compile`` traces.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import refuse_double_backward
from ..options import InfoNCEOptions
from ..reference import NORM_EPS, margin_target_grad, margin_target_logit_cos
from .budget import budget_is_set, chunk_budget_bytes
from .chunked import add_target_delta
from .features import compute_dtype_for, temperature_tensor
from .normalize import unit_rows

#: the class-head path takes over from this many candidates per anchor row (P >= 4 N). On CPU (N = 512,
#: D = 256, CosFace) it measured as fast as the general path or faster from P = 2N on; below 4N the
#: general path stays (SimCSE-style batches, P = N or 2N, where its (P, D) copies are small next to
#: the N x P logits and every other option is implemented)
MIN_CLASSES_PER_ROW = 4
#: one-pass full rows ("rows" plan) when at least this many rows (or all N) fit the budget. On CPU
#: (N = 512, D = 256, shared box): C = 65536, 32-row chunks 0.85 s against 512 x 4096 tiles 0.70 s;
#: C = 262144, 64-row chunks 12.3 s against tiles of 512 x 32768 13.6 s and 512 x 4096 19.6 s
ROWS_MIN = 64
#: at most this many rows per chunk / tile on CPU (as :data:`simcse_kernels.ops.chunked.MAX_ROWS`)
MAX_ROWS = 512
#: the class head's budget when none is set (option or environment variable), in MiB: the logit
#: buffer is nearly the whole extra memory here, and 64 MiB measured as fast as 128-256 MiB on CPU
#: (C = 65536: 256-row chunks 1.34 s, 512-row 1.32 s)
DEFAULT_CLASS_HEAD_MIB = 64.0


class ClassHeadPlan(NamedTuple):
    """How the N x C logits are visited.

    Attributes:
        mode: ``"rows"`` (full rows, one pass, 3 GEMM-equivalents) or ``"columns"`` ((rows, cols)
            tiles, two passes, 4 GEMM-equivalents).
        rows: rows R per chunk / tile.
        cols: columns per tile (C in ``"rows"`` mode).
    """

    mode: str
    rows: int
    cols: int

    def tile_bytes(self, itemsize: int) -> int:
        """Bytes of the one logit buffer (R x cols)."""
        return self.rows * self.cols * itemsize


def class_head_budget_bytes(chunk_budget_mib: float | None) -> int:
    """The budget of the logit buffer: the option or ``$SIMCSE_KERNELS_CHUNK_MIB`` when set, else
    :data:`DEFAULT_CLASS_HEAD_MIB`."""
    if budget_is_set(chunk_budget_mib):
        return chunk_budget_bytes(chunk_budget_mib)
    return chunk_budget_bytes(DEFAULT_CLASS_HEAD_MIB)


def class_head_plan(n_rows: int, n_classes: int, itemsize: int, budget_bytes: int) -> ClassHeadPlan:
    """The plan for N = ``n_rows`` anchors against C = ``n_classes`` classes within ``budget_bytes``.

    ``"rows"`` when ``min(N, ROWS_MIN)`` full rows of C logits fit (R = as many as fit, at most N and
    :data:`MAX_ROWS`); else ``"columns"`` with R = min(N, MAX_ROWS) rows and as many columns as fit
    (when fewer than R columns fit: square tiles of about budget/itemsize logits). The buffer is
    at most ``budget_bytes`` unless even one logit exceeds it (then 1 x 1).
    """
    logits = max(1, budget_bytes // itemsize)
    full_rows = logits // max(1, n_classes)
    if full_rows >= min(n_rows, ROWS_MIN):
        return ClassHeadPlan("rows", max(1, min(full_rows, n_rows, MAX_ROWS)), n_classes)
    rows = min(n_rows, MAX_ROWS)
    cols = logits // rows
    if cols < rows:
        rows = min(max(1, int(logits ** 0.5)), n_rows)
        cols = logits // rows
    return ClassHeadPlan("columns", max(1, rows), max(1, min(cols, n_classes)))


def class_head_applies(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None,
                       options: InfoNCEOptions) -> bool:
    """Whether ``fused_info_nce`` on the ``"torch"`` backend takes the class-head path (see module docstring)."""
    plain = (negatives is None or negatives.shape[0] == 0) and not options.anchor_negatives and \
        options.mix_lambda is None and not options.symmetric and options.reduction != "none" and \
        not options.needs_own_docs  # sentence-transformers' directions, hardness and guide: the general path
    return (plain and not torch.compiler.is_compiling() and positives.dtype == compute_dtype_for(anchors.dtype)
            and positives.shape[0] >= MIN_CLASSES_PER_ROW * anchors.shape[0])


def class_head_loss(anchors: torch.Tensor, class_weights: torch.Tensor, labels: torch.Tensor,
                    options: InfoNCEOptions, plan: ClassHeadPlan | None = None) -> torch.Tensor:
    """The reduced loss of ``anchors`` (N, D) against ``class_weights`` (C, D) (any strides) and
    targets ``labels`` (N,), on validated inputs; 0-dim in the compute dtype.

    ``plan`` overrides :func:`class_head_plan` (tests). Gradients reach the anchors, the class
    weights and a learnable temperature.
    """
    dt = compute_dtype_for(anchors.dtype)
    cosine = options.similarity == "cosine"
    a = anchors.to(dt)
    a_hat = unit_rows(a, NORM_EPS) if cosine else a
    tau = temperature_tensor(options, anchors.device, dt)
    if plan is None:
        plan = class_head_plan(a.shape[0], class_weights.shape[0], class_weights.element_size(),
                               class_head_budget_bytes(options.chunk_budget_mib))
    grad_on = torch.is_grad_enabled()
    need = tuple(bool(grad_on and t.requires_grad) for t in (a_hat, class_weights, tau))
    config = (float(options.margin), float(options.angular_margin), cosine, options.reduction == "sum", plan)
    labels = labels.to(torch.int64)
    if not any(need):
        with torch.no_grad():
            return _class_head_pass(a_hat, class_weights, tau, labels, config, need)[0]
    return ClassHeadFunction.apply(a_hat, class_weights, tau, labels, config, need)


class _Grads(NamedTuple):
    d_rows: torch.Tensor | None  # (N, D): ∂L/∂â (∂L/∂a with dot similarity), unscaled by the upstream grad
    d_weights: torch.Tensor | None  # (C, D), W's strides: ∂L/∂W
    d_tau: torch.Tensor | None  # 0-dim


def _inverse_norms(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inv, unclamped)``, (C,) each: ``1 / max(‖W_j‖, eps)`` and ``‖W_j‖ >= eps``."""
    norm = torch.linalg.vector_norm(weights, dim=1)
    return norm.clamp_min(NORM_EPS).reciprocal_(), norm >= NORM_EPS


def _logit_tile(out, rows_s, weights, inv, labels, delta, r0, r1, c0, c1) -> torch.Tensor | None:
    """Logits of rows [r0, r1) and classes [c0, c1) into ``out`` (r, c1 − c0); returns the mask of the
    rows whose target class is in the tile (None without margins)."""
    torch.mm(rows_s[r0:r1], weights[c0:c1].T, out=out)
    if inv is not None:
        out.mul_(inv[c0:c1])
    if delta is None:
        return None
    return add_target_delta(out, labels[r0:r1], delta[r0:r1], c0)


def _finish_weight_grad(d_w: torch.Tensor, weights: torch.Tensor, inv: torch.Tensor, unclamped: torch.Tensor,
                        block_bytes: int) -> None:
    """In place: ``G'_j -> G'_j − inv_j² W_j (W_j·G'_j)`` where the norm is not clamped (the
    normalization backward of ``ŵ = W / max(‖W‖, eps)`` on ``G' = inv·∂L/∂ŵ``), in row blocks
    whose (rows, D) product temporary is at most ``block_bytes``."""
    c, d = weights.shape
    step = max(1, min(c, block_bytes // max(1, d * weights.element_size())))
    for b0 in range(0, c, step):
        b1 = min(b0 + step, c)
        g, w = d_w[b0:b1], weights[b0:b1]
        coef = (w * g).sum(dim=1) * inv[b0:b1].square() * unclamped[b0:b1]
        g.addcmul_(w, coef[:, None], value=-1.0)


def _class_head_pass(a_hat, weights, tau, labels, config, need):
    """Loss and (when ``need`` asks) the gradients of the class-head loss.

    Args:
        a_hat: (N, D) unit anchors (raw with dot similarity), compute dtype, detached use.
        weights: (C, D) raw class weights, compute dtype, any strides. tau: 0-dim.
        labels: (N,) int64 in [0, C). config: (margin, angular_margin, cosine, reduction_sum, plan).
        need: (anchors, weights, tau) booleans.

    Returns:
        (loss 0-dim, :class:`_Grads` or None). The gradients are the true ones for an upstream
        gradient of 1.
    """
    margin, angular_margin, cosine, reduction_sum, plan = config
    a_hat, weights, tau = a_hat.detach(), weights.detach(), tau.detach()
    n, d = a_hat.shape
    dev, dt = a_hat.device, a_hat.dtype
    need_a, need_w, need_tau = need
    any_grad = any(need)
    inv = unclamped = None
    if cosine:
        inv, unclamped = _inverse_norms(weights)
    rows_s = a_hat / tau
    w_t = weights[labels]  # (N, D): each row's target class vector
    cos_t = (a_hat * w_t).sum(dim=1)
    if inv is not None:
        cos_t = cos_t * inv[labels]
    margins = bool(margin or angular_margin)
    shift = slope = delta = None
    if margins:
        shift = margin_target_logit_cos(cos_t, margin, angular_margin) - cos_t
        slope = margin_target_grad(cos_t, angular_margin)
        delta = shift / tau
    d_rows = torch.empty(n, d, device=dev, dtype=dt) if (need_a or need_tau) else None
    d_w = torch.zeros_like(weights) if need_w else None  # W's strides: handed to W.grad as it is
    d_t = torch.zeros(n, device=dev, dtype=dt) if margins and any_grad else None  # ∂L/∂s at each target
    buf = torch.empty(plan.rows * plan.cols, device=dev, dtype=dt)
    if plan.mode == "rows":
        loss_sum = _rows_plan(buf, plan, rows_s, a_hat, weights, inv, labels, delta, d_rows, d_w, d_t, any_grad)
    else:
        loss_sum = _columns_plan(buf, plan, rows_s, a_hat, weights, inv, labels, delta, tau, cos_t, shift,
                                 d_rows, d_w, d_t, any_grad)
    del buf
    scale = 1.0 if reduction_sum else 1.0 / n
    loss = loss_sum if reduction_sum else loss_sum / n
    if not any_grad:
        return loss, None
    d_tau = None
    if need_tau:  # Σ_ij dS_ij cos_ij = Σ_i â_i·(dS @ ŵ)_i; a target logit is (c + shift)/tau
        dot = (a_hat * d_rows).sum()
        if margins:
            dot = dot + (d_t * shift).sum()
        d_tau = -scale * dot / (tau * tau)
    if margins:  # the GEMMs passed the target's dS with slope 1: (f'(c) − 1)·dS more, rank-1 per row
        coef = d_t * (slope - 1.0)
        if d_rows is not None:
            unit_t = w_t * inv[labels][:, None] if inv is not None else w_t
            d_rows.addcmul_(coef[:, None], unit_t)
        if d_w is not None:
            coef_w = coef * inv[labels] if inv is not None else coef
            d_w.index_add_(0, labels, coef_w[:, None] * a_hat)
    factor = scale / tau
    if d_w is not None:
        if inv is not None:
            _finish_weight_grad(d_w, weights, inv, unclamped, max(plan.tile_bytes(dt.itemsize), 1 << 20))
        d_w.mul_(factor)
    if d_rows is not None:
        d_rows.mul_(factor)
    return loss, _Grads(d_rows if need_a else None, d_w, d_tau)


def _rows_plan(buf, plan, rows_s, a_hat, weights, inv, labels, delta, d_rows, d_w, d_t, any_grad):
    """Full logit rows, R at a time: softmax in place, ``∂L/∂s`` in the same buffer, both gradient
    GEMMs at once (3 GEMM-equivalents). Returns the sum of the row losses."""
    n, c = rows_s.shape[0], weights.shape[0]
    total = torch.zeros((), device=rows_s.device, dtype=rows_s.dtype)
    tiny = torch.finfo(rows_s.dtype).tiny
    for r0 in range(0, n, plan.rows):
        r1 = min(r0 + plan.rows, n)
        r = r1 - r0
        s = buf[: r * c].view(r, c)
        _logit_tile(s, rows_s, weights, inv, labels, delta, r0, r1, 0, c)
        tgt = torch.arange(r, device=s.device) * c + labels[r0:r1]
        t = s.view(-1)[tgt]
        row_max = s.amax(dim=1)
        probs = torch.ops.aten._softmax.out(s, 1, False, out=s)
        p_t = probs.view(-1)[tgt]
        # lse - t: -log σ_t is exact while σ_t is normal; m - log σ_max - t never underflows
        row_loss = torch.where(p_t > tiny, -torch.log(p_t.clamp_min(tiny)),
                               row_max - torch.log(probs.amax(dim=1)) - t)
        total = total + row_loss.sum()
        if not any_grad:
            continue
        probs.view(-1)[tgt] -= 1.0
        if d_t is not None:
            d_t[r0:r1] = probs.view(-1)[tgt]
        if inv is not None:
            probs.mul_(inv)
        if d_rows is not None:
            torch.mm(probs, weights, out=d_rows[r0:r1])
        if d_w is not None:
            torch.addmm(d_w, probs.T, a_hat[r0:r1], out=d_w)
    return total


def _columns_plan(buf, plan, rows_s, a_hat, weights, inv, labels, delta, tau, cos_t, shift, d_rows, d_w, d_t,
                  any_grad):
    """(R, C_c) tiles: pass 1 each row's log-sum-exp online over the column chunks; pass 2 (only for
    gradients) recomputes each tile, ``∂L/∂s = σ − Y`` and the two gradient GEMMs (4
    GEMM-equivalents in all). Returns the sum of the row losses ``lse_i − s_{i,l_i}``."""
    n, c = rows_s.shape[0], weights.shape[0]
    dev, dt = rows_s.device, rows_s.dtype
    lse = torch.full((n,), float("-inf"), device=dev, dtype=dt)
    for c0 in range(0, c, plan.cols):
        c1 = min(c0 + plan.cols, c)
        for r0 in range(0, n, plan.rows):
            r1 = min(r0 + plan.rows, n)
            s = buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            _logit_tile(s, rows_s, weights, inv, labels, delta, r0, r1, c0, c1)
            m = s.amax(dim=1)
            s.sub_(m[:, None]).exp_()
            lse[r0:r1] = torch.logaddexp(lse[r0:r1], m + s.sum(dim=1).log())
    target = (cos_t if shift is None else cos_t + shift) / tau  # s_{i,l_i}, from the rowwise target cosine
    total = (lse - target).sum()
    if not any_grad:
        return total
    for c0 in range(0, c, plan.cols):
        c1 = min(c0 + plan.cols, c)
        for r0 in range(0, n, plan.rows):
            r1 = min(r0 + plan.rows, n)
            r = r1 - r0
            s = buf[: r * (c1 - c0)].view(r, c1 - c0)
            _logit_tile(s, rows_s, weights, inv, labels, delta, r0, r1, c0, c1)
            s.sub_(lse[r0:r1, None]).exp_()
            minus_one = torch.full((r,), -1.0, device=dev, dtype=dt)
            inside = add_target_delta(s, labels[r0:r1], minus_one, c0)
            if d_t is not None:
                local = (labels[r0:r1] - c0).clamp(0, c1 - c0 - 1)
                d_t[r0:r1] = torch.where(inside, s[torch.arange(r, device=dev), local], d_t[r0:r1])
            if inv is not None:
                s.mul_(inv[c0:c1])
            if d_rows is not None:
                out = d_rows[r0:r1]
                if c0 == 0:
                    torch.mm(s, weights[c0:c1], out=out)
                else:
                    torch.addmm(out, s, weights[c0:c1], out=out)
            if d_w is not None:
                acc = d_w[c0:c1]
                torch.addmm(acc, s.T, a_hat[r0:r1], out=acc)
    return total


class ClassHeadFunction(torch.autograd.Function):
    """The class-head loss; gradients formed in forward (see the module docstring).

    Inputs: a_hat (N, D), weights (C, D), tau 0-dim, labels (N,) int64, config, need.
    Output: the 0-dim loss in the compute dtype.
    """

    @staticmethod
    def forward(ctx, a_hat, weights, tau, labels, config, need):
        loss, grads = _class_head_pass(a_hat, weights, tau, labels, config, need)
        ctx.save_for_backward(a_hat, weights, tau, labels)
        ctx.config, ctx.need = config, need
        ctx.grads = grads  # the first backward takes them (in place), a later one forms them again
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_double_backward("torch", torch.is_grad_enabled(), torch.compiler.is_compiling())
        grads, ctx.grads = ctx.grads, None
        if grads is None:  # a second backward through a retained graph
            a_hat, weights, tau, labels = ctx.saved_tensors
            with torch.no_grad():
                grads = _class_head_pass(a_hat, weights, tau, labels, ctx.config, ctx.need)[1]
        g = grad_loss.to(grads.d_rows.dtype if grads.d_rows is not None else
                         (grads.d_weights.dtype if grads.d_weights is not None else grads.d_tau.dtype))
        d_rows, d_w, d_tau = (None if x is None else x.mul_(g) for x in grads)
        del grads
        return d_rows, d_w, d_tau, None, None, None
