"""sentence-transformers drop-ins: fused MultipleNegativesRankingLoss and its cached (GradCache) form.

One-line swap in a sentence-transformers training script::

    # loss = losses.MultipleNegativesRankingLoss(model)
    loss = FusedMultipleNegativesRankingLoss(model)
    # loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=64)
    loss = FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=64)

Same constructor, inputs (``sentence_features``: anchor, positive, then any number of negative
columns; every negative is a candidate for every anchor) and result as sentence-transformers'
losses, computed with :func:`simcse_kernels.fused_info_nce` at ``temperature = 1 / scale``:

====================================================================  ==================================
sentence-transformers ``directions`` / ``partition_mode``             ``fused_info_nce``
====================================================================  ==================================
``("query_to_doc",)`` (the default)                                   candidates ``[positives; negatives]``
``("query_to_doc", "doc_to_query")``, ``"per_direction"``             ``symmetric=True``
``("query_to_doc", "query_to_query")``, ``"joint"``                   ``anchor_negatives=True``
====================================================================  ==================================

Other direction sets (``doc_to_doc``, a joint ``doc_to_query``), a ``similarity_fct`` other than
``cos_sim`` (the fused loss normalizes its inputs, which *is* the cosine) and the hardness options
raise a ``ValueError``. sentence-transformers stays optional: this module raises an ``ImportError``
naming the extra to install when it is imported without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

try:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import all_gather_with_grad, cos_sim
except ImportError as exc:  # pragma: no cover - exercised only without sentence-transformers
    raise ImportError(
        "simcse_kernels.integrations.sentence_transformers needs sentence-transformers: "
        "pip install 'simcse-kernels[st]'"
    ) from exc

try:  # sentence-transformers >= 6 (the old path warns there)
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss as _STCachedMNRL,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as _STMNRL
except ImportError:
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss as _STCachedMNRL
    from sentence_transformers.losses import MultipleNegativesRankingLoss as _STMNRL

try:  # sentence-transformers >= 6: the GradCache mini-batch helpers (padding-trimmed slices, token budgets)
    from sentence_transformers.base.losses.gradcache import _create_minibatch, _minibatch_ranges
except ImportError:  # older releases: plain slicing, mini_batch_size only
    _create_minibatch = _minibatch_ranges = None

from ..functional import fused_info_nce
from ..train.grad_cache import cuda_devices_of, deferred_grad_cache_loss

__all__ = ["FusedCachedMultipleNegativesRankingLoss", "FusedMultipleNegativesRankingLoss"]

Q2D, Q2Q, D2Q, D2D = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
#: (direction set, partition modes) -> the fused-loss mode that computes it
SUPPORTED = {
    (frozenset({Q2D}), "joint"): "query_to_doc",
    (frozenset({Q2D}), "per_direction"): "query_to_doc",  # one direction: the same softmax
    (frozenset({Q2D, D2Q}), "per_direction"): "symmetric",
    (frozenset({Q2D, Q2Q}), "joint"): "anchor_negatives",
}
SUPPORTED_TEXT = (
    "('query_to_doc',); ('query_to_doc', 'doc_to_query') with partition_mode='per_direction'; "
    "('query_to_doc', 'query_to_query') with partition_mode='joint'"
)


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _is_cos_sim(fn: Callable) -> bool:
    return fn is cos_sim or (getattr(fn, "__name__", None) == "cos_sim"
                             and getattr(fn, "__module__", "").startswith("sentence_transformers"))


def _sentence_embedding(model: nn.Module, features: dict[str, Any]) -> Tensor:
    return model(features)["sentence_embedding"]


class FusedMultipleNegativesRankingLoss(nn.Module):
    """sentence-transformers' ``MultipleNegativesRankingLoss`` computed by :func:`fused_info_nce`.

    Args:
        model: the ``SentenceTransformer`` being trained.
        scale: the logit scale, ``1 / temperature`` (> 0; 20 is sentence-transformers' default).
        similarity_fct: must be ``sentence_transformers.util.cos_sim`` (the default).
        gather_across_devices: under ``torch.distributed``, every rank's anchors are scored against
            the candidates of all ranks (gathered with gradient, ``all_gather_with_grad``), its labels
            offset by ``rank * batch``, exactly as sentence-transformers does.
        directions: one of the supported direction sets (see the module docstring).
        partition_mode: ``"joint"`` or ``"per_direction"`` (see the module docstring).
        backend: the ``fused_info_nce`` backend (``"auto"``: Triton on CUDA, naive/chunked on CPU).
        hardness_mode, hardness_strength: accepted for signature compatibility; any setting other
            than the defaults (off) raises a ``ValueError``.
        check_inputs: ``fused_info_nce``'s NaN/inf scan (one device sync per step).

    Inputs (``forward``): ``sentence_features``, a list of C >= 2 tokenized columns of B rows each
    (anchor, positive, negatives...), and ``labels`` (ignored, as in sentence-transformers).
    Returns the () mean loss over the anchors (of this rank).
    """

    def __init__(
        self,
        model: SentenceTransformer,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = (Q2D,),
        partition_mode: str = "joint",
        backend: str = "auto",
        *,
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale must be a positive number, got {scale!r}")
        self.scale = float(scale)
        if not _is_cos_sim(similarity_fct):
            raise ValueError(
                f"similarity_fct={getattr(similarity_fct, '__name__', similarity_fct)!r} is not supported: the fused "
                "loss computes cosine similarities (sentence_transformers.util.cos_sim) only; use "
                "sentence_transformers.losses.MultipleNegativesRankingLoss for other similarities"
            )
        self.similarity_fct = similarity_fct
        self.gather_across_devices = bool(gather_across_devices)
        if isinstance(directions, str):
            raise ValueError(f"directions must be a tuple of direction names, got the string {directions!r}")
        self.directions = tuple(directions)
        if partition_mode not in ("joint", "per_direction"):
            raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {partition_mode!r}")
        self.partition_mode = partition_mode
        key = (frozenset(self.directions), partition_mode)
        if key not in SUPPORTED or len(set(self.directions)) != len(self.directions):
            raise ValueError(
                f"directions={self.directions} with partition_mode={partition_mode!r} is not supported by the "
                f"fused loss; supported: {SUPPORTED_TEXT}. Use sentence-transformers' own loss for the rest "
                "(e.g. 'doc_to_doc')"
            )
        self._mode = SUPPORTED[key]
        if hardness_mode is not None or hardness_strength != 0.0:
            raise ValueError(
                f"hardness_mode={hardness_mode!r}, hardness_strength={hardness_strength!r}: hardness weighting is "
                "not supported by the fused loss (leave hardness_mode=None and hardness_strength=0.0)"
            )
        self.hardness_mode = None
        self.hardness_strength = 0.0
        from ..options import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.check_inputs = bool(check_inputs)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        """Embed every column (as sentence-transformers' MNRL does) and return the () loss."""
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:
            raise ValueError(f"Expected at least 2 input columns (anchor, positive), got {len(sentence_features)}")
        embeddings = _embed_columns(self.model, sentence_features)
        return self.compute_loss_from_embeddings(embeddings, labels)

    def _fused(self, anchors, positives, negatives=None, **kw) -> Tensor:
        return fused_info_nce(anchors, positives, negatives, temperature=1.0 / self.scale, backend=self.backend,
                              check_inputs=self.check_inputs, **kw)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        """The loss from the columns' embeddings.

        Args:
            embeddings: C >= 2 tensors of shape (B, D): anchors, positives, then negative columns.
            labels: ignored (the positive pair is the in-batch diagonal).

        Returns:
            The () mean over this rank's B anchors.
        """
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        queries, docs = embeddings[0], list(embeddings[1:])
        batch = queries.shape[0]
        if any(d.shape[0] != batch for d in docs):
            raise ValueError(f"every column must have the anchors' {batch} rows, got {[d.shape[0] for d in docs]}")
        rank, world = _dist_rank_world()
        if not (self.gather_across_devices and world > 1):
            negatives = torch.cat(docs[1:]) if len(docs) > 1 else None
            return self._fused(queries, docs[0], negatives, symmetric=self._mode == "symmetric",
                               anchor_negatives=self._mode == "anchor_negatives")
        # Every rank: its own anchors against the candidates of all ranks (gathered with gradient; the
        # gather's backward sums the ranks' gradients into this rank's slice), labels offset by the rank.
        docs_all = [all_gather_with_grad(d) for d in docs]
        queries_all = all_gather_with_grad(queries) if self._mode != "query_to_doc" else None
        negatives = torch.cat(docs_all[1:]) if len(docs_all) > 1 else None
        offset = rank * batch
        labels_local = torch.arange(offset, offset + batch, device=queries.device)
        if self._mode == "query_to_doc":
            return self._fused(queries, docs_all[0], negatives, labels=labels_local)
        if self._mode == "symmetric":
            # ST per_direction: mean_i [(lse_q2d_i + lse_d2q_i) / 2 - pos_i] = (q2d loss + d2q loss) / 2, with
            # d2q = this rank's positives against the anchors of all ranks.
            q2d = self._fused(queries, docs_all[0], negatives, labels=labels_local)
            d2q = self._fused(docs[0], queries_all, labels=labels_local)
            return 0.5 * (q2d + d2q)
        # anchor_negatives: the other anchors of all ranks are negatives, so the rows run over the gathered
        # anchors; this rank's loss is the mean of its own rows (the other rows get zero gradient).
        per_row = self._fused(queries_all, docs_all[0], negatives, anchor_negatives=True, reduction="none")
        return per_row[offset : offset + batch].mean()

    def get_config_dict(self) -> dict[str, Any]:
        """The hyper-parameters, as sentence-transformers' losses report them (for model cards)."""
        return {
            "scale": self.scale,
            "similarity_fct": getattr(self.similarity_fct, "__name__", str(self.similarity_fct)),
            "gather_across_devices": self.gather_across_devices,
            "directions": self.directions,
            "partition_mode": self.partition_mode,
            "hardness_mode": self.hardness_mode,
            "hardness_strength": self.hardness_strength,
            "backend": self.backend,
        }

    @property
    def temperature(self) -> float:
        """``1 / scale``."""
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        """The BibTeX entry sentence-transformers' MNRL gives for the same directions."""
        return _STMNRL.citation.fget(self)


def _embed_columns(model: nn.Module, sentence_features: list[dict[str, Tensor]]) -> list[Tensor]:
    try:  # sentence-transformers >= 6 merges like-shaped candidate columns into one forward
        from sentence_transformers.base.losses.merged_forward import embed_columns
    except ImportError:
        return [_sentence_embedding(model, f) for f in sentence_features]
    return embed_columns(model, sentence_features)


def _batch_size(features: dict[str, Any]) -> int:
    for key in ("input_ids", "attention_mask"):
        if isinstance(features.get(key), Tensor):
            return features[key].shape[0]
    return next(v.shape[0] for v in features.values() if isinstance(v, Tensor) and v.dim() > 0)


class FusedCachedMultipleNegativesRankingLoss(FusedMultipleNegativesRankingLoss):
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss`` (GradCache) with the fused loss.

    1. every column is embedded in mini-batches of ``mini_batch_size`` rows without autograd, recording
       the RNG state before each mini-batch;
    2. the fused loss and ``d loss / d embeddings`` are computed over the whole batch;
    3. when the trainer back-propagates the returned loss, each mini-batch is re-embedded under its
       replayed RNG state (the same dropout masks) and its cached gradient back-propagated.

    Steps 1 and 3 are :func:`simcse_kernels.train.grad_cache.deferred_grad_cache_loss`, the same code
    as ``simcse-train --grad_cache_chunk``. Activation memory is one mini-batch's; the loss itself
    never builds the B x C·B similarity matrix (except the naive backend's small CPU case).

    Args:
        model, scale, similarity_fct, gather_across_devices, directions, partition_mode, backend,
        hardness_mode, hardness_strength, check_inputs: as :class:`FusedMultipleNegativesRankingLoss`.
        mini_batch_size: rows embedded at once in steps 1 and 3 (> 0).
        mini_batch_num_tokens: if set, pack mini-batches by non-padding token count instead
            (sentence-transformers >= 6).
        show_progress_bar: tqdm bars over the mini-batches.
    """

    def __init__(
        self,
        model: SentenceTransformer,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: int | None = None,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = (Q2D,),
        partition_mode: str = "joint",
        show_progress_bar: bool = False,
        backend: str = "auto",
        *,
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        check_inputs: bool = True,
    ) -> None:
        super().__init__(model, scale, similarity_fct, gather_across_devices, directions, partition_mode, backend,
                         hardness_mode=hardness_mode, hardness_strength=hardness_strength,
                         check_inputs=check_inputs)
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size <= 0:
            raise ValueError(f"mini_batch_size must be a positive int, got {mini_batch_size!r}")
        if mini_batch_num_tokens is not None:
            if isinstance(mini_batch_num_tokens, bool) or not isinstance(mini_batch_num_tokens, int) \
                    or mini_batch_num_tokens <= 0:
                raise ValueError(f"mini_batch_num_tokens must be a positive int or None, got {mini_batch_num_tokens!r}")
            if _minibatch_ranges is None:
                raise ValueError("mini_batch_num_tokens needs sentence-transformers >= 6")
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.show_progress_bar = bool(show_progress_bar)

    def minibatches(self, features: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        """Split one tokenized column into the mini-batches embedded in steps 1 and 3 (in order)."""
        if _minibatch_ranges is not None:
            ranges = _minibatch_ranges(features, self.mini_batch_size, self.mini_batch_num_tokens)
            return [_create_minibatch(features, begin, end) for begin, end in ranges]
        n = _batch_size(features)
        return [{k: v[b : b + self.mini_batch_size] if isinstance(v, Tensor) and v.dim() > 0 else v
                 for k, v in features.items()} for b in range(0, n, self.mini_batch_size)]

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        """Steps 1-2 now, step 3 in the backward of the returned () loss (see the class docstring)."""
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:
            raise ValueError(f"Expected at least 2 input columns (anchor, positive), got {len(sentence_features)}")
        sizes = [_batch_size(f) for f in sentence_features]
        chunks = [mb for f in sentence_features for mb in self.minibatches(f)]
        model = self.model

        def loss_from_embeddings(z: Tensor) -> Tensor:
            return self.compute_loss_from_embeddings(list(z.split(sizes)), labels)

        # the model writes its outputs (token embeddings, ...) into the features dict it gets: a fresh shallow copy
        # per call keeps them from piling up in the mini-batch dicts, which live for the whole step
        return deferred_grad_cache_loss(
            lambda mb: _sentence_embedding(model, dict(mb)), chunks, loss_from_embeddings,
            cuda_devices=cuda_devices_of(model), show_progress_bar=self.show_progress_bar,
        )

    def get_config_dict(self) -> dict[str, Any]:
        """The hyper-parameters, as sentence-transformers' CachedMNRL reports them (for model cards)."""
        config = super().get_config_dict()
        config.update(mini_batch_size=self.mini_batch_size, mini_batch_num_tokens=self.mini_batch_num_tokens)
        return config

    @property
    def citation(self) -> str:
        """GradCache's BibTeX entry (Gao et al. 2021), as sentence-transformers' CachedMNRL gives."""
        return _STCachedMNRL.citation.fget(self)
