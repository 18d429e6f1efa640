"""Drop-ins for pytorch-metric-learning's CosFaceLoss / ArcFaceLoss (issue 21): same loss value and
gradients (embeddings and W) as PML in float64, state_dicts interchangeable, PML not imported."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from simcse_kernels.integrations.metric_learning import FusedArcFaceLoss, FusedCosFaceLoss

pml_losses = pytest.importorskip("pytorch_metric_learning.losses",
                                 reason="pytorch-metric-learning is not installed (pip install "
                                        "pytorch-metric-learning, in the test extra)")

PAIRS = {"cosface": (FusedCosFaceLoss, "CosFaceLoss"), "arcface": (FusedArcFaceLoss, "ArcFaceLoss")}


def _pair(name, num_classes, dim, **kwargs):
    ours_cls, theirs_name = PAIRS[name]
    torch.manual_seed(60)
    theirs = getattr(pml_losses, theirs_name)(num_classes, dim, **kwargs).double()
    ours = ours_cls(num_classes, dim, **kwargs).double()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize("kwargs", [dict(), dict(margin=10.0, scale=16.0)])
@pytest.mark.parametrize("name", list(PAIRS))
def test_matches_pml_loss_and_gradients(name, kwargs, backend):
    """N = 13, D = 100, C = 57 classes (repeats among the labels), float64."""
    if name == "cosface" and kwargs:
        kwargs = dict(margin=0.2, scale=16.0)
    ours, theirs = _pair(name, 57, 100, **kwargs)
    ours.backend = backend
    g = torch.Generator().manual_seed(61)
    x = torch.randn(13, 100, generator=g, dtype=torch.float64)
    # pull rows toward their class vectors so the softmax is not flat / saturated
    labels = torch.randint(0, 57, (13,), generator=g)
    x = x + 0.1 * theirs.W.detach().t()[labels]
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    loss_ours, loss_theirs = ours(x1, labels), theirs(x2, labels)
    loss_ours.backward()
    loss_theirs.backward()
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours.W.grad, theirs.W.grad, rtol=1e-9, atol=1e-12)
    assert ours.W.shape == theirs.W.shape == (100, 57)
    assert ours.margin == pytest.approx(theirs.margin, rel=1e-15)


@pytest.mark.parametrize("name", list(PAIRS))
def test_state_dict_round_trip_and_init(name):
    """Same parameter names and shapes both ways, and PML's initialization (normal, std 1)."""
    ours, theirs = _pair(name, 2000, 64)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    fresh = PAIRS[name][0](2000, 64)
    assert fresh.W.shape == (64, 2000)
    assert abs(fresh.W.mean().item()) < 0.02 and abs(fresh.W.std().item() - 1.0) < 0.02  # 128000 N(0, 1) draws


def test_unsupported_pml_options_refused():
    with pytest.raises(ValueError, match="weight_regularizer"):
        FusedCosFaceLoss(10, 8, weight_regularizer=object())
    with pytest.raises(ValueError, match="margin"):
        FusedArcFaceLoss(10, 8, margin=200.0)
    with pytest.raises(ValueError, match="indices_tuple"):
        FusedCosFaceLoss(10, 8)(torch.randn(3, 8), torch.tensor([0, 1, 2]), indices_tuple=(1, 2))


def test_does_not_import_pml():
    code = ("import sys; import simcse_kernels.integrations.metric_learning as m; "
            "m.FusedCosFaceLoss(5, 4)(__import__('torch').randn(3, 4), __import__('torch').tensor([0, 1, 4])); "
            "assert 'pytorch_metric_learning' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
