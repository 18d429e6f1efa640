"""The contrastive objectives on a batch of embeddings, single-process or across ranks.

``z`` is (B, V, H): view 0 = anchors, view 1 = positives, view 2 (sup SimCSE) = hard negatives.
The loss module (:class:`simcse_kernels.FusedInfoNCE`) carries the options: temperature (fixed or
learnable), ``hard_negative_weight``, ``mix_lambda`` (MixCSE), ``symmetric``, ``anchor_negatives``.

Across ranks (see :mod:`.distributed` for the gradient accounting):

* default (unsup / sup SimCSE): local anchors against the positives and hard negatives of all ranks,
  gathered with gradient. Labels are ``rank*n + arange(n)``. ``fused_info_nce`` pairs anchor i's hard
  negative with column ``P + i`` (negatives[i]), so the gathered negatives are rolled to put this rank's
  block first; the other negatives only permute inside the log-sum-exp, which is invariant.
* symmetric, MixCSE and anchor-negatives need every anchor (column losses over anchors, mixtures of
  neighbouring rows, anchor-anchor logits): anchors are gathered too and every rank computes the same
  global loss over the whole global batch (W times the loss compute, none of the encoder compute).
"""

from __future__ import annotations

import torch

from ..module import FusedInfoNCE
from .distributed import all_gather_with_grad, is_distributed, rank_and_world


def needs_global_anchors(loss_fn: FusedInfoNCE) -> bool:
    """Whether the options need all anchors on every rank (symmetric, MixCSE, anchor negatives)."""
    o = loss_fn.options
    return o.symmetric or o.mix_lambda is not None or o.anchor_negatives


def contrastive_loss(z: torch.Tensor, loss_fn: FusedInfoNCE) -> torch.Tensor:
    """The loss of one (local) batch of embeddings, with cross-rank negatives under a process group.

    Args:
        z: (B, V, H) embeddings, V in {2, 3}.
        loss_fn: the configured loss module.

    Returns:
        () loss: this rank's mean over its anchors (or the global mean, see the module docstring).
    """
    anchors, positives = z[:, 0], z[:, 1]
    negatives = z[:, 2] if z.shape[1] > 2 else None
    if not is_distributed():
        return loss_fn(anchors, positives, negatives)
    rank, _ = rank_and_world()
    n = anchors.shape[0]
    all_pos = all_gather_with_grad(positives)
    all_neg = all_gather_with_grad(negatives) if negatives is not None else None
    if needs_global_anchors(loss_fn):
        return loss_fn(all_gather_with_grad(anchors), all_pos, all_neg)
    if all_neg is not None:
        all_neg = torch.roll(all_neg, shifts=-rank * n, dims=0)
    labels = rank * n + torch.arange(n, device=z.device)
    return loss_fn(anchors, all_pos, all_neg, labels=labels)


def distill_mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``--objective distill_mse``: sentence-transformers' ``MSELoss`` (``EmbedDistillLoss`` with
    ``distance_metric="mse"``): the mean over all B x D entries of ``(student - teacher)^2``.

    Args:
        student: (B, D) student embeddings (after the learned projection when the widths differ).
        teacher: (B, D) the teacher's embeddings of the same sentences (constants).
    """
    return torch.nn.functional.mse_loss(student, teacher.to(student.dtype))


def candidate_loss(queries: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor,
                   loss_fn: FusedInfoNCE) -> torch.Tensor:
    """InfoNCE of each query against a fixed set of candidate rows, target ``candidates[labels[i]]``.

    ``--objective distill_contrastive``: queries = student embeddings, candidates = teacher embeddings
    (the batch's, or the whole training file's with ``--teacher_bank``). ``--objective amsoftmax``:
    queries = the B*K dropout views, candidates = the class-weight matrix (one row per training sentence),
    with the loss module's ``margin`` / ``angular_margin`` (AM-softmax / ArcFace; scale = 1/temperature).

    The candidates are the same on every rank (teacher rows are known everywhere; class weights are a
    replicated parameter), so across ranks each rank's loss is the mean over its own queries and the
    averaged parameter gradients are exactly those of the global mean: nothing is gathered.

    Args:
        queries: (N, D); candidates: (M, D); labels: (N,) int64 rows of ``candidates``.
    """
    return loss_fn(queries, candidates.to(queries.dtype), labels=labels)
