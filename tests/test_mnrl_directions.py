"""sentence-transformers' MultipleNegativesRankingLoss configurations as loss options (issue 22):
``directions`` x ``partition_mode`` x ``hardness_mode`` x cosine/dot, with 0-2 negative columns.

The oracle is independent of this package: sentence-transformers' own
``MultipleNegativesRankingLoss.compute_loss_from_embeddings`` (a stand-in model: it is never called),
with ``scale = 1/tau`` as a tensor so that its autograd also gives the temperature gradient.
"""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from conftest import GRAD_TOL, LOSS_TOL, _assert_close_scaled, assert_backend_matches_reference

from simcse_kernels import FusedInfoNCE, fused_info_nce
from simcse_kernels import functional as functional_module
from simcse_kernels.ops import chunked
from simcse_kernels.reference import info_nce_reference
from simcse_kernels.tolerances import grad_scale_floor, loss_scale_floor

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
st_util = pytest.importorskip("sentence_transformers.util")

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
#: every (directions, partition_mode) ST 6.3 accepts: query_to_doc plus any subset of the other three,
#: joint; per_direction only with query_to_doc / doc_to_query
DIRECTION_SETS = [(("query_to_doc",) + extra, "joint") for r in range(4)
                  for extra in itertools.combinations(DIRECTIONS[1:], r)]
DIRECTION_SETS += [(("query_to_doc",), "per_direction"), (("query_to_doc", "doc_to_query"), "per_direction")]
HARDNESS = [None, "in_batch_negatives", "hard_negatives", "all_negatives"]
SIMILARITIES = ["cosine", "dot"]
CONFIGS = [(d, pm, h, s) for (d, pm) in DIRECTION_SETS for h in HARDNESS for s in SIMILARITIES]
assert len(CONFIGS) == 80  # ST 6.3's count (issue 22)
N, D = 7, 100  # odd shapes
ALPHA = 5.0  # EmbeddingGemma's hardness strength


def _config_id(config):
    dirs, pm, h, s = config
    short = "+".join(d.replace("query", "q").replace("doc", "d").replace("_to_", "2") for d in dirs)
    return f"{short}-{pm}-{h or 'nohard'}-{s}"


