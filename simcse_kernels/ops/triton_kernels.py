r"""Triton kernels of the fused InfoNCE family (``@triton.jit`` functions only).

Launch wrappers, block-size heuristics, autotuning and the autograd/custom-op glue live in
:mod:`simcse_kernels.ops.triton_loss`; the default backward's ``∂L/∂s`` kernel is in
:mod:`simcse_kernels.ops.triton_dlogits` (it reuses :func:`_cos_tile` and :func:`_dlogits`).
The math (logit layout of every option and the gradient derivation) is written once in
:mod:`simcse_kernels.reference`; the kernels mirror the chunked torch backend
:mod:`simcse_kernels.ops.chunked` tile by tile.

Conventions shared by every kernel
----------------------------------
* Feature matrices are contiguous row-major ``(rows, D)`` in their storage dtype (fp16, bf16,
  fp32, fp64); row ``r`` starts at ``ptr + r * D`` (int64 offsets).
* ``r*`` pointers are inverse norms ``1 / max(‖x‖, 1e-12)``, shape ``(rows,)``, in the compute
  dtype ``ACC_DTYPE`` (fp32, or fp64 for fp64 inputs). Cosines are ``dot(x_i, y_j) · rx_i · ry_j``:
  the raw rows feed ``tl.dot`` (fp32/fp64 accumulation), never a normalized copy.
* A logit tile is ``cos / tau`` plus the constant pattern of its block:

  ====== ========================================================================
  0      none (positives block)
  1      ``+w`` at ``(i, i)`` (hard negatives: column ``P + i``)
  2      ``-inf`` at ``(i, i)`` (anchor-vs-anchor negatives)
  3      MixCSE mix3: logit ``0`` at ``(i, (i - 1) mod N)``, then ``+w`` at ``(i, i)``
  4      MixCSE mix4: logit ``0`` at ``(i, (i + 1) mod N)``, then ``+w`` at ``(i, i)``
  ====== ========================================================================

* ``tau_ptr``/``w_ptr``: 1-element tensors in ``ACC_DTYPE`` (temperature and hard-negative
  log-weight; tensors rather than scalar arguments so fp64 runs keep fp64 constants and a
  learnable tau needs no host sync).
* ``DOT_PREC``: ``input_precision`` of the cosine dots ("ieee", or "tf32" when
  ``torch.backends.cuda.matmul.allow_tf32`` is set; ignored for 16-bit inputs).
  ``GRAD_DTYPE``/``GRAD_PREC``: operand dtype and precision of the atomic backward's gradient dots
  (bf16 for bf16 inputs; fp32 with "tf32x3" for fp16 inputs, because ``∂L/∂s`` underflows
  fp16 at large N; the compute dtype with ``DOT_PREC`` otherwise).
* MixCSE blocks, forward and default backward (``∂L/∂s`` kernel): by linearity, with
  ``p_{j+1} = p_{(j+1) mod N}`` and ``a_{i+1} = a_{(i+1) mod N}`` (MixCSE requires P = N),
  ``a_i·mix3_j = λ (a_i·p_j) + (1-λ) (a_i·p_{j+1})`` and ``mix4_i·p_j = λ (a_i·p_j) + (1-λ)
  (a_{i+1}·p_j)``. So each (row tile, column tile) of the positives block runs three raw dots of the
  input dtype (:func:`_raw_dot_tile`: ``D0 = a_m·p_n``, ``D1 = a_m·p_{n+1}``, ``D2 = a_{m+1}·p_n``,
  one after the other so that at most two accumulators are live: three in one K loop spilled
  registers) and forms the positives, mix3 and mix4 tiles (:func:`_mix_cos`); the mixtures' inverse
  norms still come from the fp32 mixtures. That is exactly one dot per logit tile in every dtype, no
  fp32 operand in a 16-bit dot and no split parts: 16-bit products are exact with fp32
  accumulation (the only rounding beyond that is the fp32 combination ``λ D0 + (1-λ) D1``, against the
  fp32 rounding of the stored mixture before). The split needed 3 bf16 / 2 fp16 dots per mixed
  tile (~6 / ~4.7 GEMM-equivalents fwd+bwd in bf16 / fp16), and "tf32x3" spilled on sm_80.
  fp32/fp64 inputs have mixtures in their own dtype, so their mix3/mix4 blocks stay separate
  segments / tile programs that dot the mixtures directly (one dot per tile as well; the fused
  form, which keeps ``D0`` live across two more fp32 CUDA-core dots, spilled registers).
* ``MIXED`` segments of the atomic backward (``SIMCSE_TRITON_BWD=atomic``, the alternative path)
  still dot the fp32 mixtures: a 16-bit input against an fp32 mixture is split into 16-bit parts
  (:func:`_split_dot`: 3 bf16 / 2 fp16 parts, fp32-accurate). The atomic backward's gradient
  dots treat a mixture as the other blocks treat their columns: bf16 inputs dot ``∂L/∂s`` in
  bf16 against the mixture rounded to bf16 (one more 2^-8 relative rounding of that block's
  gradient terms; 2 parts spilled registers on sm_80); fp16 inputs use ``GRAD_DTYPE``/``GRAD_PREC``.
  fp32/fp64 inputs: both operands in ``ACC_DTYPE``, dotted with ``MIX_PREC`` (= ``DOT_PREC``).
"""

