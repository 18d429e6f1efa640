"""Margin softmax (issue 21): ``margin``, ``angular_margin`` and ``similarity="dot"`` on the naive and
torch backends against the float64 oracle, every option crossed with the existing ones, plus an
independent hand-written CosFace / ArcFace cross-entropy, gradcheck, ``torch.compile`` and ArcFace
at target cosines near 1.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import OPTION_SETS, assert_backend_matches_reference, make_inputs, split_option_set

import simcse_kernels.ops.chunked as chunked
from simcse_kernels import fused_info_nce, info_nce_reference
from simcse_kernels.ops.budget import ENV_VAR

#: (margin, angular_margin, similarity)
MARGINS = {
    "cosface": (0.35, 0.0, "cosine"),
    "arcface": (0.0, 0.5, "cosine"),
    "both": (0.2, 0.3, "cosine"),
    "dot": (0.0, 0.0, "dot"),
    "dot_margin": (0.3, 0.0, "dot"),
}


def margin_options(name):
    margin, angular, similarity = MARGINS[name]
    return dict(margin=margin, angular_margin=angular, similarity=similarity)


def dot_scaled(a, p, neg, d):
    """Raw dot logits of random rows are ~D: scale the rows so the softmax is not one-hot."""
    s = 1.0 / math.sqrt(d)
    return a * s, p * s, None if neg is None else neg * s


def _inputs(n, d, k, dtype, seed, similarity, n_pos=None):
    a, p, neg = make_inputs(n, d, k, dtype=dtype, seed=seed, n_pos=n_pos)
    return dot_scaled(a, p, neg, d) if similarity == "dot" else (a, p, neg)


@pytest.fixture
def small_chunks(monkeypatch):
    """Several chunks everywhere: scalar path R = 4 rows (symmetric: first pass over the column
    LSEs, no kept rows under the tiny budget), per-row path 5 columns per chunk."""
    monkeypatch.setitem(chunked.MAX_ROWS, "cpu", 4)
    monkeypatch.setenv(ENV_VAR, "0.0001")
    monkeypatch.setattr(chunked, "default_chunk_size", lambda n, device_type="cpu": 5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
@pytest.mark.parametrize("margins", list(MARGINS))
@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_margins_match_reference(backend, margins, option_set, dtype, small_chunks):
    """N = 9 (not a multiple of R = 4), D = 100, learnable tau; every option set of the other tests."""
    n, d = 9, 100
    k, opts = split_option_set(option_set, n)
    mopts = margin_options(margins)
    if mopts["similarity"] == "dot" and "mix_lambda" in opts:
        pytest.skip("MixCSE needs similarity='cosine' (a ValueError, tested below)")
    a, p, neg = _inputs(n, d, k, dtype, 50, mopts["similarity"])
    assert_backend_matches_reference(backend, a, p, neg, tau=torch.tensor(0.1, dtype=dtype), **opts, **mopts)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("margins", list(MARGINS))
def test_margins_labels_more_candidates(margins, symmetric, reduction, small_chunks):
    """M > N: P = 13 positives, K = 6 negatives, labels with repeats, targets among the negatives
    (non-symmetric: a target that is a row's own paired hard negative gets w as well)."""
    n, d = 6, 100
    mopts = margin_options(margins)
    a, p, neg = _inputs(n, d, 6, torch.float64, 51, mopts["similarity"], n_pos=13)
    labels = torch.tensor([3, 12, 3, 0, 7, 9]) if symmetric else torch.tensor([3, 12, 13, 17, 7, 18])
    assert_backend_matches_reference("torch", a, p, neg, tau=torch.tensor(0.2, dtype=torch.float64), labels=labels, symmetric=symmetric,
                                     hard_negative_weight=0.6, reduction=reduction, **mopts)


def hand_margin_cross_entropy(x, w, labels, scale, margin, angular_margin, similarity="cosine"):
    """CosFace / ArcFace written out independently: F.cross_entropy on hand-built logits."""
    if similarity == "dot":
        cos = x @ w.T
    else:
        cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    onehot = F.one_hot(labels, w.shape[0]).bool()
    target = cos[onehot]
    if angular_margin:
        theta = torch.acos(target.clamp(-1 + 1e-7, 1 - 1e-7))
        arc = torch.cos(theta + angular_margin)
        target = torch.where(theta + angular_margin <= math.pi, arc,
                             target.clamp(-1 + 1e-7, 1 - 1e-7) - angular_margin * math.sin(angular_margin))
    logits = torch.where(onehot, torch.zeros_like(cos), cos)
    logits = logits + onehot * (target - margin)[:, None]
    return F.cross_entropy(scale * logits, labels)


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("margins", ["cosface", "arcface", "both", "dot_margin"])
def test_class_weight_head_matches_hand_written(backend, margins, small_chunks):
    """Class-weight head (P = C = 37 classes >> N = 7): loss and gradients to embeddings and class
    weights equal the hand-written cross-entropy in float64."""
    margin, angular, similarity = MARGINS[margins]
    g = torch.Generator().manual_seed(52)
    x = torch.randn(7, 100, generator=g, dtype=torch.float64)
    w = torch.randn(37, 100, generator=g, dtype=torch.float64)
    if similarity == "dot":
        x, w = x / 10, w / 10
    labels = torch.tensor([0, 36, 5, 5, 17, 2, 30])
    scale = 16.0
    x1, w1, x2, w2 = (t.clone().requires_grad_(True) for t in (x, w, x, w))
    ours = fused_info_nce(x1, w1, labels=labels, temperature=1 / scale, margin=margin, angular_margin=angular,
                          similarity=similarity, backend=backend)
    hand = hand_margin_cross_entropy(x2, w2, labels, scale, margin, angular, similarity)
    ours.backward()
    hand.backward()
    torch.testing.assert_close(ours, hand, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("margins", ["cosface", "arcface", "both", "dot_margin"])
@pytest.mark.parametrize("mode", [dict(), dict(symmetric=True, hard_negative_weight=0.4, k=5),
                                  dict(anchor_negatives=True, reduction="sum"), dict(reduction="none", k=5)])
def test_margins_gradcheck(margins, mode, small_chunks):
    """float64 gradcheck of the torch backend, learnable tau included (several chunks per pass)."""
    opts = dict(mode)
    k = opts.pop("k", 0)
    mopts = margin_options(margins)
    a, p, neg = _inputs(5, 6, k, torch.float64, 53, mopts["similarity"])
    tau = torch.tensor(0.3, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (a, p, tau)] + ([neg.clone().requires_grad_(True)] if k else [])

    def fn(a, p, tau, *neg):
        loss = fused_info_nce(a, p, neg[0] if neg else None, temperature=tau, backend="torch", **opts, **mopts)
        return loss if loss.dim() == 0 else loss * torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("near", [0.99, 1 - 1e-9, 1.0])
@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_arcface_target_cosine_near_one_finite(backend, near):
    """Dropout views of one sentence sit at cos ~ 0.99: ArcFace's loss and gradients stay finite
    (the clamp holds f'(c) at most ~2.2e3·sin(m); where the clamp is active f'(c) = 0), and equal
    the float64 oracle."""
    g = torch.Generator().manual_seed(54)
    a = torch.randn(6, 32, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 32, generator=g, dtype=torch.float64)
    noise -= (noise * a).sum(1, keepdim=True) / (a * a).sum(1, keepdim=True) * a  # orthogonal to a
    noise = F.normalize(noise, dim=1) * a.norm(dim=1, keepdim=True)
    p = near * a + math.sqrt(max(0.0, 1 - near * near)) * noise  # cos(a_i, p_i) = near
    cos = F.cosine_similarity(a, p)
    torch.testing.assert_close(cos, torch.full_like(cos, near), rtol=0, atol=1e-12)
    assert_backend_matches_reference(backend, a, p, None, tau=torch.tensor(0.05, dtype=torch.float64), angular_margin=0.5, margin=0.1)
    for dtype in (torch.float32, torch.float64):
        leaves = [t.to(dtype).requires_grad_(True) for t in (a, p)]
        loss = fused_info_nce(*leaves, temperature=0.05, angular_margin=0.5, backend=backend)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_torch_compile_fullgraph_margins():
    """The torch backend with margins compiles as one graph and matches eager, grads included."""
    a, p, neg = make_inputs(8, 16, 8, seed=55)
    results = []
    for compiled in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (a, p, neg)]
        tau = torch.tensor(0.05, requires_grad=True)

        def loss_fn(a, p, n, tau):
            return fused_info_nce(a, p, n, temperature=tau, hard_negative_weight=0.3, margin=0.2,
                                  angular_margin=0.3, symmetric=True, backend="torch")

        fn = torch.compile(loss_fn, fullgraph=True, backend="aot_eager") if compiled else loss_fn
        loss = fn(*leaves, tau)
        loss.backward()
        results.append((loss.detach(), *(t.grad for t in leaves), tau.grad))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager)


def test_reference_api_takes_margins():
    """info_nce_reference with a margin differs from without by exactly the target's change (one row)."""
    a, p, _ = make_inputs(1, 8, seed=56, n_pos=3)
    base = info_nce_reference(a.double(), p.double(), labels=torch.tensor([1]), temperature=0.5, reduction="none")
    cos = F.cosine_similarity(a.double(), p.double()[1:2])
    others = F.normalize(a.double(), dim=1) @ F.normalize(p.double(), dim=1).T / 0.5
    logits = others.clone()
    logits[0, 1] = (cos - 0.25) / 0.5
    expected = torch.logsumexp(logits, dim=1) - logits[0, 1]
    got = info_nce_reference(a.double(), p.double(), labels=torch.tensor([1]), temperature=0.5, reduction="none",
                             margin=0.25)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, base)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(similarity="dot", mix_lambda=0.5), "mix_lambda"),
    (dict(similarity="dot", angular_margin=0.2), "angular_margin"),
])
def test_dot_refuses_cosine_only_options(kwargs, match):
    a, p, _ = make_inputs(4, 8, seed=57)
    with pytest.raises(ValueError, match=match):
        fused_info_nce(a, p, backend="torch", **kwargs)
