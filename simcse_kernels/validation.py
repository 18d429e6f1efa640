"""Argument checks shared by every backend: clear errors instead of silent wrong answers."""

from __future__ import annotations

import math

import torch

from .options import InfoNCEOptions, Temperature


def _check_matrix(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def check_temperature_for_dtype(temperature: Temperature, dtype: torch.dtype) -> None:
    """Raise unless ``temperature`` and ``1/temperature`` are normal finite floats in the compute dtype.

    The compute dtype is fp32 for fp16/bf16/fp32 inputs and fp64 for fp64 inputs. A temperature below
    the dtype's smallest normal (fp32: 1.2e-38) is subnormal or rounds to 0, and one whose reciprocal
    overflows makes every logit infinite: both end in a NaN loss. The check also bounds ``1/tau²``
    (the learnable temperature's gradient factor) where it would overflow, so that gradient never
    becomes infinite silently. A tensor temperature inside ``torch.compile`` or on the meta device has
    no value to read and is not checked here.
    """
    if isinstance(temperature, torch.Tensor):
        if temperature.device.type == "meta" or torch.compiler.is_compiling():
            return
        value = float(temperature.detach().reshape(()).double().item())
        learnable = temperature.requires_grad
    else:
        value = float(temperature)
        learnable = False
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    info = torch.finfo(compute)
    stored = float(torch.tensor(value, dtype=torch.float64).to(compute).item())  # tau as the kernels see it
    if not (stored >= info.tiny and math.isfinite(1.0 / stored) and 1.0 / stored <= info.max):
        raise ValueError(
            f"temperature {value!r} is not usable with {dtype} inputs: in {compute} (the compute dtype) "
            f"tau must be a normal float (>= {info.tiny:.3g}) with a finite 1/tau (tau >= {1.0 / info.max:.3g})"
        )
    if learnable and 1.0 / stored > math.sqrt(info.max):
        raise ValueError(
            f"learnable temperature {value!r} is too small for {dtype} inputs: its gradient carries 1/tau², "
            f"which overflows {compute} (need tau >= {1.0 / math.sqrt(info.max):.3g})"
        )


def _all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-dim bool: every entry of ``t`` is finite, with no temporary of t's size (``isfinite`` makes
    several; the min and the max propagate NaN and show an inf)."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    return torch.isfinite(lo) & torch.isfinite(hi)


