r"""Triton kernel of the default ("chunked") backward: ``∂L/∂s / tau`` for a chunk of anchor rows.

The launcher, the two gradient GEMMs and the reasoning behind the design are in
:mod:`simcse_kernels.ops.triton_loss` (section "Backward"). This module only holds the kernel; the
logit helpers (:func:`_cos_tile`, :func:`_dlogits`) are the forward's, imported from
:mod:`simcse_kernels.ops.triton_kernels`, so the recomputed logits are bit for bit the ones whose
log-sum-exp the forward saved.

Output layout
-------------
One (R, M_total) row-major buffer ``ds`` (leading dimension ``ld_ds = M_total``) holds, for the
anchor rows ``[row_start, row_end)``, every logit block of the reference's column order::

    [ P positives | K negatives | N anchors (anchor_negatives) | N mix3 | N mix4 ]

(blocks an option does not use are absent). Entry ``(i - row_start, c)`` is
``r_i · r_c · ∂L/∂s_ic / tau`` (``r`` = inverse norms of the entry's row and column features),
stored in the GEMM dtype, so the gradient GEMMs run on the **raw** features (no rounded
normalized copies) and need only a row scaling afterwards:
``Σ_c ds_ic c_c = r_i ∂â_i`` and ``Σ_i ds_ic a_i = r_c ∂ĉ_c``. The mix4 block's row ``i`` is the
detached ``mix4_i`` (not ``a_i``; its ``r_i`` is mix4's); its logits are ``cos(mix4_i, p_j)``.

16-bit MixCSE (``HAS_MIX``, P = N): the mix3 and mix4 blocks have no programs of their own. The program of
positives column tile ``n`` computes the three raw dots ``a_m·p_n``, ``a_m·p_{(n+1) mod N}`` and
``a_{(m+1) mod N}·p_n`` one after the other and forms the positives, mix3 and mix4 tiles by
linearity (:func:`~simcse_kernels.ops.triton_kernels._raw_dot_tile` and ``_mix_cos``, the forward's
helpers, so the logits are the forward's); it writes the three blocks' columns of ``ds``. Exactly one
dot per logit tile, no fp32 mixture in a 16-bit dot (the triton_kernels module docstring,
"MixCSE blocks", says why). fp32/fp64 inputs keep separate mix3/mix4 tile programs that dot their
(same-dtype) mixtures directly, also one dot per tile (the fused form spilled registers in fp32). The gradient GEMMs still use the stored mixtures.

``dtau_ptr`` (R, n_tiles) receives ``Σ_{j in tile} ∂L/∂s_ij · cos_ij`` per (row, column tile)
(a positives tile of MixCSE sums its three logit tiles): ``∂L/∂tau = −(1/tau²) Σ`` of it, reduced in
torch (a fixed-order reduction: deterministic).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import (
    _column_terms,
    _cos_tile,
    _dlogits,
    _margin_chain,
    _margin_row_terms,
    _mix_cos,
    _raw_dot_tile,
)


@triton.jit
def _dlogits_segment_tile(x_ptr, rx_ptr, y_ptr, ry_ptr, offs_m, mask_m, tile, tile0, n_cols, col_offset, ds_col0,
                          lse, rw, g, labels, cw_ptr, clse_ptr, inv_tau, w, n_anchor, D,
                          ds_ptr, ld_ds, row_start, dtau_ptr, n_tiles,
                          tdelta, tgrad,
                          PATTERN: tl.constexpr, TARGET: tl.constexpr, SYM: tl.constexpr, MARGIN: tl.constexpr,
                          UPCAST: tl.constexpr, STORE_DS: tl.constexpr, NEED_DTAU: tl.constexpr,
                          ACC_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of one logit block: recompute, form ``∂L/∂s``, store.

    Args:
        x_ptr, rx_ptr: (N, D) row features of the block (anchors, or mix4) and inverse norms.
        y_ptr, ry_ptr: (n_cols, D) column features and inverse norms.
        offs_m, mask_m: (BLOCK_M,) global anchor rows of the program and their mask.
        tile: index of this tile among the block's column tiles (columns ``tile · BLOCK_N + ...``).
        tile0: global index of the block's first column tile (column of ``dtau_ptr``).
        col_offset: global label column of the block's first column (targets: P + K columns).
        ds_col0: column of the block's first column in ``ds`` (its offset in M_total).
        lse, rw, g, labels: (BLOCK_M,) row LSE, softmax weight, upstream grad, target column.
        cw_ptr, clse_ptr: (P,) symmetric column weight and LSE (read when ``SYM``).
        inv_tau, w: scalars 1/tau and the hard-negative weight.
        ds_ptr (R, ld_ds), dtau_ptr (R, n_tiles): outputs (rows relative to ``row_start``).
        tdelta, tgrad: (BLOCK_M,) the targets' margin shift and chain-rule factor (``MARGIN``, a
            ``TARGET`` block: :func:`_margin_logits`, :func:`_margin_chain`).
    """
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_cols
    cos = _cos_tile(x_ptr, rx_ptr, offs_m, mask_m, y_ptr, ry_ptr, offs_n, mask_n, D,
                    ACC_DTYPE, UPCAST, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    cw, clse = _column_terms(cw_ptr, clse_ptr, offs_n, mask_n, SYM, ACC_DTYPE, BLOCK_N)
    ds = _dlogits(cos, inv_tau, w, offs_m, mask_m, offs_n, mask_n, n_anchor, col_offset,
                  lse, rw, g, labels, cw, clse, tdelta, PATTERN, TARGET, SYM, MARGIN)
    ds, tau_term = _margin_chain(ds, cos, offs_n, mask_n, col_offset, labels, tdelta, tgrad, MARGIN)
    local = (offs_m - row_start).to(tl.int64)
    if NEED_DTAU:
        tl.store(dtau_ptr + local * n_tiles + (tile0 + tile), tl.sum(tau_term, axis=1), mask=mask_m)
    if STORE_DS:
        rx = tl.load(rx_ptr + offs_m, mask=mask_m, other=0.0)
        ry = tl.load(ry_ptr + offs_n, mask=mask_n, other=0.0)
        out = ds * inv_tau * rx[:, None] * ry[None, :]
        tl.store(ds_ptr + local[:, None] * ld_ds + (ds_col0 + offs_n)[None, :],
                 out.to(ds_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dlogits_store(ds, tau_term, rx, ry, inv_tau, offs_m, mask_m, offs_n, mask_n, ds_ptr, ld_ds, ds_col0, row_start,
                   STORE_DS: tl.constexpr):
    """Store ``ds · rx_i · ry_j / tau`` (the GEMM operand, module docstring) and return ``Σ_j tau_term``.

    Args: ds, tau_term (BLOCK_M, BLOCK_N) in ``ACC_DTYPE`` (``tau_term``: ``ds · cos``, the margined
    similarity at targets: :func:`_margin_chain`); rx (BLOCK_M,), ry (BLOCK_N,) inverse norms of
    the block's row and column features; offs/mask of rows (global anchors) and columns (in the
    block); ds_ptr (R, ld_ds) with the block's first column at ``ds_col0``, rows from ``row_start``.
    """
    local = (offs_m - row_start).to(tl.int64)
    if STORE_DS:
        out = ds * inv_tau * rx[:, None] * ry[None, :]
        tl.store(ds_ptr + local[:, None] * ld_ds + (ds_col0 + offs_n)[None, :],
                 out.to(ds_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    return tl.sum(tau_term, axis=1)


@triton.jit
def _dlogits_pos_mix_tile(a_ptr, ra_ptr, p_ptr, rp_ptr, rmix3_ptr, rmix4_ptr, offs_m, mask_m, tile, c_mix3,
                          lse, rw, g, labels, cw_ptr, clse_ptr, inv_tau, w, lam, one_m_lam, N, D,
                          ds_ptr, ld_ds, row_start, dtau_ptr, n_tiles, tdelta, tgrad,
                          SYM: tl.constexpr, MARGIN: tl.constexpr, STORE_DS: tl.constexpr, NEED_DTAU: tl.constexpr,
                          ACC_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """MixCSE: positives column tile ``tile`` with its mix3 and mix4 tiles (3 dots, 3 logit tiles).

    Args:
        a_ptr, p_ptr (N, D): raw anchors and positives (16-bit: fp32/fp64 inputs keep separate mix3
            and mix4 tile programs); ra/rp_ptr (N,) their inverse norms; rmix3/rmix4_ptr (N,) the
            fp32 mixtures' inverse norms.
        offs_m, mask_m: (BLOCK_M,) global anchor rows; tile: positives column tile (also its
            ``dtau_ptr`` column); c_mix3: ``ds`` column of mix3's first column (mix4's is ``+ N``).
        lam, one_m_lam: λ and 1 - λ; other args as :func:`_dlogits_segment_tile`.
    Writes the ``ds`` columns ``tile·BLOCK_N + j`` of the positives (pattern 0, targets, symmetric
    column term), mix3 (pattern 3) and mix4 (pattern 4, rows scaled by mix4's norms) and one
    ``dtau`` partial, the sum over the three tiles.
    """
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # the forward's dots and formulas (triton_kernels._row_lse_pos_mix_segment): D0, D1, D2
    d0 = _raw_dot_tile(a_ptr, offs_m, mask_m, p_ptr, offs_n, mask_n, D, ACC_DTYPE, False, DOT_PREC,
                       BLOCK_M, BLOCK_N, BLOCK_K)
    ra = tl.load(ra_ptr + offs_m, mask=mask_m, other=0.0)
    rp = tl.load(rp_ptr + offs_n, mask=mask_n, other=0.0)
    cw, clse = _column_terms(cw_ptr, clse_ptr, offs_n, mask_n, SYM, ACC_DTYPE, BLOCK_N)
    cos = d0 * ra[:, None] * rp[None, :]
    ds = _dlogits(cos, inv_tau, w, offs_m, mask_m, offs_n, mask_n, N, 0,
                  lse, rw, g, labels, cw, clse, tdelta, 0, True, SYM, MARGIN)
    ds, tau_term = _margin_chain(ds, cos, offs_n, mask_n, 0, labels, tdelta, tgrad, MARGIN)
    part = _dlogits_store(ds, tau_term, ra, rp, inv_tau, offs_m, mask_m, offs_n, mask_n, ds_ptr, ld_ds, 0,
                          row_start, STORE_DS)
    zero = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    d1 = _raw_dot_tile(a_ptr, offs_m, mask_m, p_ptr, (offs_n + 1) % N, mask_n, D, ACC_DTYPE, False, DOT_PREC,
                       BLOCK_M, BLOCK_N, BLOCK_K)
    cos = _mix_cos(d0, d1, lam, one_m_lam, ra_ptr, offs_m, mask_m, rmix3_ptr, offs_n, mask_n)
    ds = _dlogits(cos, inv_tau, w, offs_m, mask_m, offs_n, mask_n, N, 0,
                  lse, rw, g, labels, zero, zero, tdelta, 3, False, False, False)
    rm3 = tl.load(rmix3_ptr + offs_n, mask=mask_n, other=0.0)
    part += _dlogits_store(ds, ds * cos, ra, rm3, inv_tau, offs_m, mask_m, offs_n, mask_n, ds_ptr, ld_ds,
                           c_mix3, row_start, STORE_DS)
    d2 = _raw_dot_tile(a_ptr, (offs_m + 1) % N, mask_m, p_ptr, offs_n, mask_n, D, ACC_DTYPE, False, DOT_PREC,
                       BLOCK_M, BLOCK_N, BLOCK_K)
    cos = _mix_cos(d0, d2, lam, one_m_lam, rmix4_ptr, offs_m, mask_m, rp_ptr, offs_n, mask_n)
    ds = _dlogits(cos, inv_tau, w, offs_m, mask_m, offs_n, mask_n, N, 0,
                  lse, rw, g, labels, zero, zero, tdelta, 4, False, False, False)
    rm4 = tl.load(rmix4_ptr + offs_m, mask=mask_m, other=0.0)
    part += _dlogits_store(ds, ds * cos, rm4, rp, inv_tau, offs_m, mask_m, offs_n, mask_n, ds_ptr, ld_ds,
                           c_mix3 + N, row_start, STORE_DS)
    if NEED_DTAU:
        local = (offs_m - row_start).to(tl.int64)
        tl.store(dtau_ptr + local * n_tiles + tile, part, mask=mask_m)


@triton.jit
def _dlogits_chunk_kernel(a_ptr, ra_ptr, p_ptr, rp_ptr, neg_ptr, rneg_ptr, mix3_ptr, rmix3_ptr, mix4_ptr,
                          rmix4_ptr, tau_ptr, w_ptr, lam_ptr, labels_ptr, lse_ptr, g_ptr, cw_ptr, clse_ptr,
                          tdelta_ptr, tgrad_ptr, ds_ptr, dtau_ptr, row_start, row_end, N, P, K, D, ld_ds,
                          n_tiles, HAS_NEG: tl.constexpr, ANCHOR_NEG: tl.constexpr, HAS_MIX: tl.constexpr,
                          MARGIN: tl.constexpr,
                          SYMMETRIC: tl.constexpr, STORE_DS: tl.constexpr, NEED_DTAU: tl.constexpr,
                          ACC_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``r_i r_c ∂L/∂s_ic / tau`` of anchor rows ``[row_start, row_end)`` for every logit block.

    Args:
        a_ptr (N, D), p_ptr (P, D), neg_ptr (K, D; ``HAS_NEG``): raw features, input dtype.
        mix3_ptr, mix4_ptr (N, D; ``HAS_MIX``): detached raw MixCSE mixtures, ``ACC_DTYPE`` (read for
            fp32/fp64 inputs only, by their own tile programs; 16-bit inputs form their tiles from raw
            dots by linearity in the positives-tile programs).
        ra/rp/rneg/rmix3/rmix4_ptr: matching (rows,) inverse norms, ``ACC_DTYPE``.
        tau_ptr, w_ptr: (1,) temperature and hard-negative weight; lam_ptr (2,): ``[λ, 1 - λ]``
            (``HAS_MIX``); all ``ACC_DTYPE``.
        labels_ptr (N,) int64, lse_ptr (N,), g_ptr (N,): targets, forward row LSE, ∂L/∂ℓ.
        cw_ptr, clse_ptr (P,): symmetric column weight ``½ Σ_{l_i = j} g_i`` and column LSE.
        tdelta_ptr, tgrad_ptr (N,; ``MARGIN``): each row's target margin shift ``f(c) − m − c`` and
            chain-rule factor ``f'(c)`` (reference.py, "Margins"), ``ACC_DTYPE``.
        ds_ptr (R, ld_ds): output in the GEMM dtype, row ``i - row_start`` (``STORE_DS``).
        dtau_ptr (R, n_tiles): per (row, column tile) ``Σ ∂L/∂s · cos`` in ``ACC_DTYPE``
            (``NEED_DTAU``).
        row_start, row_end: the chunk's anchor rows; N, P, K, D: sizes; ld_ds: M_total.
        n_tiles: column tiles of the blocks with programs (``cdiv(P, BLOCK_N) + cdiv(K, BLOCK_N)
            + cdiv(N, BLOCK_N)`` with anchor negatives; 16-bit MixCSE's blocks ride on the positives
            tiles, fp32/fp64 MixCSE adds ``2 cdiv(N, BLOCK_N)``).
    Grid: ``(cdiv(row_end - row_start, BLOCK_M), n_tiles)``; program (i, t) computes column tile
    t of the concatenated blocks (each block padded to whole tiles), a single branch per program;
    with ``HAS_MIX`` a positives tile also writes its mix3 and mix4 tiles.
    """
    pid_n = tl.program_id(1)
    offs_m = row_start + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    inv_tau = 1.0 / tl.load(tau_ptr).to(ACC_DTYPE)
    w = tl.load(w_ptr).to(ACC_DTYPE)
    labels = tl.load(labels_ptr + offs_m, mask=mask_m, other=-1)
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
    g = tl.load(g_ptr + offs_m, mask=mask_m, other=0.0)
    if SYMMETRIC:
        rw = 0.5 * g
    else:
        rw = g
    tdelta, tgrad = _margin_row_terms(tdelta_ptr, tgrad_ptr, offs_m, mask_m, MARGIN, ACC_DTYPE, BLOCK_M)
    t0 = tl.cdiv(P, BLOCK_N)
    LINEAR: tl.constexpr = HAS_MIX and (a_ptr.dtype.element_ty != ACC_DTYPE)  # 16-bit MixCSE
    if pid_n < t0:
        if LINEAR:
            c_mix3 = P
            if HAS_NEG:
                c_mix3 += K
            if ANCHOR_NEG:
                c_mix3 += N
            lam = tl.load(lam_ptr).to(ACC_DTYPE)
            one_m_lam = tl.load(lam_ptr + 1).to(ACC_DTYPE)
            _dlogits_pos_mix_tile(a_ptr, ra_ptr, p_ptr, rp_ptr, rmix3_ptr, rmix4_ptr, offs_m, mask_m, pid_n,
                                  c_mix3, lse, rw, g, labels, cw_ptr, clse_ptr, inv_tau, w, lam, one_m_lam, N, D,
                                  ds_ptr, ld_ds, row_start, dtau_ptr, n_tiles, tdelta, tgrad, SYMMETRIC, MARGIN,
                                  STORE_DS, NEED_DTAU, ACC_DTYPE, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            _dlogits_segment_tile(a_ptr, ra_ptr, p_ptr, rp_ptr, offs_m, mask_m, pid_n, 0, P, 0, 0,
                                  lse, rw, g, labels, cw_ptr, clse_ptr, inv_tau, w, N, D,
                                  ds_ptr, ld_ds, row_start, dtau_ptr, n_tiles,
                                  tdelta, tgrad, 0, True, SYMMETRIC, MARGIN, False, STORE_DS, NEED_DTAU, ACC_DTYPE, DOT_PREC,
                                  BLOCK_M, BLOCK_N, BLOCK_K)
    c0 = P
    if HAS_NEG:
        t1 = t0 + tl.cdiv(K, BLOCK_N)
        if (pid_n >= t0) & (pid_n < t1):
            _dlogits_segment_tile(a_ptr, ra_ptr, neg_ptr, rneg_ptr, offs_m, mask_m, pid_n - t0, t0, K, P, c0,
                                  lse, rw, g, labels, cw_ptr, clse_ptr, inv_tau, w, N, D,
                                  ds_ptr, ld_ds, row_start, dtau_ptr, n_tiles,
                                  tdelta, tgrad, 1, True, False, MARGIN, False, STORE_DS, NEED_DTAU, ACC_DTYPE, DOT_PREC,
                                  BLOCK_M, BLOCK_N, BLOCK_K)
        t0 = t1
        c0 += K
    if ANCHOR_NEG:
        t1 = t0 + tl.cdiv(N, BLOCK_N)
        if (pid_n >= t0) & (pid_n < t1):
            _dlogits_segment_tile(a_ptr, ra_ptr, a_ptr, ra_ptr, offs_m, mask_m, pid_n - t0, t0, N, 0, c0,
                                  lse, rw, g, labels, cw_ptr, clse_ptr, inv_tau, w, N, D,
                                  ds_ptr, ld_ds, row_start, dtau_ptr, n_tiles,
                                  tdelta, tgrad, 2, False, False, False, False, STORE_DS, NEED_DTAU, ACC_DTYPE, DOT_PREC,
                                  BLOCK_M, BLOCK_N, BLOCK_K)
        t0 = t1
        c0 += N
    if HAS_MIX and not LINEAR:  # fp32/fp64: mix3/mix4 tiles dot the (input-dtype) mixtures directly
        t1 = t0 + tl.cdiv(N, BLOCK_N)
        if (pid_n >= t0) & (pid_n < t1):
            _dlogits_segment_tile(a_ptr, ra_ptr, mix3_ptr, rmix3_ptr, offs_m, mask_m, pid_n - t0, t0, N, 0, c0,
                                  lse, rw, g, labels, cw_ptr, clse_ptr, inv_tau, w, N, D,
                                  ds_ptr, ld_ds, row_start, dtau_ptr, n_tiles,
                                  tdelta, tgrad, 3, False, False, False, False, STORE_DS, NEED_DTAU, ACC_DTYPE, DOT_PREC,
                                  BLOCK_M, BLOCK_N, BLOCK_K)
        t2 = t1 + tl.cdiv(N, BLOCK_N)
        if (pid_n >= t1) & (pid_n < t2):
            _dlogits_segment_tile(mix4_ptr, rmix4_ptr, p_ptr, rp_ptr, offs_m, mask_m, pid_n - t1, t1, N, 0,
                                  c0 + N, lse, rw, g, labels, cw_ptr, clse_ptr, inv_tau, w, N, D,
                                  ds_ptr, ld_ds, row_start, dtau_ptr, n_tiles,
                                  tdelta, tgrad, 4, False, False, False, False, STORE_DS, NEED_DTAU, ACC_DTYPE, DOT_PREC,
                                  BLOCK_M, BLOCK_N, BLOCK_K)
