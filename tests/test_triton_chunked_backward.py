"""The default ("chunked") Triton backward: row chunks of ∂L/∂s from the memory budget.

Parity against the float64 oracle when the anchor rows cross several ∂L/∂s chunks (R = one or two
``BLOCK_M``), when R·M is limited by the budget (option and ``SIMCSE_KERNELS_CHUNK_MIB``), and for
fp16 inputs with upstream gradients far outside fp16's range (∂L/∂s is stored in fp32 for them).
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    GRAD_TOL,
    LOSS_TOL,
    TRITON_DEVICE,
    _assert_close_scaled,
    assert_backend_matches_reference,
    interpret_triton,
    make_inputs,
    needs_triton_runtime,
)

from simcse_kernels import InfoNCEOptions, fused_info_nce, info_nce_reference
from simcse_kernels.tolerances import temperature_grad_floor

INTERPRET = interpret_triton()
pytestmark = needs_triton_runtime
triton_loss = pytest.importorskip("simcse_kernels.ops.triton_loss", reason="triton is not installed")
DEVICE = TRITON_DEVICE
TINY_MIB = 1e-6  # below one row: R = one BLOCK_M


@pytest.fixture
def chunk_rows(monkeypatch):
    """Records every ``(n_rows, n_cols, bytes_per_logit, budget_bytes, multiple) -> R`` of the backward."""
    calls = []
    real = triton_loss.rows_per_chunk

    def spy(n_rows, n_cols, bytes_per_logit, budget_bytes, multiple=1):
        rows = real(n_rows, n_cols, bytes_per_logit, budget_bytes, multiple)
        calls.append(dict(n=n_rows, m=n_cols, elem=bytes_per_logit, budget=budget_bytes, multiple=multiple,
                          rows=rows))
        return rows

    monkeypatch.setattr(triton_loss, "rows_per_chunk", spy)
    monkeypatch.delenv("SIMCSE_KERNELS_CHUNK_MIB", raising=False)
    return calls


def _tau(dtype=torch.float32):
    return torch.tensor(0.05, dtype=torch.float64 if dtype == torch.float64 else torch.float32)


def _block_m(d, dtype):
    return triton_loss.block_config("dlogits", d, dtype)["BLOCK_M"]


@pytest.mark.parametrize("option_set,opts", [
    ("hard_neg", dict(k="n", hard_negative_weight=0.7)),
    ("sym_anchor", dict(symmetric=True, anchor_negatives=True)),
    ("everything", dict(k="n", symmetric=True, anchor_negatives=True, mix_lambda=0.5, hard_negative_weight=1.0)),
])
def test_parity_one_block_rows_per_chunk(option_set, opts, chunk_rows, monkeypatch):
    """R = BLOCK_M (a budget below one row): N = 75 crosses several chunks, the last one partial.
    (The budget comes from the environment variable: the oracle takes no ``chunk_budget_mib``.)"""
    opts = dict(opts)
    monkeypatch.setenv("SIMCSE_KERNELS_CHUNK_MIB", str(TINY_MIB))
    n, d = 75, 64
    k = n if opts.pop("k", 0) == "n" else 0
    a, p, neg = make_inputs(n, d, k, seed=41, device=DEVICE)
    assert_backend_matches_reference("triton", a, p, neg, tau=_tau(), **opts)
    block_m = _block_m(d, a.dtype)
    assert chunk_rows and all(c["rows"] == block_m for c in chunk_rows)
    assert -(-n // block_m) >= 3  # several chunks, the last one partial (75 is not a multiple)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_parity_two_blocks_rows_per_chunk_dtypes(dtype, chunk_rows, monkeypatch):
    """R = 2·BLOCK_M, chosen by the budget, for fp64 and fp16 (whose ∂L/∂s chunk is fp32)."""
    n, d = 70, 48
    a, p, neg = make_inputs(n, d, n, dtype=dtype, seed=42, device=DEVICE)
    m_total = 2 * n + n  # P + K + anchor negatives
    block_m = _block_m(d, dtype)
    elem = 4 if dtype == torch.float16 else torch.empty((), dtype=dtype).element_size()
    budget_mib = (2 * block_m * m_total * elem + elem) / 2**20
    monkeypatch.setenv("SIMCSE_KERNELS_CHUNK_MIB", repr(budget_mib))
    assert_backend_matches_reference("triton", a, p, neg, tau=_tau(dtype), hard_negative_weight=0.3,
                                     anchor_negatives=True)
    assert chunk_rows and all(c["rows"] == 2 * block_m and c["m"] == m_total and c["elem"] == elem
                              for c in chunk_rows)


def test_budget_limits_rows_times_columns(chunk_rows, monkeypatch):
    """The (R, M) chunk stays within the budget: R·M·bytes <= budget, R < N, and the gradients still
    equal the oracle's (MixCSE: M = 3N columns, mix4 rows in the chunk)."""
    n, d = 96, 40
    a, p, _ = make_inputs(n, d, seed=43, device=DEVICE)
    budget_mib = 0.07  # 73400 bytes: 64 fp32 rows of 288 columns (73728 B) do not fit, 32 rows do
    monkeypatch.setenv("SIMCSE_KERNELS_CHUNK_MIB", repr(budget_mib))
    assert_backend_matches_reference("triton", a, p, None, tau=_tau(), mix_lambda=0.3, symmetric=True)
    for c in chunk_rows:
        assert c["m"] == 3 * n and c["budget"] == int(budget_mib * 2**20)
        assert c["rows"] * c["m"] * c["elem"] <= c["budget"] and c["rows"] < n