def validate_inputs(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    labels: torch.Tensor | None,
    options: InfoNCEOptions,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Check shapes, dtypes, devices, finiteness and label range.

    Args:
        anchors: (N, D) anchor embeddings (rows of the logit matrix).
        positives: (P, D) positive candidates, P >= N unless ``labels`` are given.
        negatives: (K, D) extra negative candidates, or None (a (0, D) tensor counts as None).
        labels: (N,) integer target columns in [0, P + K), or None for ``arange(N)``.
        options: the loss options.

    Returns:
        ``(negatives_or_None, labels)`` with default labels filled in.
    """
    _check_matrix("anchors", anchors)
    _check_matrix("positives", positives)
    n, d = anchors.shape
    p = positives.shape[0]
    if n == 0:
        raise ValueError("anchors is empty: the batch must hold at least one row")
    if d == 0:
        raise ValueError("embedding dimension D must be at least 1")
    if p == 0:
        raise ValueError("positives is empty: at least one candidate is needed")
    if positives.shape[1] != d:
        raise ValueError(f"positives has dim {positives.shape[1]} but anchors has dim {d}")
    tensors = [("anchors", anchors), ("positives", positives)]
    if negatives is not None:
        _check_matrix("negatives", negatives)
        if negatives.shape[1] != d:
            raise ValueError(f"negatives has dim {negatives.shape[1]} but anchors has dim {d}")
        if negatives.shape[0] == 0:
            negatives = None
        else:
            tensors.append(("negatives", negatives))
    for name, t in tensors[1:]:
        if t.device != anchors.device:
            raise ValueError(f"{name} is on {t.device} but anchors is on {anchors.device}")
        if t.dtype != anchors.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but anchors has dtype {anchors.dtype}")
    tau = options.temperature
    if isinstance(tau, torch.Tensor) and tau.device != anchors.device and tau.device.type != "cpu":
        raise ValueError(f"temperature is on {tau.device} but anchors is on {anchors.device}")
    check_temperature_for_dtype(tau, anchors.dtype)

    k = 0 if negatives is None else negatives.shape[0]
    if options.mix_lambda is not None and p != n:
        raise ValueError(f"mix_lambda (MixCSE) needs as many positives as anchors, got P={p}, N={n}")
    if options.hard_negative_weight != 0.0 and negatives is None and options.mix_lambda is None:
        raise ValueError(
            "hard_negative_weight is set but there are no hard negatives (negatives=None) "
            "and no MixCSE blocks to weight"
        )

    if options.hard_negative_weight != 0.0 and 0 < k < n:
        raise ValueError(
            f"hard_negative_weight pairs anchor i with negative i (column P + i), so it needs at least as "
            f"many negatives as anchors: got K={k} negatives for N={n} anchors (rows after N are shared "
            "negatives; K >= N is allowed)"
        )

    if options.guide is not None:
        guide = options.guide
        if len(guide) != (3 if negatives is not None else 2):
            want = "3 tensors (guide_anchors, guide_positives, guide_negatives) with" if k else \
                "2 tensors (guide_anchors, guide_positives) without"
            raise ValueError(f"guide must hold {want} negatives, got {len(guide)} tensors")
        rows = (n, p, k)
        for name, t, r in zip(("guide_anchors", "guide_positives", "guide_negatives"), guide, rows):
            _check_matrix(name, t)
            if t.shape[0] != r or t.shape[1] != guide[0].shape[1] or t.shape[1] == 0:
                raise ValueError(f"{name} must have shape ({r}, G) with G = guide_anchors' dim >= 1, got "
                                 f"{tuple(t.shape)}")
            if t.device != anchors.device:
                raise ValueError(f"{name} is on {t.device} but anchors is on {anchors.device}")
            if options.check_inputs and t.device.type != "meta" and not torch.compiler.is_compiling() \
                    and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or inf")
    if options.needs_own_docs:  # sentence-transformers' layout: doc i = positive i, negatives column-stacked
        what = ("a joint 'doc_to_query'" if options.doc_to_query_joint else
                "'doc_to_doc'" if options.doc_to_doc else
                f"hardness_mode={options.hardness_mode!r}" if options.has_hardness else "guide")
        if labels is not None:
            raise ValueError(f"labels must be None with {what}: query i's positive is doc i (its own docs: "
                             "positive i and negative rows k·N + i)")
        if p != n:
            raise ValueError(f"{what} needs as many positives as anchors (doc i is query i's positive), got "
                             f"P={p}, N={n}")
        if k % n:
            raise ValueError(f"{what} needs negatives stacked in whole columns of N rows (negative column k's "
                             f"row i at k·N + i), got K={k} rows for N={n} anchors")

    if labels is None:
        if p < n:
            raise ValueError(f"default labels arange(N) need P >= N positives, got P={p}, N={n}; pass labels")
        labels = torch.arange(n, device=anchors.device)
    else:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.dim() != 1 or labels.shape[0] != n:
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.device != anchors.device:
            raise ValueError(f"labels is on {labels.device} but anchors is on {anchors.device}")
        labels = labels.long()

    # Inside torch.compile the value scan (a host sync) is skipped so graphs stay whole: NaN
    # inputs still show as a NaN loss, and an out-of-range label fails the index gather.
    if options.check_inputs and anchors.device.type != "meta" and not torch.compiler.is_compiling():
        limit = p if options.symmetric else p + k
        flags = [_all_finite(t) for _, t in tensors]
        flags.append(((labels >= 0) & (labels < limit)).all())
        ok = torch.stack(flags).cpu().tolist()  # one sync for every check
        for (name, _), good in zip(tensors, ok[:-1]):
            if not good:
                raise ValueError(f"{name} contains NaN or inf")
        if not ok[-1]:
            where = "[0, P) (symmetric loss needs positive targets)" if options.symmetric else "[0, P + K)"
            raise ValueError(f"labels out of range: every label must lie in {where} = [0, {limit})")
    return negatives, labels
