"""sentence-transformers drop-ins: fused MultipleNegativesRankingLoss and its cached (GradCache) form.

One-line swap in a sentence-transformers training script::

    # loss = losses.MultipleNegativesRankingLoss(model)
    loss = FusedMultipleNegativesRankingLoss(model)
    # loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=64)
    loss = FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=64)

Same constructor, inputs (``sentence_features``: anchor, positive, then any number of negative
columns; every negative is a candidate for every anchor) and result as sentence-transformers' 6.3
losses, computed with :func:`simcse_kernels.fused_info_nce` at ``temperature = 1 / scale``. Every
configuration ST 6.3 accepts is accepted: ``directions`` (query_to_doc plus any of query_to_query,
doc_to_query, doc_to_doc), ``partition_mode`` ("joint", or "per_direction" with query_to_doc /
doc_to_query), ``hardness_mode`` / ``hardness_strength`` and ``similarity_fct`` ``cos_sim`` or
``dot_score`` (``similarity="dot"``); they are passed to ``fused_info_nce`` under the same names (the
math: :mod:`simcse_kernels.reference`). Another ``similarity_fct`` raises a ``ValueError``. Both work
inside ``MatryoshkaLoss`` (the cached one through the ``calculate_loss`` protocol of ST's cached
losses). sentence-transformers stays optional: this module raises an ``ImportError`` naming the extra
to install when it is imported without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

try:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import all_gather_with_grad, cos_sim, dot_score
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

try:  # sentence-transformers >= 6
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss as _STGIST
except ImportError:
    from sentence_transformers.losses import GISTEmbedLoss as _STGIST

try:  # sentence-transformers >= 6: the GradCache mini-batch helpers (padding-trimmed slices, token budgets)
    from sentence_transformers.base.losses.gradcache import _create_minibatch, _minibatch_ranges
except ImportError:  # older releases: plain slicing, mini_batch_size only
    _create_minibatch = _minibatch_ranges = None

try:
    from sentence_transformers.util import similarity_fct_name
except ImportError:  # older releases
    similarity_fct_name = None

from ..functional import fused_info_nce
from ..options import InfoNCEOptions
from ..train.grad_cache import cuda_devices_of, embed_without_grad, replay_backward

__all__ = ["FusedCachedGISTEmbedLoss", "FusedCachedMultipleNegativesRankingLoss", "FusedGISTEmbedLoss",
           "FusedMultipleNegativesRankingLoss"]

Q2D, Q2Q, D2Q, D2D = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _is_st_function(fn: Callable, name: str, reference: Callable) -> bool:
    return fn is reference or (getattr(fn, "__name__", None) == name
                               and getattr(fn, "__module__", "").startswith("sentence_transformers"))


def _similarity_of(fn: Callable) -> str:
    """``fused_info_nce``'s ``similarity`` for an ST similarity function; ValueError for others."""
    if _is_st_function(fn, "cos_sim", cos_sim):
        return "cosine"
    if _is_st_function(fn, "dot_score", dot_score):
        return "dot"
    raise ValueError(
        f"similarity_fct={getattr(fn, '__name__', fn)!r} is not supported: the fused loss computes "
        "sentence_transformers.util.cos_sim or dot_score; use sentence-transformers' own loss for other similarities"
    )


def _sentence_embedding(model: nn.Module, features: dict[str, Any]) -> Tensor:
    return model(features)["sentence_embedding"]