def _columns(n_neg_columns, similarity, seed, dtype=torch.float64):
    """Query, positive and ``n_neg_columns`` negative columns (N, D) each; positives correlated with the
    queries. Dot similarity: rows of norm ~2, so logits with tau = 1 stay O(1)-O(10), like ST's advice."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, D, generator=g, dtype=torch.float64)
    cols = [q, q + 0.8 * torch.randn(N, D, generator=g, dtype=torch.float64)]
    cols += [torch.randn(N, D, generator=g, dtype=torch.float64) + 0.3 * q for _ in range(n_neg_columns)]
    if similarity == "dot":
        cols = [c * (2.0 / D ** 0.5) for c in cols]
    return [c.to(dtype) for c in cols]


def _tau(similarity):
    return 1.0 if similarity == "dot" else 0.05


def _options(config):
    dirs, pm, h, s = config
    return dict(directions=dirs, partition_mode=pm, hardness_mode=h, hardness_strength=ALPHA if h else 0.0,
                similarity=s)


def _st_loss_and_grads(cols, tau, config):
    """ST's loss and its gradients w.r.t. every column and tau (ST's scale = 1/tau, a tensor)."""
    dirs, pm, h, s = config
    leaves = [c.detach().clone().requires_grad_(True) for c in cols]
    tau_leaf = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # ST warns on nothing here, but keep its logger quiet
    try:
        loss_fn = st_losses.MultipleNegativesRankingLoss(
            torch.nn.Identity(), scale=1.0 / tau_leaf,
            similarity_fct=st_util.cos_sim if s == "cosine" else st_util.dot_score,
            directions=dirs, partition_mode=pm, hardness_mode=h, hardness_strength=ALPHA if h else 0.0)
    finally:
        logging.disable(previous)
    loss = loss_fn.compute_loss_from_embeddings(leaves, None)
    loss.backward()
    d_tau = tau_leaf.grad
    from_difference = not bool(torch.isfinite(d_tau))
    if from_difference:
        # ST masks entries with -inf before multiplying by the scale, so its autograd's d/d scale is
        # 0 * inf = NaN with query_to_query / doc_to_doc: there the oracle is a central difference of ST's
        # float64 loss in tau, Richardson-extrapolated (error O(h^4) + round-off ~1e-11 relative)
        def st_loss(t):
            loss_fn.scale = 1.0 / t
            with torch.no_grad():
                return loss_fn.compute_loss_from_embeddings([c.detach() for c in cols], None).item()

        h = 1e-3 * tau
        central = lambda step: (st_loss(tau + step) - st_loss(tau - step)) / (2 * step)
        d_tau = torch.tensor((4 * central(h / 2) - central(h)) / 3, dtype=torch.float64)
    return loss.detach(), [t.grad for t in leaves] + [d_tau], from_difference


def _ours(cols, tau, config, backend, reduction="mean", **extra):
    leaves = [c.detach().clone().requires_grad_(True) for c in cols]
    tau_leaf = torch.tensor(tau, dtype=cols[0].dtype, requires_grad=True)
    negatives = torch.cat(leaves[2:]) if len(leaves) > 2 else None
    loss = fused_info_nce(leaves[0], leaves[1], negatives, temperature=tau_leaf, backend=backend,
                          reduction=reduction, **_options(config), **extra)
    if reduction == "none":
        assert loss.shape == (N,)
        loss = loss.mean()
    loss.backward()
    return loss.detach(), [t.grad for t in leaves] + [tau_leaf.grad]


def _assert_equal_to_st(actual, expected, cols, tau, what):
    """float64 tolerances (rtol 1e-9) with the round-off floors of simcse_kernels.tolerances: the loss's unit
    is 1/tau (a row's loss is a difference of logits), a gradient's one term |g|·|ŷ|/(tau·|x|)."""
    (act_loss, act_grads), (exp_loss, exp_grads, tau_from_difference) = actual, expected
    _assert_close_scaled(act_loss, exp_loss, LOSS_TOL[torch.float64], f"{what}: loss",
                         min_scale=loss_scale_floor(N, tau, "mean"))
    names = ["anchors", "positives"] + ["negatives"] * (len(cols) - 2)
    for k, (name, act, exp, src) in enumerate(zip(names, act_grads, exp_grads, cols)):
        _assert_close_scaled(act, exp, GRAD_TOL[torch.float64], f"{what}: grad of column {k}",
                             min_scale=grad_scale_floor(name, src, N, tau, "mean"))
    # the temperature: ST's autograd where it is finite, else the extrapolated difference (rtol 1e-7)
    tol = dict(rtol=1e-7, atol=1e-9) if tau_from_difference else GRAD_TOL[torch.float64]
    _assert_close_scaled(act_grads[-1], exp_grads[-1], tol, f"{what}: grad tau")


@pytest.mark.parametrize("n_neg_columns", [0, 1, 2])
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_float64_equals_sentence_transformers(config, n_neg_columns, monkeypatch):
    """Every ST 6.3 configuration, float64: naive, torch (one row chunk; several chunks of 3 rows; the
    per-row path) give ST's loss and the gradients of every column and of the temperature (rtol 1e-9)."""
    seed = CONFIGS.index(config) * 3 + n_neg_columns
    cols = _columns(n_neg_columns, config[3], seed)
    tau = _tau(config[3])
    expected = _st_loss_and_grads(cols, tau, config)
    _assert_equal_to_st(_ours(cols, tau, config, "naive"), expected, cols, tau, "naive")
    _assert_equal_to_st(_ours(cols, tau, config, "torch"), expected, cols, tau, "torch")
    _assert_equal_to_st(_ours(cols, tau, config, "torch", reduction="none"), expected, cols, tau, "torch per-row")
    monkeypatch.setitem(chunked.MAX_ROWS, "cpu", 3)  # 3 row chunks (3 + 3 + 1 rows), also for column terms
    _assert_equal_to_st(_ours(cols, tau, config, "torch", chunk_budget_mib=1e-3), expected, cols, tau,
                        "torch chunks")


@pytest.mark.parametrize("n_neg_columns", [0, 2])
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_float32_against_float64_truth(config, n_neg_columns):
    """fp32 inputs on the torch backend vs the float64 naive loss (equal to ST's above), learnable tau,
    with the per-dtype tolerances of simcse_kernels.tolerances."""
    cols = _columns(n_neg_columns, config[3], 1000 + CONFIGS.index(config), dtype=torch.float32)
    neg = torch.cat(cols[2:]) if n_neg_columns else None
    tau = torch.tensor(_tau(config[3]))
    assert_backend_matches_reference("torch", cols[0], cols[1], neg, tau=tau, **_options(config))
    assert_backend_matches_reference("torch", cols[0], cols[1], neg, tau=tau, reduction="none",
                                     **_options(config))


GTE = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


@pytest.mark.parametrize("extra", [dict(hard_negative_weight=0.7), dict(margin=0.2),
                                   dict(angular_margin=0.3, margin=0.1), dict(reduction="sum")],
                         ids=["weight", "margin", "arcface", "sum"])
@pytest.mark.parametrize("hardness", HARDNESS)
def test_st_options_with_this_packages_options(extra, hardness, monkeypatch):
    """The GTE loss with hardness, combined with hard_negative_weight / margins / sum (no ST counterpart):
    torch (several row chunks) against the float64 naive formula of reference.py."""
    cols = _columns(2, "cosine", 77)
    opts = dict(directions=GTE, hardness_mode=hardness, hardness_strength=ALPHA if hardness else 0.0, **extra)
    tau = torch.tensor(0.05, dtype=torch.float64)  # a learnable float64 temperature (its gradient in float64)
    assert_backend_matches_reference("torch", cols[0], cols[1], torch.cat(cols[2:]), tau=tau, **opts)
    monkeypatch.setitem(chunked.MAX_ROWS, "cpu", 3)
    monkeypatch.setenv("SIMCSE_KERNELS_CHUNK_MIB", "0.001")  # 3 rows per chunk
    assert_backend_matches_reference("torch", cols[0], cols[1], torch.cat(cols[2:]), tau=tau, **opts)


def test_aliases_are_the_st_directions():
    """symmetric=True is (query_to_doc, doc_to_query) per_direction; anchor_negatives=True is
    (query_to_doc, query_to_query) joint; both may be spelled together with their own directions."""
    a, p, neg = _columns(1, "cosine", 5)
    sym = fused_info_nce(a, p, neg, symmetric=True, backend="naive")
    explicit = fused_info_nce(a, p, neg, directions=("doc_to_query", "query_to_doc"), partition_mode="per_direction",
                              backend="naive")
    both = fused_info_nce(a, p, neg, symmetric=True, directions=("query_to_doc", "doc_to_query"),
                          partition_mode="per_direction", backend="naive")
    assert torch.equal(sym, explicit) and torch.equal(sym, both)
    anchor = fused_info_nce(a, p, neg, anchor_negatives=True, backend="naive")
    explicit = fused_info_nce(a, p, neg, directions=("query_to_doc", "query_to_query"), backend="naive")
    assert torch.equal(anchor, explicit)
    plain = fused_info_nce(a, p, neg, backend="naive")
    assert torch.equal(plain, fused_info_nce(a, p, neg, partition_mode="per_direction", backend="naive"))
    module = FusedInfoNCE(temperature=0.05, directions=GTE, hardness_mode="all_negatives", hardness_strength=5.0)
    assert module.options.directions == GTE and "directions=" in repr(module)
    torch.testing.assert_close(module(a, p, neg), fused_info_nce(a, p, neg, directions=GTE,
                                                                 hardness_mode="all_negatives",
                                                                 hardness_strength=5.0, backend="naive"))


BAD_OPTIONS = [
    (dict(directions=("query_to_doc", "docs_to_query")), ValueError, "directions: unknown"),
    (dict(directions=("doc_to_query",)), ValueError, "directions must include 'query_to_doc'"),
    (dict(directions="query_to_doc"), ValueError, "directions must be a non-empty tuple"),
    (dict(directions=()), ValueError, "directions must be a non-empty tuple"),
    (dict(directions=("query_to_doc", "query_to_doc")), ValueError, "directions lists a direction twice"),
    (dict(directions=("query_to_doc", "query_to_query"), partition_mode="per_direction"), ValueError,
     "partition_mode='per_direction' is defined only"),
    (dict(directions=("query_to_doc", "doc_to_doc"), partition_mode="per_direction"), ValueError,
     "partition_mode='per_direction' is defined only"),
    (dict(anchor_negatives=True, partition_mode="per_direction"), ValueError, "partition_mode='per_direction'"),
    (dict(partition_mode="both"), ValueError, "partition_mode must be one of"),
    (dict(symmetric=True, directions=("query_to_doc", "doc_to_query")), ValueError, "symmetric=True means"),
    (dict(symmetric=True, directions=("query_to_doc",)), ValueError, "symmetric=True means"),
    (dict(anchor_negatives=True, directions=("query_to_doc", "doc_to_query")), ValueError,
     "anchor_negatives=True means"),
    (dict(hardness_mode="hard"), ValueError, "hardness_mode must be one of"),
    (dict(hardness_mode="all_negatives", hardness_strength=-1.0), ValueError, "hardness_strength must be"),
    (dict(hardness_mode="all_negatives", hardness_strength=float("inf")), ValueError, "hardness_strength must be"),
    (dict(hardness_mode="all_negatives", hardness_strength=float("nan")), ValueError, "hardness_strength must be"),
    (dict(hardness_strength=5.0), ValueError, "hardness_strength=5.0 is set but hardness_mode is None"),
    (dict(directions=GTE, mix_lambda=0.2), ValueError, "mix_lambda"),
    (dict(hardness_mode="hard_negatives", hardness_strength=1.0, mix_lambda=0.2), ValueError, "mix_lambda"),
]


@pytest.mark.parametrize(("options", "error", "message"), BAD_OPTIONS,
                         ids=[str(i) for i in range(len(BAD_OPTIONS))])
def test_bad_options_raise_one_line(options, error, message):
    a, p, neg = _columns(1, "cosine", 6)
    for call in (lambda: fused_info_nce(a, p, neg, **options), lambda: FusedInfoNCE(**options)):
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
            call()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("options", [dict(directions=GTE), dict(directions=("query_to_doc", "doc_to_doc")),
                                     dict(directions=("query_to_doc", "doc_to_query")),
                                     dict(hardness_mode="in_batch_negatives", hardness_strength=9.0)],
                         ids=["gte", "doc_to_doc", "doc_to_query_joint", "hardness"])
def test_layout_errors_name_the_argument(options):
    """The joint doc_to_query, doc_to_doc and hardness are defined on ST's layout: default labels, P = N,
    negatives in whole columns of N rows."""
    a, p, neg = _columns(1, "cosine", 8)
    with pytest.raises(ValueError, match="labels must be None"):
        fused_info_nce(a, p, neg, labels=torch.arange(N), **options)
    with pytest.raises(ValueError, match="needs as many positives as anchors"):
        fused_info_nce(a, torch.cat([p, p[:2]]), neg, **options)
    with pytest.raises(ValueError, match="whole columns of N rows"):
        fused_info_nce(a, p, neg[:5], **options)


def test_fused_backends_route_to_torch_under_auto(monkeypatch):
    """Triton / CUDA do not implement the new options yet: "auto" runs them on torch, an explicit fused
    backend raises NotImplementedError (one line). The aliases' configurations stay on the fused backends."""
    a, p, neg = _columns(1, "cosine", 9)
    picked = []
    monkeypatch.setattr(functional_module, "resolve_backend", lambda *args: picked.append(1) or "triton")
    opts = dict(directions=GTE, hardness_mode="hard_negatives", hardness_strength=5.0)
    got = fused_info_nce(a, p, neg, **opts)
    torch.testing.assert_close(got, info_nce_reference(a, p, neg, **opts), **LOSS_TOL[torch.float64])
    assert picked
    for backend in ("triton", "cuda"):
        monkeypatch.setattr(functional_module, "resolve_backend", lambda *args, b=backend: b)
        with pytest.raises(NotImplementedError, match="not yet implemented in backend") as info:
            fused_info_nce(a, p, neg, backend=backend, **opts)
        assert "\n" not in str(info.value)


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="runs the Triton kernels in the interpreter (TRITON_INTERPRET=1)")
def test_aliases_spelled_as_directions_stay_on_triton():
    """(query_to_doc, doc_to_query) per_direction and (query_to_doc, query_to_query) joint are the aliases'
    configurations: the Triton backend computes them (no NotImplementedError), equal to the float64 truth."""
    cols = _columns(1, "cosine", 12, dtype=torch.float32)
    for opts in (dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
                 dict(directions=("query_to_doc", "query_to_query"))):
        assert_backend_matches_reference("triton", cols[0], cols[1], cols[2], tau=torch.tensor(0.05), **opts)