from __future__ import annotations

import triton
import triton.language as tl

NORM_EPS = tl.constexpr(1e-12)


@triton.jit
def _inv_norm_kernel(x_ptr, out_ptr, R, D,
                     ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Inverse L2 norms ``out[r] = 1 / max(‖x_r‖, 1e-12)``.

    Args:
        x_ptr: (R, D) rows, any float dtype.
        out_ptr: (R,) output in ``ACC_DTYPE``.
        R, D: rows and feature dimension.
    Grid: ``(cdiv(R, BLOCK_R),)``.
    """
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    rows = x_ptr + offs_r.to(tl.int64)[:, None] * D
    sq = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(rows + offs_d[None, :], mask=mask_r[:, None] & (offs_d[None, :] < D), other=0.0)
        x = x.to(ACC_DTYPE)
        sq += tl.sum(x * x, axis=1)
    inv = 1.0 / tl.maximum(tl.sqrt(sq), NORM_EPS)
    tl.store(out_ptr + offs_r, inv, mask=mask_r)


@triton.jit
def _split_dot(a, b, acc, PARTS: tl.constexpr):
    """``acc + a @ b`` on 16-bit tensor cores for one 16-bit and one fp32 operand (either side).

    Args:
        a: (M, K), b: (K, N) tiles; exactly one is fp32, the other fp16 or bf16 (dtype ``T``).
        acc: (M, N) fp32 accumulator.
        PARTS: 1, 2 or 3 (bf16 only; fp16 always uses 2).

    The fp32 operand ``f`` is split into ``T`` parts ``f ≈ hi + mid (+ lo)``: ``hi = rn_T(f)``,
    each next part rounds the exact fp32 remainder (``f - hi`` is exact in fp32). The 16-bit
    operand is exact in ``T``, so ``a @ b`` is the sum of 2-3 plain ``T`` dots with fp32
    accumulation and the only error beyond fp32 accumulation is the dropped remainder:
    ``<= 2^-24 |f|`` per element for bf16 with 3 parts (the fp32 storage rounding of ``f``
    itself), ``2^-16 |f|`` with 2, ``2^-8 |f|`` with 1 (``f`` rounded to bf16); ``2^-22 |f|``
    for fp16, whose second part is scaled by ``2^11`` before rounding so that it never becomes subnormal (its product is scaled back).
    Cheaper than ``input_precision="tf32x3"`` on fp32 operands (three tf32 dots on tiles twice the
    size), which made ptxas spill the MixCSE kernels on sm_80.
    """
    if a.dtype == tl.float32:
        t = b.dtype
        hi = a.to(t)
        rest = a - hi.to(tl.float32)
        acc = tl.dot(hi, b, acc)
        if t == tl.float16:
            acc += tl.dot((rest * 2048.0).to(t), b) * (1.0 / 2048.0)
        elif PARTS >= 2:
            mid = rest.to(t)
            acc = tl.dot(mid, b, acc)
            if PARTS == 3:
                acc = tl.dot((rest - mid.to(tl.float32)).to(t), b, acc)
    else:
        t = a.dtype
        hi = b.to(t)
        rest = b - hi.to(tl.float32)
        acc = tl.dot(a, hi, acc)
        if t == tl.float16:
            acc += tl.dot(a, (rest * 2048.0).to(t)) * (1.0 / 2048.0)
        elif PARTS >= 2:
            mid = rest.to(t)
            acc = tl.dot(a, mid, acc)
            if PARTS == 3:
                acc = tl.dot(a, (rest - mid.to(tl.float32)).to(t), acc)
    return acc


@triton.jit
def _cos_tile(x_ptr, rx_ptr, offs_m, mask_m, y_ptr, ry_ptr, offs_n, mask_n, D,
              ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Cosine tile ``(BLOCK_M, BLOCK_N)``: ``dot(x_m, y_n) · rx_m · ry_n``, 0 outside the masks.

    ``x`` rows ``offs_m`` and ``y`` rows ``offs_n`` of two (·, D) matrices; the dot (and ``UPCAST``,
    MixCSE's mixed-dtype segments) is :func:`_raw_dot_tile`'s.
    """
    acc = _raw_dot_tile(x_ptr, offs_m, mask_m, y_ptr, offs_n, mask_n, D, ACC_DTYPE, UPCAST, DOT_PREC,
                        BLOCK_M, BLOCK_N, BLOCK_K)
    rx = tl.load(rx_ptr + offs_m, mask=mask_m, other=0.0)
    ry = tl.load(ry_ptr + offs_n, mask=mask_n, other=0.0)
    return acc * rx[:, None] * ry[None, :]


@triton.jit
def _masked_entry(offs_m, offs_n, n_anchor, PATTERN: tl.constexpr):
    """MixCSE's constant entry of row i: column ``(i - 1) mod N`` (mix3) or ``(i + 1) mod N`` (mix4)."""
    if PATTERN == 3:
        partner = (offs_m + n_anchor - 1) % n_anchor
    else:
        partner = (offs_m + 1) % n_anchor
    return offs_n[None, :] == partner[:, None]


@triton.jit
def _logits(cos, inv_tau, w, offs_m, offs_n, n_anchor, PATTERN: tl.constexpr):
    """Logit tile ``cos / tau`` with the block's constant pattern (see module docstring)."""
    s = cos * inv_tau
    diag = offs_m[:, None] == offs_n[None, :]
    if PATTERN == 1:
        s = tl.where(diag, s + w, s)
    if PATTERN == 2:
        s = tl.where(diag, float("-inf"), s)
    if PATTERN >= 3:
        s = tl.where(_masked_entry(offs_m, offs_n, n_anchor, PATTERN), 0.0, s)
        s = tl.where(diag, s + w, s)
    return s


@triton.jit
def _target_hit(offs_n, mask_n, col_offset, labels):
    """(BLOCK_M, BLOCK_N) mask of the tile's target entries ``(i, labels[i])``."""
    return mask_n[None, :] & ((offs_n[None, :] + col_offset) == labels[:, None])


@triton.jit
def _margin_logits(s, offs_n, mask_n, col_offset, labels, tdelta, inv_tau, MARGIN: tl.constexpr):
    """Target entries of a logit tile with their margin: ``s + δ_i / tau`` at ``(i, labels[i])``.

    ``tdelta`` (BLOCK_M,): ``f(c_i) − m − c_i`` per row (reference.py, "Margins"), precomputed from
    the target cosine; ``MARGIN=False`` returns ``s`` unchanged.
    """
    if MARGIN:
        s = tl.where(_target_hit(offs_n, mask_n, col_offset, labels), s + (tdelta * inv_tau)[:, None], s)
    return s


@triton.jit
def _margin_chain(ds, cos, offs_n, mask_n, col_offset, labels, tdelta, tgrad, MARGIN: tl.constexpr):
    """The margin epilogue of a ``∂L/∂s`` tile: ``(ds for the features, ds · sim for ∂tau)``.

    At the target entries the features' gradient gets the chain-rule factor ``f'(c_i)`` (``tgrad``,
    (BLOCK_M,)) and the temperature's term reads the modified similarity ``f(c_i) − m = c_i + δ_i``
    (``tdelta``): ``∂L/∂tau`` sums ``−ds · (f(c) − m) / tau²`` there. Without ``MARGIN``:
    ``(ds, ds · cos)``.
    """
    if MARGIN:
        hit = _target_hit(offs_n, mask_n, col_offset, labels)
        tau_term = ds * tl.where(hit, cos + tdelta[:, None], cos)
        return tl.where(hit, ds * tgrad[:, None], ds), tau_term
    return ds, ds * cos


@triton.jit
def _dlogits(cos, inv_tau, w, offs_m, mask_m, offs_n, mask_n, n_anchor, col_offset,
             lse, rw, g, labels, cw, clse, tdelta,
             PATTERN: tl.constexpr, TARGET: tl.constexpr, SYM: tl.constexpr, MARGIN: tl.constexpr):
    """``∂L/∂s`` tile (reference.py, "Gradient"): ``rw_i σ_ij (+ cw_j σ'_ij) − g_i [col = l_i]``.

    ``lse, rw, g, labels``: (BLOCK_M,) row LSE, softmax weight (g or g/2), upstream grad, target
    column. ``cw, clse``: (BLOCK_N,) column weight ``½ Σ_{l_i = j} g_i`` and column LSE (``SYM``).
    ``col_offset``: global column of the segment's first column (targets live in [0, P + K)).
    ``tdelta`` (BLOCK_M,): the targets' margin shift (``MARGIN`` and ``TARGET``:
    :func:`_margin_logits`); the chain rule at the targets is :func:`_margin_chain`'s.
    Constant (masked) logits and out-of-range entries get 0.
    """
    s = _logits(cos, inv_tau, w, offs_m, offs_n, n_anchor, PATTERN)
    if TARGET:
        s = _margin_logits(s, offs_n, mask_n, col_offset, labels, tdelta, inv_tau, MARGIN)
    ds = rw[:, None] * tl.exp(s - lse[:, None])
    if SYM:
        ds += cw[None, :] * tl.exp(s - clse[None, :])
    if TARGET:
        hit = _target_hit(offs_n, mask_n, col_offset, labels)
        ds -= tl.where(hit, g[:, None], 0.0)
    if PATTERN >= 3:
        ds = tl.where(_masked_entry(offs_m, offs_n, n_anchor, PATTERN), 0.0, ds)
    return tl.where(mask_m[:, None] & mask_n[None, :], ds, 0.0)


@triton.jit
def _raw_dot_tile(x_ptr, offs_m, mask_m, y_ptr, offs_n, mask_n, D,
                  ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Raw dot tile ``(BLOCK_M, BLOCK_N)``: ``x_m · y_n`` of rows ``offs_m`` of ``x`` and ``offs_n`` of ``y``.

    Args: x_ptr, y_ptr: two (·, D) matrices; offs/mask: (BLOCK_M,), (BLOCK_N,) rows (0 outside the
    masks). One K loop of ``BLOCK_K`` steps, ``tl.dot`` with ``ACC_DTYPE`` accumulation
    (``DOT_PREC``; exact products for 16-bit inputs). ``UPCAST`` (mixed-dtype segments: MixCSE's fp32
    mixtures): a 16-bit operand against an fp32 one runs as 16-bit dots of split parts
    (:func:`_split_dot`, ``DOT_PREC`` unused); otherwise both operands are cast to ``ACC_DTYPE``.
    Used by :func:`_cos_tile` and, with ``UPCAST=False``, for MixCSE's positives tile and its two
    shifted partners (module docstring, "MixCSE blocks").
    """
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * D
    y_cols = y_ptr + offs_n.to(tl.int64)[None, :] * D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        mk = kk < D
        x = tl.load(x_rows + kk[None, :], mask=mask_m[:, None] & mk[None, :], other=0.0)
        y = tl.load(y_cols + kk[:, None], mask=mk[:, None] & mask_n[None, :], other=0.0)
        if UPCAST and (x.dtype != y.dtype) and (ACC_DTYPE == tl.float32):
            acc = _split_dot(x, y, acc, 3)  # a 16-bit input against an fp32 mixture
        else:
            if UPCAST:
                x = x.to(ACC_DTYPE)
                y = y.to(ACC_DTYPE)
            acc = tl.dot(x, y, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _margin_row_terms(tdelta_ptr, tgrad_ptr, offs_m, mask_m, MARGIN: tl.constexpr, ACC_DTYPE: tl.constexpr,
                      BLOCK_M: tl.constexpr):
    """(BLOCK_M,) target-logit shift ``(f(c) − m − c)/tau`` and chain factor ``f'(c)`` of rows ``offs_m``
    (zeros unless ``MARGIN``; see reference.py)."""
    if MARGIN:
        tdelta = tl.load(tdelta_ptr + offs_m, mask=mask_m, other=0.0).to(ACC_DTYPE)
        tgrad = tl.load(tgrad_ptr + offs_m, mask=mask_m, other=0.0).to(ACC_DTYPE)
    else:
        tdelta = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
        tgrad = tdelta
    return tdelta, tgrad


@triton.jit
def _column_terms(cw_ptr, clse_ptr, offs_n, mask_n, SYM: tl.constexpr, ACC_DTYPE: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """(BLOCK_N,) symmetric column weight and column LSE of columns ``offs_n`` (zeros unless ``SYM``)."""
    if SYM:
        cw = tl.load(cw_ptr + offs_n, mask=mask_n, other=0.0)
        clse = tl.load(clse_ptr + offs_n, mask=mask_n, other=0.0)
    else:
        cw = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
        clse = cw
    return cw, clse


@triton.jit
def _mix_cos(d0, d_shift, lam, one_m_lam, rx_ptr, offs_m, mask_m, ry_ptr, offs_n, mask_n):
    """MixCSE cosine tile by linearity: ``(λ d0 + (1-λ) d_shift) · rx_m · ry_n``.

    Args:
        d0: (BLOCK_M, BLOCK_N) raw ``a_m·p_n``; d_shift: raw ``a_m·p_{(n+1) mod N}`` (mix3) or
            ``a_{(m+1) mod N}·p_n`` (mix4); lam, one_m_lam: λ and 1 - λ.
        rx_ptr, ry_ptr: inverse norms of the block's rows (anchors / mix4) and columns (mix3 /
            positives), indexed by ``offs_m``, ``offs_n``.
    The forward and the ``∂L/∂s`` kernel both use it, so their MixCSE logits are the same values.
    """
    rx = tl.load(rx_ptr + offs_m, mask=mask_m, other=0.0)
    ry = tl.load(ry_ptr + offs_n, mask=mask_n, other=0.0)
    return (lam * d0 + one_m_lam * d_shift) * rx[:, None] * ry[None, :]


@triton.jit
def _lse_update(m_i, l_i, t_i, s, offs_n, mask_n, col_offset, labels, tdelta, inv_tau,
                TARGET: tl.constexpr, MARGIN: tl.constexpr):
    """One logit tile's online log-sum-exp update.

    Args:
        m_i, l_i, t_i: (BLOCK_M,) running max, running sum of ``exp(s - m_i)`` and target logit.
        s: (BLOCK_M, BLOCK_N) logit tile (``_logits``); offs_n, mask_n: (BLOCK_N,) its columns.
        col_offset: global label column of the segment's first column; labels: (BLOCK_M,) targets.
        TARGET: the segment holds target columns (adds the logit at column ``labels`` to ``t_i``).
        tdelta, inv_tau, MARGIN: the targets' margin (:func:`_margin_logits`; ``TARGET`` segments).
    Returns the updated ``(m_i, l_i, t_i)``.
    """
    if TARGET:
        s = _margin_logits(s, offs_n, mask_n, col_offset, labels, tdelta, inv_tau, MARGIN)
    s = tl.where(mask_n[None, :], s, float("-inf"))
    if TARGET:
        hit = mask_n[None, :] & ((offs_n[None, :] + col_offset) == labels[:, None])
        t_i += tl.sum(tl.where(hit, s, 0.0), axis=1)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
    return m_new, l_i, t_i


@triton.jit
def _row_lse_pos_mix_segment(m_i, l_i, t_i, a_ptr, ra_ptr, offs_m, mask_m, p_ptr, rp_ptr, rmix3_ptr,
                             rmix4_ptr, labels, tdelta, inv_tau, w, lam, one_m_lam, N, D,
                             MARGIN: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Online LSE of rows ``offs_m`` over the positives, mix3 and mix4 blocks at once (MixCSE, P = N).

    Per column tile ``n``: ``D0 = a_m·p_n`` (:func:`_raw_dot_tile`) gives the positives tile
    (pattern 0, targets); ``D1 = a_m·p_{(n+1) mod N}`` gives mix3's (pattern 3) and ``D2 =
    a_{(m+1) mod N}·p_n`` mix4's (pattern 4), via :func:`_mix_cos`: 3 dots for 3 logit tiles. The
    three dots run one after the other, each tile updating ``(m_i, l_i, t_i)`` at once, so at most
    two accumulators are live (three in one K loop spilled registers on sm_80/sm_90). 16-bit inputs
    only (fp32/fp64 use separate segments: module docstring). Args as :func:`_row_lse_segment` plus
    rmix3/rmix4_ptr (N,) and the scalars ``lam``, ``one_m_lam``. Returns ``(m_i, l_i, t_i)``.
    """
    next_m = (offs_m + 1) % N
    for j0 in range(0, N, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        d0 = _raw_dot_tile(a_ptr, offs_m, mask_m, p_ptr, offs_n, mask_n, D,
                           ACC_DTYPE, False, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        ra = tl.load(ra_ptr + offs_m, mask=mask_m, other=0.0)
        rp = tl.load(rp_ptr + offs_n, mask=mask_n, other=0.0)
        cos = d0 * ra[:, None] * rp[None, :]
        m_i, l_i, t_i = _lse_update(m_i, l_i, t_i, _logits(cos, inv_tau, w, offs_m, offs_n, N, 0),
                                    offs_n, mask_n, 0, labels, tdelta, inv_tau, True, MARGIN)
        d1 = _raw_dot_tile(a_ptr, offs_m, mask_m, p_ptr, (offs_n + 1) % N, mask_n, D,
                           ACC_DTYPE, False, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        cos = _mix_cos(d0, d1, lam, one_m_lam, ra_ptr, offs_m, mask_m, rmix3_ptr, offs_n, mask_n)
        m_i, l_i, t_i = _lse_update(m_i, l_i, t_i, _logits(cos, inv_tau, w, offs_m, offs_n, N, 3),
                                    offs_n, mask_n, 0, labels, tdelta, inv_tau, False, False)
        d2 = _raw_dot_tile(a_ptr, next_m, mask_m, p_ptr, offs_n, mask_n, D,
                           ACC_DTYPE, False, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        cos = _mix_cos(d0, d2, lam, one_m_lam, rmix4_ptr, offs_m, mask_m, rp_ptr, offs_n, mask_n)
        m_i, l_i, t_i = _lse_update(m_i, l_i, t_i, _logits(cos, inv_tau, w, offs_m, offs_n, N, 4),
                                    offs_n, mask_n, 0, labels, tdelta, inv_tau, False, False)
    return m_i, l_i, t_i


@triton.jit
def _row_lse_segment(m_i, l_i, t_i, x_ptr, rx_ptr, offs_m, mask_m, y_ptr, ry_ptr, n_cols, col_offset,
                     labels, tdelta, inv_tau, w, n_anchor, D,
                     PATTERN: tl.constexpr, TARGET: tl.constexpr, MARGIN: tl.constexpr, UPCAST: tl.constexpr,
                     ACC_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Online LSE of rows ``offs_m`` over one column segment (``n_cols`` rows of ``y``).

    ``m_i, l_i``: (BLOCK_M,) running max and sum; ``t_i``: running target logit (``TARGET``:
    adds the logit at global column ``labels``, with the margin shift ``tdelta`` when ``MARGIN``).
    Returns the updated ``(m_i, l_i, t_i)``.
    """
    for j0 in range(0, n_cols, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_cols
        cos = _cos_tile(x_ptr, rx_ptr, offs_m, mask_m, y_ptr, ry_ptr, offs_n, mask_n, D,
                        ACC_DTYPE, UPCAST, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        s = _logits(cos, inv_tau, w, offs_m, offs_n, n_anchor, PATTERN)
        m_i, l_i, t_i = _lse_update(m_i, l_i, t_i, s, offs_n, mask_n, col_offset, labels, tdelta, inv_tau,
                                    TARGET, MARGIN and TARGET)
    return m_i, l_i, t_i


@triton.jit
def _fwd_row_kernel(a_ptr, ra_ptr, p_ptr, rp_ptr, neg_ptr, rneg_ptr, mix3_ptr, rmix3_ptr, mix4_ptr, rmix4_ptr,
                    tau_ptr, w_ptr, lam_ptr, labels_ptr, tdelta_ptr, lse_ptr, tgt_ptr, N, P, K, D,
                    HAS_NEG: tl.constexpr, ANCHOR_NEG: tl.constexpr, HAS_MIX: tl.constexpr,
                    MARGIN: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Forward over anchor row blocks: per-row LSE over every block and the target logit.

    Args:
        a_ptr (N, D), p_ptr (P, D), neg_ptr (K, D; ``HAS_NEG``): raw features, input dtype.
        mix3_ptr, mix4_ptr (N, D; ``HAS_MIX``): detached raw MixCSE mixtures, ``ACC_DTYPE`` (read
            for fp32/fp64 inputs only: 16-bit inputs form their blocks by linearity, :func:`_mix_cos`).
        ra/rp/rneg/rmix3/rmix4_ptr: matching inverse norms (rmix3/rmix4 of the fp32 mixtures).
        tau_ptr, w_ptr: (1,) temperature and hard-negative weight; lam_ptr: (2,) ``[λ, 1 - λ]``
            (``HAS_MIX``), all ``ACC_DTYPE``.
        labels_ptr (N,) int64: target columns in [0, P + K).
        tdelta_ptr (N,; ``MARGIN``): ``f(c_i) − m − c_i``, the margin shift of each row's target
            similarity (reference.py, "Margins"), ``ACC_DTYPE``; added as ``/ tau`` to the target logit.
        lse_ptr, tgt_ptr (N,) outputs: row log-sum-exp and target logit, ``ACC_DTYPE``.
    Grid: ``(cdiv(N, BLOCK_M),)``. Segments: positives (16-bit MixCSE: with mix3 and mix4 fused
    into the same column-tile loop, P = N), negatives (+w at P+i), anchors (-inf at i;
    ``ANCHOR_NEG``), then fp32/fp64 MixCSE's mix3 and mix4 segments; the online LSE does not depend
    on the order.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    inv_tau = 1.0 / tl.load(tau_ptr).to(ACC_DTYPE)
    w = tl.load(w_ptr).to(ACC_DTYPE)
    labels = tl.load(labels_ptr + offs_m, mask=mask_m, other=-1)
    if MARGIN:
        tdelta = tl.load(tdelta_ptr + offs_m, mask=mask_m, other=0.0).to(ACC_DTYPE)
    else:
        tdelta = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    t_i = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    LINEAR: tl.constexpr = HAS_MIX and (a_ptr.dtype.element_ty != ACC_DTYPE)  # 16-bit MixCSE
    if LINEAR:
        lam = tl.load(lam_ptr).to(ACC_DTYPE)
        one_m_lam = tl.load(lam_ptr + 1).to(ACC_DTYPE)
        m_i, l_i, t_i = _row_lse_pos_mix_segment(m_i, l_i, t_i, a_ptr, ra_ptr, offs_m, mask_m, p_ptr, rp_ptr,
                                                 rmix3_ptr, rmix4_ptr, labels, tdelta, inv_tau, w, lam,
                                                 one_m_lam, N, D, MARGIN, ACC_DTYPE, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        m_i, l_i, t_i = _row_lse_segment(m_i, l_i, t_i, a_ptr, ra_ptr, offs_m, mask_m, p_ptr, rp_ptr, P, 0,
                                         labels, tdelta, inv_tau, w, N, D, 0, True, MARGIN, False,
                                         ACC_DTYPE, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_NEG:
        m_i, l_i, t_i = _row_lse_segment(m_i, l_i, t_i, a_ptr, ra_ptr, offs_m, mask_m,
                                         neg_ptr, rneg_ptr, K, P,
                                         labels, tdelta, inv_tau, w, N, D, 1, True, MARGIN, False,
                                         ACC_DTYPE, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    if ANCHOR_NEG:
        m_i, l_i, t_i = _row_lse_segment(m_i, l_i, t_i, a_ptr, ra_ptr, offs_m, mask_m, a_ptr, ra_ptr, N, 0,
                                         labels, tdelta, inv_tau, w, N, D, 2, False, False, False,
                                         ACC_DTYPE, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_MIX and not LINEAR:  # fp32/fp64: the mixtures are in the input dtype, one plain dot per tile
        m_i, l_i, t_i = _row_lse_segment(m_i, l_i, t_i, a_ptr, ra_ptr, offs_m, mask_m,
                                         mix3_ptr, rmix3_ptr, N, 0,
                                         labels, tdelta, inv_tau, w, N, D, 3, False, False, False,
                                         ACC_DTYPE, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        m_i, l_i, t_i = _row_lse_segment(m_i, l_i, t_i, mix4_ptr, rmix4_ptr, offs_m, mask_m,
                                         p_ptr, rp_ptr, N, 0,
                                         labels, tdelta, inv_tau, w, N, D, 4, False, False, False,
                                         ACC_DTYPE, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(lse_ptr + offs_m, m_i + tl.log(l_i), mask=mask_m)
    tl.store(tgt_ptr + offs_m, t_i, mask=mask_m)


@triton.jit
def _fwd_col_kernel(a_ptr, ra_ptr, p_ptr, rp_ptr, tau_ptr, labels_ptr, tdelta_ptr, clse_ptr, N, P, D,
                    MARGIN: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Symmetric loss: column LSE of the positives block, ``clse[j] = logsumexp_i â_i·p̂_j / tau``.

    Args: a_ptr (N, D), p_ptr (P, D) raw features; ra/rp_ptr inverse norms; tau_ptr (1,);
    labels_ptr (N,) int64 and tdelta_ptr (N,) (read with ``MARGIN``: the column direction reads the
    rows' margined targets, :func:`_margin_logits`); clse_ptr (P,) output in ``ACC_DTYPE``.
    Grid: ``(cdiv(P, BLOCK_N),)``, looping over anchors.
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < P
    inv_tau = 1.0 / tl.load(tau_ptr).to(ACC_DTYPE)
    m_j = tl.full((BLOCK_N,), float("-inf"), dtype=ACC_DTYPE)
    l_j = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for i0 in range(0, N, BLOCK_M):
        offs_m = i0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        cos = _cos_tile(a_ptr, ra_ptr, offs_m, mask_m, p_ptr, rp_ptr, offs_n, mask_n, D,
                        ACC_DTYPE, False, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        s = cos * inv_tau
        if MARGIN:
            labels = tl.load(labels_ptr + offs_m, mask=mask_m, other=-1)
            tdelta = tl.load(tdelta_ptr + offs_m, mask=mask_m, other=0.0).to(ACC_DTYPE)
            s = _margin_logits(s, offs_n, mask_n, 0, labels, tdelta, inv_tau, True)
        s = tl.where(mask_m[:, None], s, float("-inf"))
        m_new = tl.maximum(m_j, tl.max(s, axis=0))
        l_j = l_j * tl.exp(m_j - m_new) + tl.sum(tl.exp(s - m_new[None, :]), axis=0)
        m_j = m_new
    tl.store(clse_ptr + offs_n, m_j + tl.log(l_j), mask=mask_n)


@triton.jit
def _norm_bwd_kernel(x_ptr, r_ptr, g1_ptr, g2_ptr, out_ptr, R, D,
                     HAS_SECOND: tl.constexpr, ACC_DTYPE: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Normalization backward ``∂x = r · (∂x̂ − x̂ (x̂ · ∂x̂))`` (``x̂ = r x``, ``r = 1/max(‖x‖, eps)``).

    When ``‖x‖ <= eps`` the clamp is active and ``∂x = r ∂x̂`` (as ``F.normalize``).

    Args:
        x_ptr (R, D): raw rows (input dtype). r_ptr (R,): inverse norms.
        g1_ptr, g2_ptr (R, D): ``∂L/∂x̂`` in ``ACC_DTYPE``, summed when ``HAS_SECOND``.
        out_ptr (R, D): ``∂L/∂x`` in the input dtype.
    Grid: ``(cdiv(R, BLOCK_R),)``; two passes over D (the row dot, then the write).
    """
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    base = offs_r.to(tl.int64)[:, None] * D
    dot = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    sq = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_r[:, None] & (offs_d[None, :] < D)
        x = tl.load(x_ptr + base + offs_d[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        gz = tl.load(g1_ptr + base + offs_d[None, :], mask=mask, other=0.0)
        if HAS_SECOND:
            gz += tl.load(g2_ptr + base + offs_d[None, :], mask=mask, other=0.0)
        dot += tl.sum(x * gz, axis=1)
        sq += tl.sum(x * x, axis=1)
    r = tl.load(r_ptr + offs_r, mask=mask_r, other=0.0)
    # x̂ · ∂x̂ = r (x · ∂x̂); the projection term is r · x̂ (x̂ · ∂x̂) = r³ (x · ∂x̂) x.
    coef = tl.where(tl.sqrt(sq) > NORM_EPS, r * r * r * dot, 0.0)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_r[:, None] & (offs_d[None, :] < D)
        x = tl.load(x_ptr + base + offs_d[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        gz = tl.load(g1_ptr + base + offs_d[None, :], mask=mask, other=0.0)
        if HAS_SECOND:
            gz += tl.load(g2_ptr + base + offs_d[None, :], mask=mask, other=0.0)
        out = r[:, None] * gz - coef[:, None] * x
        tl.store(out_ptr + base + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tile_atomic_kernel(x_ptr, rx_ptr, y_ptr, ry_ptr, tau_ptr, w_ptr, labels_ptr, lse_ptr, g_ptr,
                            cw_ptr, clse_ptr, tdelta_ptr, tgrad_ptr, dx_ptr, dy_ptr, dtau_ptr, N, n_cols, D,
                            col_offset, PATTERN: tl.constexpr, TARGET: tl.constexpr, MARGIN: tl.constexpr,
                            SYMMETRIC: tl.constexpr,
                            SYM_COLS: tl.constexpr, MIXED: tl.constexpr, ROW_GRAD: tl.constexpr,
                            COL_GRAD: tl.constexpr, NEED_DTAU: tl.constexpr,
                            ACC_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                            GRAD_DTYPE: tl.constexpr, GRAD_PREC: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_DO: tl.constexpr):
    """Alternative backward (``SIMCSE_TRITON_BWD=atomic``): one program per (row, column) tile.

    Recomputes the tile's logits once (full-D dot), forms ``∂L/∂s`` (:func:`_dlogits`), then walks
    D in ``BLOCK_DO`` chunks and atomically adds ``∂L/∂s · ŷ / tau`` into the rows' ``∂x̂``
    (``ROW_GRAD``) and ``(∂L/∂s)ᵀ · x̂ / tau`` into the columns' ``∂ŷ`` (``COL_GRAD``); the row sums
    ``Σ_j ∂L/∂s_ij cos_ij`` go atomically into ``dtau_ptr`` (``NEED_DTAU``). Logit work is the
    minimum (one recomputation) at the price of fp32/fp64 atomics and run-to-run nondeterminism.

    Args:
        x_ptr (N, D): row features (anchors, or mix4 for the mix4 block); y_ptr (n_cols, D): the
            block's columns; rx/ry_ptr their inverse norms. ``MIXED``: the MixCSE blocks.
        tau_ptr, w_ptr: (1,) temperature and hard-negative weight; labels_ptr, lse_ptr, g_ptr (N,):
            targets, row LSE, ∂L/∂ℓ; cw_ptr, clse_ptr (P,): symmetric column weight and LSE.
        tdelta_ptr, tgrad_ptr (N,; ``MARGIN``, a ``TARGET`` block): the targets' margin shift
            ``f(c) − m − c`` and chain-rule factor ``f'(c)`` (:func:`_margin_chain`).
        dx_ptr (N, D), dy_ptr (n_cols, D), dtau_ptr (N,): zero-initialised ``ACC_DTYPE`` outputs
            (dx and dy may be the same buffer: the anchor-negatives block).
        col_offset, PATTERN, TARGET, SYM_COLS: the block (global label column of its first column,
            constant pattern, whether targets live in it, symmetric column term).
    Grid: ``(cdiv(N, BLOCK_M), cdiv(n_cols, BLOCK_N))``.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_cols
    inv_tau = 1.0 / tl.load(tau_ptr).to(ACC_DTYPE)
    w = tl.load(w_ptr).to(ACC_DTYPE)
    labels = tl.load(labels_ptr + offs_m, mask=mask_m, other=-1)
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
    g = tl.load(g_ptr + offs_m, mask=mask_m, other=0.0)
    if SYMMETRIC:
        rw = 0.5 * g
    else:
        rw = g
    cw, clse = _column_terms(cw_ptr, clse_ptr, offs_n, mask_n, SYM_COLS, ACC_DTYPE, BLOCK_N)
    tdelta, tgrad = _margin_row_terms(tdelta_ptr, tgrad_ptr, offs_m, mask_m, MARGIN, ACC_DTYPE, BLOCK_M)
    cos = _cos_tile(x_ptr, rx_ptr, offs_m, mask_m, y_ptr, ry_ptr, offs_n, mask_n, D,
                    ACC_DTYPE, MIXED, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    ds = _dlogits(cos, inv_tau, w, offs_m, mask_m, offs_n, mask_n, N, col_offset,
                  lse, rw, g, labels, cw, clse, tdelta, PATTERN, TARGET, SYM_COLS, MARGIN)
    ds, tau_term = _margin_chain(ds, cos, offs_n, mask_n, col_offset, labels, tdelta, tgrad, MARGIN)
    if NEED_DTAU:
        tl.atomic_add(dtau_ptr + offs_m, tl.sum(tau_term, axis=1), mask=mask_m, sem="relaxed")
    rx = tl.load(rx_ptr + offs_m, mask=mask_m, other=0.0)
    ry = tl.load(ry_ptr + offs_n, mask=mask_n, other=0.0)
    dsc = ds * (ry * inv_tau)[None, :]
    dsr = ds * (rx * inv_tau)[:, None]
    x_rows = offs_m.to(tl.int64)[:, None] * D
    y_rows = offs_n.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_DO):
        offs_do = d0 + tl.arange(0, BLOCK_DO)
        mask_do = offs_do < D
        if ROW_GRAD:
            y = tl.load(y_ptr + y_rows + offs_do[None, :], mask=mask_n[:, None] & mask_do[None, :], other=0.0)
            if MIXED and GRAD_DTYPE != ACC_DTYPE:  # 16-bit ∂L/∂s against the fp32 mixture mix3
                part = _split_dot(dsc.to(GRAD_DTYPE), y, tl.zeros((BLOCK_M, BLOCK_DO), dtype=ACC_DTYPE), 1)
            elif MIXED:
                part = tl.dot(dsc.to(GRAD_DTYPE), y.to(GRAD_DTYPE), input_precision=GRAD_PREC,
                              out_dtype=ACC_DTYPE)
            else:
                part = tl.dot(dsc.to(GRAD_DTYPE), y.to(GRAD_DTYPE), input_precision=GRAD_PREC,
                              out_dtype=ACC_DTYPE)
            tl.atomic_add(dx_ptr + x_rows + offs_do[None, :], part, mask=mask_m[:, None] & mask_do[None, :],
                          sem="relaxed")
        if COL_GRAD:
            x = tl.load(x_ptr + x_rows + offs_do[None, :], mask=mask_m[:, None] & mask_do[None, :], other=0.0)
            if MIXED and GRAD_DTYPE != ACC_DTYPE:  # 16-bit ∂L/∂s against the fp32 mixture mix4
                part = _split_dot(tl.trans(dsr.to(GRAD_DTYPE)), x,
                                  tl.zeros((BLOCK_N, BLOCK_DO), dtype=ACC_DTYPE), 1)
            elif MIXED:
                part = tl.dot(tl.trans(dsr.to(GRAD_DTYPE)), x.to(GRAD_DTYPE), input_precision=GRAD_PREC,
                              out_dtype=ACC_DTYPE)
            else:
                part = tl.dot(tl.trans(dsr.to(GRAD_DTYPE)), x.to(GRAD_DTYPE), input_precision=GRAD_PREC,
                              out_dtype=ACC_DTYPE)
            tl.atomic_add(dy_ptr + y_rows + offs_do[None, :], part, mask=mask_n[:, None] & mask_do[None, :],
                          sem="relaxed")