class FusedMultipleNegativesRankingLoss(nn.Module):
    """sentence-transformers' ``MultipleNegativesRankingLoss`` computed by :func:`fused_info_nce`.

    Args:
        model: the ``SentenceTransformer`` being trained.
        scale: the logit scale, ``1 / temperature`` (> 0; 20 is sentence-transformers' default).
        similarity_fct: ``sentence_transformers.util.cos_sim`` (the default) or ``dot_score``.
        gather_across_devices: under ``torch.distributed``, every rank's anchors are scored against
            the candidates of all ranks (gathered with gradient, ``all_gather_with_grad``), exactly as
            sentence-transformers does.
        directions, partition_mode, hardness_mode, hardness_strength: as sentence-transformers' 6.3 MNRL
            (the module docstring); ``hardness_strength`` is ignored when ``hardness_mode`` is None, as there.
        backend: the ``fused_info_nce`` backend (``"auto"``: Triton on CUDA, naive/chunked on CPU).
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
        similarity = _similarity_of(similarity_fct)
        self.similarity_fct = similarity_fct
        self.gather_across_devices = bool(gather_across_devices)
        if isinstance(directions, str) or not isinstance(directions, (tuple, list)):
            raise ValueError(f"directions must be a tuple of direction names, got {directions!r}")
        self.directions = tuple(directions)
        self.partition_mode = partition_mode
        if isinstance(hardness_strength, bool) or not isinstance(hardness_strength, (int, float)) \
                or not hardness_strength >= 0.0:
            raise ValueError(f"hardness_strength must be a number >= 0, got {hardness_strength!r}")
        self.hardness_mode = hardness_mode
        self.hardness_strength = hardness_strength
        from ..options import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.check_inputs = bool(check_inputs)
        # ST ignores the strength without a mode; every other setting is checked (one-line ValueErrors)
        self._loss_options = dict(directions=self.directions, partition_mode=partition_mode,
                                  hardness_mode=hardness_mode,
                                  hardness_strength=float(hardness_strength) if hardness_mode is not None else 0.0,
                                  similarity=similarity)
        self._options = InfoNCEOptions(temperature=1.0 / self.scale, backend=backend, **self._loss_options)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        """Embed every column (as sentence-transformers' MNRL does) and return the () loss."""
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:
            raise ValueError(f"Expected at least 2 input columns (anchor, positive), got {len(sentence_features)}")
        embeddings = _embed_columns(self.model, sentence_features)
        return self.compute_loss_from_embeddings(embeddings, labels)

    def _fused(self, anchors, positives, negatives=None, **kw) -> Tensor:
        options = {**self._loss_options, **kw}
        return fused_info_nce(anchors, positives, negatives, temperature=1.0 / self.scale, backend=self.backend,
                              check_inputs=self.check_inputs, **options)

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
            return self._fused(queries, docs[0], negatives)
        # Every rank: its own anchors against the candidates of all ranks (gathered with gradient; the
        # gather's backward sums the ranks' gradients into this rank's slice).
        docs_all = [all_gather_with_grad(d) for d in docs]
        negatives = torch.cat(docs_all[1:]) if len(docs_all) > 1 else None
        offset = rank * batch
        opts = self._options
        if not (opts.needs_own_docs or opts.anchor_negatives):
            labels_local = torch.arange(offset, offset + batch, device=queries.device)
            q2d = self._fused(queries, docs_all[0], negatives, labels=labels_local, directions=None,
                              partition_mode="joint")
            if not opts.symmetric:
                return q2d
            # ST per_direction: mean_i [(lse_q2d_i + lse_d2q_i) / 2 - pos_i] = (q2d loss + d2q loss) / 2, with
            # d2q = this rank's positives against the anchors of all ranks.
            d2q = self._fused(docs[0], all_gather_with_grad(queries), labels=labels_local, directions=None,
                              partition_mode="joint")
            return 0.5 * (q2d + d2q)
        # The other directions read the anchors and the doc columns of all ranks: the rows run over the
        # gathered batch (ST's layout, negative column k's row j at k·W·B + j); this rank's loss is the mean of
        # its own rows (the other rows get zero gradient). Costs the world batch's rows on every rank.
        per_row = self._fused(all_gather_with_grad(queries), docs_all[0], negatives, reduction="none")
        return per_row[offset: offset + batch].mean()

    def get_config_dict(self) -> dict[str, Any]:
        """The hyper-parameters, as sentence-transformers' losses report them (for model cards), and ``backend``."""
        return {
            "scale": self.scale,
            "similarity_fct": _similarity_name(self.similarity_fct),
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


def _similarity_name(fn: Callable) -> str:
    return similarity_fct_name(fn) if similarity_fct_name is not None else getattr(fn, "__name__", str(fn))


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
    2. :meth:`calculate_loss` computes the fused loss over the whole batch and back-propagates it to the
       mini-batch embeddings (``d loss / d embeddings``, the cache);
    3. when the trainer back-propagates the returned loss, each mini-batch is re-embedded under its
       replayed RNG state (the same dropout masks) and its cached gradient back-propagated.

    Steps 1 and 3 are :mod:`simcse_kernels.train.grad_cache` (the same code as ``simcse-train
    --grad_cache_chunk``). Step 2 follows the protocol of ST's cached losses (``uses_gradient_cache``,
    ``calculate_loss(reps, labels, with_backward=...)``), so ``MatryoshkaLoss`` wraps this loss as it wraps
    ST's. Activation memory is one mini-batch's; the loss itself never builds the B x C·B similarity matrix
    (except the naive backend's small CPU case).

    Args:
        model, scale, similarity_fct, gather_across_devices, directions, partition_mode, backend,
        hardness_mode, hardness_strength, check_inputs: as :class:`FusedMultipleNegativesRankingLoss`.
        mini_batch_size: rows embedded at once in steps 1 and 3 (> 0).
        mini_batch_num_tokens: if set, pack mini-batches by non-padding token count instead
            (sentence-transformers >= 6).
        show_progress_bar: tqdm bars over the mini-batches.
    """

    #: read by sentence-transformers' MatryoshkaLoss: it then decorates :meth:`calculate_loss`
    uses_gradient_cache = True

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

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *,
                       with_backward: bool = False) -> Tensor:
        """Step 2: the loss from each column's mini-batch embeddings (``reps[c][m]``, (b, D)).

        With ``with_backward`` the loss is back-propagated to ``reps`` (their ``.grad``: the cache) and
        returned detached, as sentence-transformers' cached losses do.
        """
        loss = self.compute_loss_from_embeddings([torch.cat(column) for column in reps], labels)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        """Steps 1-2 now, step 3 in the backward of the returned () loss (see the class docstring)."""
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:
            raise ValueError(f"Expected at least 2 input columns (anchor, positive), got {len(sentence_features)}")
        columns = [self.minibatches(f) for f in sentence_features]
        chunks = [mb for column in columns for mb in column]
        model = self.model

        # the model writes its outputs (token embeddings, ...) into the features dict it gets: a fresh shallow copy
        # per call keeps them from piling up in the mini-batch dicts, which live for the whole step
        def embed(mb):
            return _sentence_embedding(model, dict(mb))

        grad_enabled = torch.is_grad_enabled()
        devices = cuda_devices_of(model)
        flat, states = embed_without_grad(embed, chunks, cuda_devices=devices, show_progress_bar=self.show_progress_bar)
        flat = [r.requires_grad_(grad_enabled) for r in flat]
        reps, start = [], 0
        for column in columns:
            reps.append(flat[start: start + len(column)])
            start += len(column)
        if not grad_enabled:
            return self.calculate_loss(reps, labels)
        loss = self.calculate_loss(reps, labels, with_backward=True)
        return _loss_replaying_backward(loss, flat, embed, chunks, states, self.show_progress_bar)

    def get_config_dict(self) -> dict[str, Any]:
        """The hyper-parameters, as sentence-transformers' CachedMNRL reports them (for model cards)."""
        config = super().get_config_dict()
        config.update(mini_batch_size=self.mini_batch_size, mini_batch_num_tokens=self.mini_batch_num_tokens)
        return config

    @property
    def citation(self) -> str:
        """GradCache's BibTeX entry (Gao et al. 2021), as sentence-transformers' CachedMNRL gives."""
        return _STCachedMNRL.citation.fget(self)


def _loss_replaying_backward(loss: Tensor, flat: list[Tensor], embed, chunks, states, show_progress_bar: bool) -> Tensor:
    """GradCache's second half: ``loss`` (already backpropagated into the detached mini-batch
    embeddings ``flat``) as a leaf whose backward replays each mini-batch with its cached gradient."""
    cached = [r.grad if r.grad is not None else torch.zeros_like(r) for r in flat]

    def _hook(grad_output: Tensor) -> None:
        replay_backward(embed, chunks, states, cached, grad_output=grad_output, show_progress_bar=show_progress_bar)

    out = loss.detach().requires_grad_(True)
    out.register_hook(_hook)
    return out


def _guide_features(loss, sentence_feature: dict[str, Any]) -> dict[str, Any]:
    """The guide's input for one tokenized column: the same features when both models share a tokenizer
    (and the guide's max_seq_length is not shorter), else the text decoded with the model's tokenizer and
    tokenized for the guide (as sentence-transformers' GIST losses do)."""
    if not loss.must_retokenize:
        return dict(sentence_feature)  # a shallow copy: the guide writes its outputs into the dict
    from sentence_transformers.util import batch_to_device

    input_ids = sentence_feature["input_ids"]
    if "cu_seq_lens_q" in sentence_feature:  # flattened inputs: one row of concatenated sequences
        flat, bounds = input_ids[0].tolist(), sentence_feature["cu_seq_lens_q"].tolist()
        input_ids = [flat[b:e] for b, e in zip(bounds[:-1], bounds[1:])]
    texts = loss.model.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
    tokenize = getattr(loss.guide, "preprocess", None) or loss.guide.tokenize
    return batch_to_device(tokenize(texts), loss.guide.device)


class FusedGISTEmbedLoss(nn.Module):
    """sentence-transformers' ``GISTEmbedLoss`` computed by :func:`fused_info_nce` with its ``guide`` option.

    The loss of ST's GIST (Solatorio 2024): for anchor i, the candidates are every positive and negative
    (query_to_doc), the other anchors (``contrast_anchors``: query_to_query) and positive i against the other
    positives (``contrast_positives``: doc_to_doc over the positives, ``doc_to_doc_negatives=False``), at
    ``temperature``; every candidate whose guide cosine exceeds the guide cosine of (anchor i, positive i)
    minus the margin (``margin_strategy`` "absolute": ``- margin``, "relative": ``- |t|·margin``) is removed,
    except the positive. The mask is computed per row chunk from the guide embeddings (the fused loss never
    builds the N x M matrix; see :mod:`simcse_kernels.reference`, "Guide").

    Args:
        model: the ``SentenceTransformer`` being trained; guide: the guide ``SentenceTransformer`` (run without
            gradient). temperature, margin_strategy, margin, contrast_anchors, contrast_positives,
            gather_across_devices: as sentence-transformers' GISTEmbedLoss (gathering across several
            processes is not implemented yet: ``NotImplementedError`` in a distributed run).
        backend, check_inputs: as :func:`fused_info_nce`.

    Inputs (``forward``): 2 or 3 tokenized columns (anchor, positive[, negative]) of B rows; ``labels`` ignored.
    Returns the () mean loss over the anchors.
    """

    def __init__(
        self,
        model: SentenceTransformer,
        guide: SentenceTransformer,
        temperature: float = 0.01,
        margin_strategy: str = "absolute",
        margin: float = 0.0,
        contrast_anchors: bool = True,
        contrast_positives: bool = True,
        gather_across_devices: bool = False,
        *,
        backend: str = "auto",
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        from transformers import PreTrainedTokenizerBase

        self.model = model
        self.guide = guide
        if not hasattr(model, "tokenizer") or not hasattr(guide, "tokenizer"):
            raise ValueError("Both the training model and the guiding model must have a tokenizer attribute.")
        if not isinstance(model.tokenizer, PreTrainedTokenizerBase) or not isinstance(
                guide.tokenizer, PreTrainedTokenizerBase):
            raise ValueError("Both the training model and the guiding model must use a PreTrainedTokenizer from "
                             "transformers.")
        self.must_retokenize = (model.tokenizer.get_vocab() != guide.tokenizer.get_vocab()
                                or guide.max_seq_length < model.max_seq_length)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature = temperature
        if margin_strategy not in ("absolute", "relative"):
            raise ValueError("margin_strategy must be 'absolute' or 'relative'.")
        self.margin_strategy = margin_strategy
        self.margin = margin
        self.contrast_anchors = contrast_anchors
        self.contrast_positives = contrast_positives
        self.gather_across_devices = gather_across_devices
        from ..options import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.check_inputs = bool(check_inputs)
        directions = (Q2D,) + ((Q2Q,) if contrast_anchors else ()) + ((D2D,) if contrast_positives else ())
        self._loss_options = dict(directions=directions, doc_to_doc_negatives=False, guide_margin=float(margin),
                                  guide_margin_strategy=margin_strategy)
        InfoNCEOptions(temperature=float(temperature), backend=backend, **self._loss_options)  # checks them once

    def _check_columns(self, n_columns: int) -> None:
        if n_columns not in (2, 3):
            raise ValueError(f"Expected 2 or 3 embeddings, got {n_columns}")

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        """Embed every column with the model (and, without gradient, the guide) and return the () loss."""
        sentence_features = list(sentence_features)
        self._check_columns(len(sentence_features))
        guide_features = [_guide_features(self, f) for f in sentence_features]
        embeddings = _embed_columns(self.model, sentence_features)
        with torch.no_grad():
            guide_embeddings = _embed_columns(self.guide, guide_features)
        return self.compute_loss_from_embeddings(embeddings, guide_embeddings)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], guide_embeddings: list[Tensor]) -> Tensor:
        """The loss from the model's and the guide's column embeddings ((B, D) and (B, G) each)."""
        if self.gather_across_devices and _dist_rank_world()[1] > 1:
            # TODO(issue 22): ST gathers the candidates only (the anchor-anchor block stays local)
            raise NotImplementedError("gather_across_devices=True across several processes is not implemented yet "
                                      "for the fused GIST losses; use sentence-transformers' GISTEmbedLoss")
        anchors, positives = embeddings[0], embeddings[1]
        negatives = torch.cat(embeddings[2:]) if len(embeddings) > 2 else None
        guide = tuple(g.detach().to(anchors.device) for g in guide_embeddings[:2])
        if len(guide_embeddings) > 2:
            guide = guide + (torch.cat(guide_embeddings[2:]).detach().to(anchors.device),)
        return fused_info_nce(anchors, positives, negatives, temperature=float(self.temperature),
                              backend=self.backend, check_inputs=self.check_inputs, guide=guide, **self._loss_options)

    def get_config_dict(self) -> dict[str, Any]:
        """sentence-transformers' GISTEmbedLoss config (for model cards), and ``backend``."""
        return {
            "guide": self.guide,
            "temperature": self.temperature,
            "margin_strategy": self.margin_strategy,
            "margin": self.margin,
            "contrast_anchors": self.contrast_anchors,
            "contrast_positives": self.contrast_positives,
            "gather_across_devices": self.gather_across_devices,
            "backend": self.backend,
        }

    @property
    def citation(self) -> str:
        """GISTEmbed's BibTeX entry, as sentence-transformers gives."""
        return _STGIST.citation.fget(self)


class FusedCachedGISTEmbedLoss(FusedGISTEmbedLoss):
    """sentence-transformers' ``CachedGISTEmbedLoss``: :class:`FusedGISTEmbedLoss` with GradCache.

    Step 1 embeds every column in mini-batches without autograd with the model (RNG state recorded) and the
    guide; step 2 computes the fused loss over the whole batch and its gradient w.r.t. the model's
    embeddings; step 3 (in the backward of the returned loss) re-embeds each mini-batch with the model under
    its replayed RNG state and back-propagates the cached gradient (:mod:`simcse_kernels.train.grad_cache`).
    Any number of negative columns, as ST's cached GIST.

    Args:
        model, guide, temperature, margin_strategy, margin, contrast_anchors, contrast_positives,
        gather_across_devices, backend, check_inputs: as :class:`FusedGISTEmbedLoss`.
        mini_batch_size, mini_batch_num_tokens, show_progress_bar: as sentence-transformers'.
    """

    def __init__(
        self,
        model: SentenceTransformer,
        guide: SentenceTransformer,
        temperature: float = 0.01,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: int | None = None,
        show_progress_bar: bool = False,
        margin_strategy: str = "absolute",
        margin: float = 0.0,
        contrast_anchors: bool = True,
        contrast_positives: bool = True,
        gather_across_devices: bool = False,
        *,
        backend: str = "auto",
        check_inputs: bool = True,
    ) -> None:
        super().__init__(model, guide, temperature, margin_strategy, margin, contrast_anchors, contrast_positives,
                         gather_across_devices, backend=backend, check_inputs=check_inputs)
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size <= 0:
            raise ValueError(f"mini_batch_size must be a positive int, got {mini_batch_size!r}")
        if mini_batch_num_tokens is not None and (isinstance(mini_batch_num_tokens, bool) or not isinstance(
                mini_batch_num_tokens, int) or mini_batch_num_tokens <= 0 or _minibatch_ranges is None):
            raise ValueError(f"mini_batch_num_tokens must be a positive int or None (sentence-transformers >= 6), "
                             f"got {mini_batch_num_tokens!r}")
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.show_progress_bar = bool(show_progress_bar)

    minibatches = FusedCachedMultipleNegativesRankingLoss.minibatches

    def _check_columns(self, n_columns: int) -> None:
        if n_columns < 2:
            raise ValueError(f"Expected at least 2 input columns (anchor, positive), got {n_columns}")

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        """Steps 1-2 now, step 3 in the backward of the returned () loss (see the class docstring)."""
        sentence_features = list(sentence_features)
        self._check_columns(len(sentence_features))
        columns = [self.minibatches(f) for f in sentence_features]
        chunks = [mb for column in columns for mb in column]
        model, guide_out, first_pass = self.model, [], [True]

        def embed(mb):  # step 1 also runs the guide (after the model, as ST's cached GIST); step 3 only the model
            reps = _sentence_embedding(model, dict(mb))
            if first_pass[0]:
                with torch.no_grad():
                    guide_out.append(_sentence_embedding(self.guide, _guide_features(self, mb)))
            return reps

        grad_enabled = torch.is_grad_enabled()
        flat, states = embed_without_grad(embed, chunks, cuda_devices=cuda_devices_of(model),
                                          show_progress_bar=self.show_progress_bar)
        first_pass[0] = False
        flat = [r.requires_grad_(grad_enabled) for r in flat]
        reps, guide_reps, start = [], [], 0
        for column in columns:
            reps.append(flat[start: start + len(column)])
            guide_reps.append(guide_out[start: start + len(column)])
            start += len(column)
        if not grad_enabled:
            return self.calculate_loss(reps, guide_reps)
        loss = self.calculate_loss(reps, guide_reps, with_backward=True)
        return _loss_replaying_backward(loss, flat, embed, chunks, states, self.show_progress_bar)

    def calculate_loss(self, reps: list[list[Tensor]], reps_guided: list[list[Tensor]], *,
                       with_backward: bool = False) -> Tensor:
        """Step 2 from each column's mini-batch embeddings (model ``reps``, guide ``reps_guided``), as ST's cached
        GIST: with ``with_backward`` the loss is back-propagated to ``reps`` and returned detached."""
        loss = self.compute_loss_from_embeddings([torch.cat(c) for c in reps], [torch.cat(c) for c in reps_guided])
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def get_config_dict(self) -> dict[str, Any]:
        """sentence-transformers' CachedGISTEmbedLoss config (for model cards), and ``backend``."""
        return {
            "guide": self.guide,
            "temperature": self.temperature,
            "mini_batch_size": self.mini_batch_size,
            "mini_batch_num_tokens": self.mini_batch_num_tokens,
            "margin_strategy": self.margin_strategy,
            "margin": self.margin,
            "contrast_anchors": self.contrast_anchors,
            "contrast_positives": self.contrast_positives,
            "gather_across_devices": self.gather_across_devices,
            "backend": self.backend,
        }

    @property
    def citation(self) -> str:
        """None, as sentence-transformers' CachedGISTEmbedLoss, which has no ``citation`` (model cards check
        ``hasattr``): reading it raises AttributeError."""
        raise AttributeError("CachedGISTEmbedLoss has no citation in sentence-transformers")
