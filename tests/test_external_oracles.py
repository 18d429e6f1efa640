"""Independent formulas from the field give the same loss: sentence-transformers' MNRL math and
SimCSE's ``cl_forward`` math (re-typed here from their definitions, not imported)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs
from torch import nn

from simcse_kernels import fused_info_nce

BACKENDS = ["naive", "torch"]


def mnrl_loss(anchors, candidates, scale):
    """sentence-transformers MultipleNegativesRankingLoss: cos_sim(a, [p; n]) * scale, CE with arange."""
    scores = F.normalize(anchors, dim=-1) @ F.normalize(candidates, dim=-1).T * scale
    return F.cross_entropy(scores, torch.arange(anchors.shape[0]))


def mnrl_symmetric_loss(anchors, positives, scale):
    """sentence-transformers MultipleNegativesSymmetricRankingLoss: (CE(S) + CE(S.T)) / 2."""
    scores = F.normalize(anchors, dim=-1) @ F.normalize(positives, dim=-1).T * scale
    labels = torch.arange(anchors.shape[0])
    return (F.cross_entropy(scores, labels) + F.cross_entropy(scores.T, labels)) / 2


def simcse_cl_forward_loss(z1, z2, z3, temp, hard_negative_weight):
    """SimCSE's cl_forward: broadcasting CosineSimilarity / temp, hard-negative weight matrix."""
    cos = nn.CosineSimilarity(dim=-1)
    cos_sim = cos(z1.unsqueeze(1), z2.unsqueeze(0)) / temp
    if z3 is not None:
        z1_z3_cos = cos(z1.unsqueeze(1), z3.unsqueeze(0)) / temp
        cos_sim = torch.cat([cos_sim, z1_z3_cos], 1)
        weights = torch.tensor(
            [
                [0.0] * (cos_sim.size(-1) - z1_z3_cos.size(-1))
                + [0.0] * i
                + [hard_negative_weight]
                + [0.0] * (z1_z3_cos.size(-1) - i - 1)
                for i in range(z1_z3_cos.size(-1))
            ],
            dtype=cos_sim.dtype,
        )
        cos_sim = cos_sim + weights
    labels = torch.arange(cos_sim.size(0)).long()
    return nn.CrossEntropyLoss()(cos_sim, labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [5, 64])
def test_sentence_transformers_mnrl(backend, n):
    a, p, neg = make_inputs(n, 96, n, dtype=torch.float64, seed=11)
    tau = 0.05
    cands = torch.cat([p, neg])
    torch.testing.assert_close(fused_info_nce(a, p, neg, temperature=tau, backend=backend),
                               mnrl_loss(a, cands, 1 / tau))
    torch.testing.assert_close(fused_info_nce(a, p, temperature=tau, backend=backend), mnrl_loss(a, p, 1 / tau))
    torch.testing.assert_close(fused_info_nce(a, p, temperature=tau, symmetric=True, backend=backend),
                               mnrl_symmetric_loss(a, p, 1 / tau))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w", [0.0, 1.0])
def test_simcse_cl_forward(backend, w):
    z1, z2, z3 = make_inputs(17, 128, 17, dtype=torch.float64, seed=12)
    expected = simcse_cl_forward_loss(z1, z2, z3, 0.05, w)
    actual = fused_info_nce(z1, z2, z3, temperature=0.05, hard_negative_weight=w, backend=backend)
    torch.testing.assert_close(actual, expected)
    expected_unsup = simcse_cl_forward_loss(z1, z2, None, 0.05, 0.0)
    torch.testing.assert_close(fused_info_nce(z1, z2, temperature=0.05, backend=backend), expected_unsup)


def test_sentence_transformers_package_formula_when_installed():
    """If sentence-transformers is installed, its own cos_sim feeds the same cross-entropy."""
    st_util = pytest.importorskip("sentence_transformers.util", reason="sentence-transformers not installed")
    a, p, neg = make_inputs(9, 64, 9, dtype=torch.float64, seed=13)
    cands = torch.cat([p, neg])
    scores = st_util.cos_sim(a, cands) * 20.0
    expected = F.cross_entropy(scores, torch.arange(9))
    torch.testing.assert_close(fused_info_nce(a, p, neg, temperature=0.05, backend="torch"), expected)