def test_env_var_sets_budget_and_option_overrides_it(chunk_rows, monkeypatch):
    n, d = 70, 32
    a, p, neg = make_inputs(n, d, n, seed=44, device=DEVICE)
    monkeypatch.setenv("SIMCSE_KERNELS_CHUNK_MIB", str(TINY_MIB))
    assert_backend_matches_reference("triton", a, p, neg, tau=_tau(), hard_negative_weight=0.2)
    block_m = _block_m(d, a.dtype)
    assert chunk_rows and all(c["rows"] == block_m for c in chunk_rows)
    chunk_rows.clear()
    loss = fused_info_nce(a.clone().requires_grad_(True), p, neg, backend="triton", chunk_budget_mib=64.0)
    loss.backward()
    assert chunk_rows and all(c["rows"] == n and c["budget"] == 64 << 20 for c in chunk_rows)
    monkeypatch.setenv("SIMCSE_KERNELS_CHUNK_MIB", "zero")
    with pytest.raises(ValueError, match="SIMCSE_KERNELS_CHUNK_MIB"):
        fused_info_nce(a.clone().requires_grad_(True), p, neg, backend="triton").backward()


def test_several_chunks_bitwise_deterministic_and_equal_to_one_chunk():
    """Run to run the gradients are bit-identical; one chunk vs several agree to fp32 round-off."""
    a, p, neg = make_inputs(80, 64, 80, seed=45, device=DEVICE)

    def grads(budget):
        leaves = [t.clone().requires_grad_(True) for t in (a, p, neg)]
        tau = _tau().requires_grad_(True)
        fused_info_nce(*leaves, temperature=tau, backend="triton", hard_negative_weight=0.3,
                       anchor_negatives=True, symmetric=True, chunk_budget_mib=budget).backward()
        return [leaf.grad for leaf in leaves] + [tau.grad]

    first, second, whole = grads(TINY_MIB), grads(TINY_MIB), grads(None)
    for g0, g1, g2 in zip(first, second, whole):
        assert torch.equal(g0, g1)
        torch.testing.assert_close(g0, g2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction,upstream,input_scale", [("sum", 1e4, 1.0), ("none", 3e3, 1.0),
                                                              ("mean", 1 / 1024, 1e-3)])
