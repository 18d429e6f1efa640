"""Shared preparation for the fused backends: normalized features, MixCSE mixtures, tau.

Everything here is O((N + M)·D): the fused backends never build an N x M matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..options import InfoNCEOptions
from ..reference import NORM_EPS, huge_row_scale, mixed_features
from .normalize import unit_rows


@dataclass
class NormalizedFeatures:
    """Unit-norm features in the compute dtype (fp32, or fp64 for fp64 inputs); raw rows with
    ``similarity="dot"``.

    Attributes:
        anchors: (N, D) â, differentiable w.r.t. the raw anchors.
        positives: (P, D) p̂, differentiable.
        negatives: (K, D) n̂ or None, differentiable.
        mix3: (N, D) normalized detached mixed positives, or None.
        mix4: (N, D) normalized detached mixed anchors, or None.
        tau: 0-dim tensor in the compute dtype (keeps the graph of a learnable temperature).
    """

    anchors: torch.Tensor
    positives: torch.Tensor
    negatives: torch.Tensor | None
    mix3: torch.Tensor | None
    mix4: torch.Tensor | None
    tau: torch.Tensor


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def temperature_tensor(options: InfoNCEOptions, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """tau as a 0-dim tensor on ``device`` (differentiable when it is a learnable tensor)."""
    tau = options.temperature
    if isinstance(tau, torch.Tensor):
        return tau.reshape(()).to(device=device, dtype=dtype)
    return torch.tensor(float(tau), device=device, dtype=dtype)


def without_huge_rows(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    options: InfoNCEOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The inputs with every row whose max |x| reaches 2^40 scaled by an exact power of two.

    Same cosines and gradients (the scale is detached; :func:`~simcse_kernels.reference.huge_row_scale`),
    but no norm or raw dot of the torch, Triton and CUDA backends overflows up to finfo.max. With
    MixCSE one scale per tensor keeps the mixtures' directions. When no row is huge (checked with one
    device sync, skipped inside ``torch.compile``, where the scales are always applied) the inputs come
    back unchanged, so no copy is made. ``similarity="dot"`` returns the inputs as they are.
    """
    if options.similarity == "dot":  # raw dot products are not scale-invariant: nothing to rescale
        return anchors, positives, negatives
    per_tensor = options.mix_lambda is not None
    tensors = (anchors, positives, negatives)
    scales = [None if t is None else huge_row_scale(t, per_tensor) for t in tensors]
    if anchors.device.type != "meta" and not torch.compiler.is_compiling():
        if not bool(torch.stack([(sc != 1).any() for sc in scales if sc is not None]).any()):
            return anchors, positives, negatives
    anchors, positives, negatives = (None if t is None else t * sc for t, sc in zip(tensors, scales))
    return anchors, positives, negatives


def normalized_features(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    options: InfoNCEOptions,
) -> NormalizedFeatures:
    """Normalize (in the compute dtype) and build MixCSE's detached mixtures.

    With ``similarity="dot"`` the rows are kept raw (no normalization; MixCSE does not exist there).
    """
    dt = compute_dtype_for(anchors.dtype)
    a, p = anchors.to(dt), positives.to(dt)
    if options.similarity == "dot":
        return NormalizedFeatures(
            anchors=a, positives=p, negatives=None if negatives is None else negatives.to(dt), mix3=None,
            mix4=None, tau=temperature_tensor(options, anchors.device, dt),
        )
    mix3 = mix4 = None
    if options.mix_lambda is not None:
        mix3 = F.normalize(mixed_features(p, options.mix_lambda), dim=-1, eps=NORM_EPS)
        mix4 = F.normalize(mixed_features(a, options.mix_lambda), dim=-1, eps=NORM_EPS)
    return NormalizedFeatures(
        anchors=unit_rows(a, NORM_EPS),
        positives=unit_rows(p, NORM_EPS),
        negatives=None if negatives is None else unit_rows(negatives.to(dt), NORM_EPS),
        mix3=mix3,
        mix4=mix4,
        tau=temperature_tensor(options, anchors.device, dt),
    )


class LogitBlock(NamedTuple):
    """One block of a row's logits: ``rows · cols^T / tau`` plus a fixed pattern of constants.

    ``rows``: "anchors" or "mix4"; ``cols``: "positives", "negatives", "anchors" or "mix3".
    ``pattern``: "none"; "hard" (+w at (i, i)); "self" (-inf at (i, i));
    "mix3" (0 at (i, i-1), +w at (i, i)); "mix4" (0 at (i, i+1), +w at (i, i)).
    """

    rows: str
    cols: str
    pattern: str


def logit_blocks(has_negatives: bool, anchor_negatives: bool, has_mix: bool) -> list[LogitBlock]:
    """Every logit block of a row, in the order of the reference's layout (shared by the fused backends)."""
    blocks = [LogitBlock("anchors", "positives", "none")]
    if has_negatives:
        blocks.append(LogitBlock("anchors", "negatives", "hard"))
    if anchor_negatives:
        blocks.append(LogitBlock("anchors", "anchors", "self"))
    if has_mix:
        blocks.append(LogitBlock("anchors", "mix3", "mix3"))
        blocks.append(LogitBlock("mix4", "positives", "mix4"))
    return blocks
