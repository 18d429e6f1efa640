"""float64 ``torch.autograd.gradcheck`` of the chunked backend, one case per mode.

MixCSE's mixtures are stop-gradient by definition, so a numerical gradient through the raw
inputs (which moves the mixtures too) differs from the true MixCSE gradient. For the mix modes
the check therefore runs on the autograd Function itself, with the mixtures held as constants.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs

from simcse_kernels import fused_info_nce
from simcse_kernels.ops.chunked import ChunkedInfoNCEFunction
from simcse_kernels.options import InfoNCEOptions

MODES = {
    "unsup": dict(),
    "hard_neg": dict(hard_negative_weight=0.5, k=5),
    "symmetric": dict(symmetric=True),
    "anchor_negatives": dict(anchor_negatives=True),
    "everything_sum": dict(symmetric=True, anchor_negatives=True, reduction="sum", hard_negative_weight=-0.4, k=5),
    "none": dict(reduction="none", k=5),
}


@pytest.fixture(autouse=True)
def tiny_chunks(monkeypatch):
    import simcse_kernels.ops.chunked as chunked

    monkeypatch.setattr(chunked, "default_chunk_size", lambda n, device_type="cpu": 3)  # several chunks per block


@pytest.mark.parametrize("mode", list(MODES))
def test_gradcheck_end_to_end(mode):
    opts = dict(MODES[mode])
    k = opts.pop("k", 0)
    a, p, neg = make_inputs(5, 6, k, dtype=torch.float64, seed=21)
    tau = torch.tensor(0.3, dtype=torch.float64)
    inputs = [t.requires_grad_(True) for t in (a, p, tau)] + ([neg.requires_grad_(True)] if k else [])

    def loss(a, p, tau, *neg):
        return fused_info_nce(a, p, neg[0] if neg else None, temperature=tau, backend="torch", **opts)

    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("with_neg", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("anchor_negatives", [False, True])
def test_gradcheck_function_with_mixcse_blocks(with_neg, symmetric, anchor_negatives):
    a, p, neg = make_inputs(5, 6, 7 if with_neg else 0, dtype=torch.float64, seed=22)
    mix3 = F.normalize(torch.randn(5, 6, dtype=torch.float64), dim=-1)
    mix4 = F.normalize(torch.randn(5, 6, dtype=torch.float64), dim=-1)
    labels = torch.tensor([0, 1, 2, 4, 3])
    unit = lambda t: F.normalize(t, dim=-1).requires_grad_(True)
    inputs = [unit(a), unit(p), unit(neg) if with_neg else None, torch.tensor(0.4, dtype=torch.float64,
                                                                            requires_grad=True)]

    options = InfoNCEOptions(hard_negative_weight=0.3, anchor_negatives=anchor_negatives, symmetric=symmetric)

    def per_row(a, p, n, tau):
        return ChunkedInfoNCEFunction.apply(a, p, n, mix3, mix4, tau, labels, options, 3)

    assert torch.autograd.gradcheck(per_row, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