def test_fp16_dlogits_outside_fp16_range(reduction, upstream, input_scale, chunk_rows):
    """fp16 inputs whose ∂L/∂s/tau entries an fp16 buffer could not hold. ``sum`` times 1e4
    (``none`` times 3e3): entries up to ~1.5e4/tau = 3e5 > 65504 (overflow). ``mean`` times 1/1024
    (the ∂L/∂ℓ of a batch of 70·1024 anchors): the typical entry ``g/(tau·M)`` ~ 2e-6 is below
    6.1e-5, fp16's smallest normal (at N = M = 65536 they would flush to 0). Inputs (independent,
    so the softmax is not saturated) of norm ~8 (sum, none) or ~8e-3 (mean) keep the output
    gradients in fp16's normal range. The fp32 ∂L/∂s chunk holds all of it: gradients match the
    float64 oracle to fp16 tolerance, across several chunks."""
    n, d, tau_value = 70, 64, 0.05
    dtype = torch.float16
    gen = torch.Generator().manual_seed(46)
    a, p, neg = (input_scale * torch.randn(n, d, generator=gen, dtype=torch.float64) for _ in range(3))
    a, p, neg = (t.to(device=DEVICE, dtype=dtype) for t in (a, p, neg))
    opts = dict(hard_negative_weight=0.5, symmetric=True, reduction=reduction)
    g_max = upstream * 1.5 / (n if reduction == "mean" else 1)  # largest |∂L/∂ℓ_i|
    assert g_max / tau_value > 65504 or g_max / (tau_value * 2 * n) < 6.1e-5  # the premise

    def run(fn, tensors, tau, **kw):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        tau = tau.clone().requires_grad_(True)
        loss = fn(*leaves, temperature=tau, **opts, **kw)
        weight = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device)
        (upstream * (loss.reshape(-1) * weight).sum()).backward()
        return loss.detach(), [leaf.grad for leaf in leaves] + [tau.grad]

    exp_loss, exp_grads = run(info_nce_reference, [t.double() for t in (a, p, neg)],
                              torch.tensor(tau_value, dtype=torch.float64, device=DEVICE))
    act_loss, act_grads = run(fused_info_nce, (a, p, neg), torch.tensor(tau_value, device=DEVICE),
                              backend="triton", chunk_budget_mib=TINY_MIB)
    assert len(chunk_rows) == 1 and chunk_rows[0]["rows"] < n and chunk_rows[0]["elem"] == 4
    _assert_close_scaled(act_loss, exp_loss, LOSS_TOL[dtype], "loss",
                         min_scale=(1 if reduction == "mean" else n) / tau_value)
    # the units of conftest.assert_backend_matches_reference, times the upstream gradient
    for name, act, exp, src in zip(("anchors", "positives", "negatives", "temperature"), act_grads, exp_grads,
                                   (a, p, neg, None)):
        assert torch.isfinite(act).all(), name
        if name == "temperature":  # a cancelling sum: round-off relative to the sum of |terms|
            weight = upstream * torch.linspace(0.5, 1.5, exp_loss.numel(), dtype=torch.float64).reshape(exp_loss.shape)
            tau_floor_value = temperature_grad_floor(a, p, neg, None, InfoNCEOptions(temperature=tau_value, **opts),
                                                 loss_weight=weight.to(DEVICE))
            _assert_close_scaled(act, exp, GRAD_TOL[dtype], "grad temperature", min_scale=tau_floor_value)
        else:
            assert act.dtype == dtype and 1e-3 < exp.abs().max().item() < 1e4, name  # normal fp16 outputs
            rms_norm = src.double().norm(dim=1).pow(2).mean().sqrt().item()
            unit = g_max / (tau_value * d**0.5 * rms_norm)  # one gradient term
            _assert_close_scaled(act, exp, GRAD_TOL[dtype], f"grad {name}", min_scale=unit)
