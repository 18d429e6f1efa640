"""Backend ``"torch"``: pure-PyTorch chunked loss with an online log-sum-exp.

Forward walks the logit matrix block by block (column chunks of each block of the reference's
layout), keeping only each row's running log-sum-exp (and, when symmetric, each positive
column's log-sum-exp). Backward recomputes every chunk from the saved LSEs and accumulates the
gradients with two matmuls per chunk. Peak extra memory is O(N·chunk + (N + M)·D), never N x M.
Works on any device; the math is written in :mod:`simcse_kernels.reference`.
"""

from __future__ import annotations

import torch

from .features import LogitBlock, NormalizedFeatures, logit_blocks

#: logits per chunk: 2M (8 MiB fp32) on CPU; 16M (64 MiB) on GPUs, where launches cost more
CHUNK_LOGITS = {"cpu": 1 << 21, "cuda": 1 << 24}


def default_chunk_size(n_rows: int, device_type: str = "cpu") -> int:
    """Columns per chunk: ``CHUNK_LOGITS`` logits per chunk, between 32 and 8192 columns."""
    budget = CHUNK_LOGITS.get(device_type, CHUNK_LOGITS["cpu"])
    return max(32, min(8192, budget // max(n_rows, 1)))


def _chunk(
    block: LogitBlock,
    tensors: dict[str, torch.Tensor],
    j0: int,
    j1: int,
    tau: torch.Tensor,
    w: float,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Cosines, logits and the (rows, cols) index of constant logits for columns [j0, j1)."""
    rows = tensors[block.rows]
    cos = rows @ tensors[block.cols][j0:j1].T
    logits = cos / tau
    n = rows.shape[0]
    if block.pattern == "none":
        return cos, logits, None
    cols = torch.arange(j0, j1, device=rows.device)
    diag = torch.arange(j0, max(j0, min(j1, n)), device=rows.device)  # columns j that have a row i = j
    if block.pattern == "self":
        logits[diag, diag - j0] = float("-inf")
        return cos, logits, None
    if block.pattern == "hard":
        logits[diag, diag - j0] += w
        return cos, logits, None
    # MixCSE: zero the masked entry first, then add w on the diagonal (official order).
    shift = 1 if block.pattern == "mix3" else -1
    const = ((cols + shift) % n, cols - j0)
    logits[const] = 0.0
    logits[diag, diag - j0] += w
    return cos, logits, const


class ChunkedInfoNCEFunction(torch.autograd.Function):
    """Per-row InfoNCE losses (N,) from normalized features, chunked; see module docstring."""

    @staticmethod
    def forward(ctx, anchors, positives, negatives, mix3, mix4, tau, labels, w, anchor_negatives,
                symmetric, chunk_size):
        tensors = {"anchors": anchors, "positives": positives, "negatives": negatives, "mix3": mix3, "mix4": mix4}
        n, n_pos = anchors.shape[0], positives.shape[0]
        lse = torch.full((n,), float("-inf"), device=anchors.device, dtype=anchors.dtype)
        col_lse = torch.empty(n_pos, device=anchors.device, dtype=anchors.dtype) if symmetric else None
        for block in logit_blocks(negatives is not None, anchor_negatives, mix3 is not None):
            width = tensors[block.cols].shape[0]
            for j0 in range(0, width, chunk_size):
                j1 = min(j0 + chunk_size, width)
                _, logits, _ = _chunk(block, tensors, j0, j1, tau, w)
                lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
                if symmetric and block.cols == "positives" and block.rows == "anchors":
                    col_lse[j0:j1] = torch.logsumexp(logits, dim=0)
        candidates = positives if negatives is None else torch.cat([positives, negatives])
        target_cos = (anchors * candidates[labels]).sum(dim=1)
        target = target_cos / tau
        if negatives is not None and w != 0.0:
            target = target + w * (labels == n_pos + torch.arange(n, device=labels.device))
        loss = lse - target
        if symmetric:
            loss = 0.5 * (loss + col_lse[labels] - target)
        ctx.save_for_backward(anchors, positives, negatives, mix3, mix4, tau, labels, lse, col_lse, target_cos)
        ctx.options = (w, anchor_negatives, symmetric, chunk_size)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        anchors, positives, negatives, mix3, mix4, tau, labels, lse, col_lse, target_cos = ctx.saved_tensors
        w, anchor_negatives, symmetric, chunk_size = ctx.options
        tensors = {"anchors": anchors, "positives": positives, "negatives": negatives, "mix3": mix3, "mix4": mix4}
        g = grad_loss.to(anchors.dtype)
        row_weight = 0.5 * g if symmetric else g
        col_weight = None
        if symmetric:
            col_weight = torch.zeros(positives.shape[0], device=g.device, dtype=g.dtype)
            col_weight.index_add_(0, labels, 0.5 * g)
        grads = {name: torch.zeros_like(t) for name, t in tensors.items() if t is not None and name in
                 ("anchors", "positives", "negatives")}
        dtau_cos = torch.zeros((), device=g.device, dtype=g.dtype)
        for block in logit_blocks(negatives is not None, anchor_negatives, mix3 is not None):
            width = tensors[block.cols].shape[0]
            for j0 in range(0, width, chunk_size):
                j1 = min(j0 + chunk_size, width)
                cos, logits, const = _chunk(block, tensors, j0, j1, tau, w)
                d_logits = row_weight[:, None] * torch.exp(logits - lse[:, None])
                if symmetric and block.cols == "positives" and block.rows == "anchors":
                    d_logits += col_weight[None, j0:j1] * torch.exp(logits - col_lse[None, j0:j1])
                if const is not None:
                    d_logits[const] = 0.0
                if block.rows in grads:
                    grads[block.rows] += d_logits @ tensors[block.cols][j0:j1]
                if block.cols in grads:
                    grads[block.cols][j0:j1] += d_logits.T @ tensors[block.rows]
                dtau_cos += (d_logits * cos).sum()
        # Target logits: d/ds_{i,l_i} = -g_i (row and column parts together).
        n_pos = positives.shape[0]
        candidates = positives if negatives is None else torch.cat([positives, negatives])
        grads["anchors"] -= g[:, None] * candidates[labels]
        d_candidates = torch.zeros_like(candidates).index_add_(0, labels, -g[:, None] * anchors)
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
            None, None, None, None, None,
        )


def chunked_per_row_loss(
    feats: NormalizedFeatures,
    labels: torch.Tensor,
    hard_negative_weight: float,
    anchor_negatives: bool,
    symmetric: bool,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-anchor losses (N,) in the compute dtype, differentiable w.r.t. the features and tau."""
    chunk = chunk_size or default_chunk_size(feats.anchors.shape[0], feats.anchors.device.type)
    return ChunkedInfoNCEFunction.apply(
        feats.anchors, feats.positives, feats.negatives, feats.mix3, feats.mix4, feats.tau, labels,
        float(hard_negative_weight), anchor_negatives, symmetric, chunk,
    )
