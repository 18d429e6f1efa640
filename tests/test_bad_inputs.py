"""Every bad input gets a clear error naming the argument, never a silent wrong answer."""

from __future__ import annotations

import math

import pytest
import torch

from simcse_kernels import BackendUnavailableError, FusedInfoNCE, fused_info_nce

A = torch.randn(4, 8)
P = torch.randn(4, 8)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(anchors=torch.randn(4)), ValueError, "anchors must be 2-D"),
        (dict(positives=torch.randn(2, 4, 8)), ValueError, "positives must be 2-D"),
        (dict(positives=torch.randn(4, 7)), ValueError, "positives has dim 7"),
        (dict(negatives=torch.randn(4, 9)), ValueError, "negatives has dim 9"),
        (dict(anchors=torch.randn(0, 8)), ValueError, "anchors is empty"),
        (dict(positives=torch.randn(0, 8)), ValueError, "positives is empty"),
        (dict(anchors=[[1.0]]), TypeError, "anchors must be a torch.Tensor"),
        (dict(anchors=torch.ones(4, 8, dtype=torch.long)), TypeError, "anchors must be a floating-point"),
        (dict(positives=torch.randn(4, 8, dtype=torch.float64)), TypeError, "positives has dtype"),
        (dict(negatives=torch.randn(4, 8, dtype=torch.float16)), TypeError, "negatives has dtype"),
        (dict(positives=torch.randn(4, 8, device="meta")), ValueError, "positives is on meta"),
        (dict(temperature=0.0), ValueError, "temperature must be positive"),
        (dict(temperature=-0.05), ValueError, "temperature must be positive"),
        (dict(temperature=math.inf), ValueError, "temperature must be positive and finite"),
        (dict(temperature=math.nan), ValueError, "temperature must be positive and finite"),
        (dict(temperature=torch.tensor([0.05, 0.1])), ValueError, "temperature tensor must be 0-dim"),
        (dict(temperature=torch.tensor(-1.0)), ValueError, "temperature must be positive"),
        (dict(temperature="0.05"), TypeError, "temperature must be a float"),
        (dict(hard_negative_weight=math.nan, negatives=torch.randn(4, 8)), ValueError, "hard_negative_weight"),
        (dict(hard_negative_weight=1.0), ValueError, "no hard negatives"),
        (dict(mix_lambda=1.5), ValueError, "mix_lambda"),
        (dict(mix_lambda=0.2, positives=torch.randn(6, 8)), ValueError, "MixCSE"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(backend="magic"), ValueError, "backend must be one of"),
        (dict(labels=torch.tensor([0, 1, 2, 4])), ValueError, "labels out of range"),
        (dict(labels=torch.tensor([0, 1, 2, -1])), ValueError, "labels out of range"),
        (dict(labels=torch.tensor([0, 1, 2])), ValueError, "labels must have shape"),
        (dict(labels=torch.tensor([0.0, 1.0, 2.0, 3.0])), TypeError, "labels must be an integer"),
        (dict(labels=torch.tensor([0, 1, 2, 5]), negatives=torch.randn(4, 8), symmetric=True), ValueError,
         "symmetric"),
        (dict(anchors=torch.randn(6, 8)), ValueError, "P >= N"),
        (dict(anchors=torch.tensor([[math.nan] * 8] * 4)), ValueError, "anchors contains NaN or inf"),
        (dict(positives=torch.full((4, 8), math.inf)), ValueError, "positives contains NaN or inf"),
        (dict(negatives=torch.tensor([[1.0] * 8, [math.nan] * 8])), ValueError, "negatives contains NaN"),
        (dict(symmetric=1), TypeError, "symmetric must be a bool"),
    ],
)
@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_bad_input_raises(kwargs, exc, match, backend):
    args = dict(anchors=A, positives=P, negatives=None, backend=backend)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fused_info_nce(args.pop("anchors"), args.pop("positives"), args.pop("negatives"), **args)


def test_module_validates_options_at_construction():
    with pytest.raises(ValueError, match="temperature"):
        FusedInfoNCE(temperature=0)
    with pytest.raises(ValueError, match="reduction"):
        FusedInfoNCE(reduction="max")


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import simcse_kernels.backends as backends

    monkeypatch.setattr(backends, "_cuda_unavailable_reason", lambda device: "the extension is not built")
    with pytest.raises(BackendUnavailableError, match="'cuda' is unavailable on cpu"):
        fused_info_nce(A, P, backend="cuda")


def test_check_inputs_false_skips_the_scan():
    bad = A.clone()
    bad[0, 0] = math.nan
    loss = fused_info_nce(bad, P, backend="torch", check_inputs=False)
    assert torch.isnan(loss)  # the caller opted out of the check; NaN propagates visibly


def test_zero_vectors_do_not_produce_nan():
    a = torch.zeros(4, 8)
    p = torch.zeros(4, 8)
    for backend in ("naive", "torch"):
        a_ = a.clone().requires_grad_(True)
        loss = fused_info_nce(a_, p, backend=backend)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(a_.grad).all()
        torch.testing.assert_close(loss, torch.tensor(math.log(4.0)))
