"""Every CPU backend against the float64 naive oracle: loss and all gradients, every option."""

from __future__ import annotations

import pytest
import torch
from conftest import OPTION_SETS, assert_backend_matches_reference, make_inputs, split_option_set


@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
@pytest.mark.parametrize("n,d", [(1, 100), (7, 100), (129, 384)])
def test_parity_fp32_learnable_tau(backend, option_set, n, d):
    k, opts = split_option_set(option_set, n)
    a, p, neg = make_inputs(n, d, k, dtype=torch.float32, seed=n + d)
    assert_backend_matches_reference(backend, a, p, neg, tau=torch.tensor(0.05), **opts)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("option_set", ["unsup", "hard_neg", "everything"])
def test_parity_dtypes(dtype, option_set):
    k, opts = split_option_set(option_set, 33)
    a, p, neg = make_inputs(33, 100, k, dtype=dtype, seed=3)
    assert_backend_matches_reference("torch", a, p, neg, tau=0.07, **opts)


@pytest.mark.parametrize("option_set", ["unsup", "hard_neg", "symmetric", "mixcse"])
def test_parity_small_chunks_cross_block_edges(option_set, monkeypatch):
    """Chunks of 5 columns: every masked/diagonal entry lands on a chunk edge somewhere."""
    import simcse_kernels.ops.chunked as chunked

    monkeypatch.setattr(chunked, "default_chunk_size", lambda n, device_type="cpu": 5)
    k, opts = split_option_set(option_set, 23)
    a, p, neg = make_inputs(23, 100, k, seed=9)
    assert_backend_matches_reference("torch", a, p, neg, tau=torch.tensor(0.1), **opts)


def test_more_candidates_than_anchors_and_custom_labels():
    """M > N: extra positives and negatives, a permutation of labels, targets in the negatives."""
    a, p, neg = make_inputs(12, 100, 30, n_pos=20, seed=4)
    labels = torch.randperm(20, generator=torch.Generator().manual_seed(1))[:12]
    labels[3] = 20 + 5  # a target among the negatives
    assert_backend_matches_reference("torch", a, p, neg, tau=0.05, labels=labels, hard_negative_weight=0.2)


def test_symmetric_with_labels():
    a, p, _ = make_inputs(10, 64, n_pos=15, seed=5)
    labels = torch.tensor([3, 1, 4, 14, 5, 9, 2, 6, 5, 3])  # repeated targets too
    assert_backend_matches_reference("torch", a, p, None, tau=0.05, labels=labels, symmetric=True)


def test_zero_vectors_give_finite_loss_and_grads():
    a, p, neg = make_inputs(8, 32, 8, seed=6)
    a[2] = 0
    p[5] = 0
    neg[1] = 0
    assert_backend_matches_reference("torch", a, p, neg, tau=0.05, hard_negative_weight=0.3, mix_lambda=0.2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("option_set", ["unsup", "everything"])
def test_parity_cuda_large(dtype, option_set):
    k, opts = split_option_set(option_set, 8192)
    a, p, neg = make_inputs(8192, 768, k, dtype=dtype, device="cuda", seed=7)
    assert_backend_matches_reference("torch", a, p, neg, tau=torch.tensor(0.05, device="cuda"), **opts)
