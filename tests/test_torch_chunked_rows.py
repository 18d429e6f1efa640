"""The ``torch`` backend's scalar-reduction path: row chunks, gradient formed in the forward pass.

Parity with the float64 oracle across several row chunks and with the row count limited by the
memory budget, the loss-only path (no_grad / nothing requires grad), only some inputs requiring
grad, a row whose target probability underflows, and the GEMM work of each case
(``FlopCounterMode``; unit: one similarity GEMM, 2·N·M·D FLOPs).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    GRAD_TOL,
    LOSS_TOL,
    OPTION_SETS,
    assert_backend_matches_reference,
    make_inputs,
    split_option_set,
)
from torch.utils.flop_counter import FlopCounterMode

import simcse_kernels.ops.chunked as chunked
from simcse_kernels import fused_info_nce, info_nce_reference
from simcse_kernels.ops.budget import ENV_VAR

SCALAR_SETS = [name for name, opts in OPTION_SETS.items() if opts.get("reduction", "mean") != "none"]


def logit_columns(n, k, opts) -> int:
    """M_total of a row: P + K (+ N anchor negatives) (+ 2N MixCSE blocks)."""
    return n + k + n * int(opts.get("anchor_negatives", False)) + 2 * n * int(opts.get("mix_lambda") is not None)


def budget_mib_for_rows(n, k, opts, rows: float) -> float:
    """A chunk budget (MiB) that holds ``rows`` fp32 rows of this option set's chunk buffers."""
    per_row = (logit_columns(n, k, opts) + (n if opts.get("symmetric") else 0)) * 4
    return rows * per_row / 2**20


def count_chunks(monkeypatch) -> list:
    """Record the row range of every chunk the scalar path fills."""
    calls = []
    fill = chunked._fill_logits

    def spy(buf, rows_s, mix4_s, cols, lay, r0, r1, *rest):
        calls.append((r0, r1))
        return fill(buf, rows_s, mix4_s, cols, lay, r0, r1, *rest)

    monkeypatch.setattr(chunked, "_fill_logits", spy)
    return calls


def gemm_equivalents(fn, n, m, d) -> float:
    """FLOPs of every matmul in ``fn()`` in units of one 2·n·m·d similarity GEMM."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / (2 * n * m * d)


@pytest.mark.parametrize("option_set", SCALAR_SETS)
def test_parity_across_row_chunks(option_set, monkeypatch):
    """R = 4 rows per chunk over N = 23 anchors: 6 chunks, the last one partial; every masked or
    weighted diagonal entry and the MixCSE wrap-around rows land in different chunks."""
    k, opts = split_option_set(option_set, 23)
    # the CPU row cap, and a budget of 4.5 rows (a symmetric loss that fits one chunk ignores the cap)
    monkeypatch.setitem(chunked.MAX_ROWS, "cpu", 4)
    monkeypatch.setenv(ENV_VAR, repr(budget_mib_for_rows(23, k, opts, 4.5)))
    calls = count_chunks(monkeypatch)
    a, p, neg = make_inputs(23, 64, k, seed=31)
    assert_backend_matches_reference("torch", a, p, neg, tau=torch.tensor(0.07), **opts)
    assert sorted(set(calls)) == [(r, min(r + 4, 23)) for r in range(0, 23, 4)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_parity_across_row_chunks_dtypes(dtype, monkeypatch):
    k, opts = split_option_set("everything", 17)
    monkeypatch.setenv(ENV_VAR, repr(budget_mib_for_rows(17, k, opts, 5.5) * dtype.itemsize / 4))
    a, p, neg = make_inputs(17, 48, k, dtype=dtype, seed=32)
    # an fp64 tau leaf for fp64 inputs (an fp32 leaf holds its gradient only to fp32)
    tau = torch.tensor(0.1, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    assert_backend_matches_reference("torch", a, p, neg, tau=tau, **opts)


@pytest.mark.parametrize("option_set", ["hard_neg", "symmetric", "everything"])
def test_rows_limited_by_budget(option_set, monkeypatch):
    """R·M_total is bounded by the chunk budget (here 3 rows' worth, env var and option)."""
    monkeypatch.setitem(chunked.MAX_ROWS, "cpu", 10**9)  # only the budget limits R
    n, d = 19, 40
    k, opts = split_option_set(option_set, n)
    m = logit_columns(n, k, opts)
    budget_mib = budget_mib_for_rows(n, k, opts, 3.5)  # fp32 logits (+ symmetric column term)
    assert chunked.scalar_rows_per_chunk(n, m, n, bool(opts.get("symmetric")), 4, "cpu", budget_mib) == 3
    a, p, neg = make_inputs(n, d, k, seed=33)
    calls = count_chunks(monkeypatch)
    monkeypatch.setenv(ENV_VAR, repr(budget_mib))
    assert_backend_matches_reference("torch", a, p, neg, tau=torch.tensor(0.05), **opts)
    assert max(r1 - r0 for r0, r1 in calls) == 3
    monkeypatch.delenv(ENV_VAR)
    # the option overrides the environment variable and gives the same loss
    calls.clear()
    loss = fused_info_nce(a, p, neg, backend="torch", chunk_budget_mib=budget_mib, **opts)
    assert max(r1 - r0 for r0, r1 in calls) == 3
    expected = info_nce_reference(a.double(), p.double(), None if neg is None else neg.double(), **opts)
    torch.testing.assert_close(loss.double(), expected, rtol=LOSS_TOL[torch.float32]["rtol"], atol=20 * 1e-6)


def test_default_budget_rows():
    """256 MiB by default; the CPU row cap applies below it."""
    assert chunked.scalar_rows_per_chunk(10**6, 2**16, 2**16, False, 4, "cuda", None) == 1024
    assert chunked.scalar_rows_per_chunk(10**6, 2**16, 2**16, True, 4, "cuda", None) == 512
    assert chunked.scalar_rows_per_chunk(100, 10, 10, False, 4, "cuda", None) == 100
    assert chunked.scalar_rows_per_chunk(10**6, 2**10, 2**10, False, 4, "cpu", None) == chunked.MAX_ROWS["cpu"]
    assert chunked.scalar_rows_per_chunk(10**6, 2**30, 2**30, False, 8, "cpu", 1.0) == 1


@pytest.mark.parametrize("option_set", ["unsup", "sym_hard_neg", "everything"])
@pytest.mark.parametrize("how", ["no_grad", "inference_mode", "no_input_requires_grad"])
def test_loss_only_without_grad(option_set, how, monkeypatch):
    """Without grad only the loss is computed: one similarity GEMM (symmetric: + the positives
    block for the column LSEs), no gradient GEMMs, no autograd graph."""
    n, d = 21, 32
    k, opts = split_option_set(option_set, n)
    monkeypatch.setenv(ENV_VAR, repr(budget_mib_for_rows(n, k, opts, 8.5)))
    a, p, neg = make_inputs(n, d, k, seed=34)
    m = logit_columns(n, k, opts)
    if how != "no_input_requires_grad":
        a, p = a.requires_grad_(True), p.requires_grad_(True)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(how, torch.enable_grad)
    with ctx():
        loss = None

        def run():
            nonlocal loss
            loss = fused_info_nce(a, p, neg, temperature=0.05, backend="torch", **opts)

        units = gemm_equivalents(run, n, m, d)
    assert loss.grad_fn is None and not loss.requires_grad
    sym_extra = n / m if opts.get("symmetric") else 0.0
    assert units == pytest.approx(1.0 + sym_extra, rel=1e-9)
    expected = info_nce_reference(a.detach().double(), p.detach().double(),
                                  None if neg is None else neg.double(), temperature=0.05, **opts)
    torch.testing.assert_close(loss.double(), expected, rtol=LOSS_TOL[torch.float32]["rtol"], atol=20 * 1e-6)


# (which inputs require grad, expected GEMM-equivalents for the hard_neg set with M = 2N):
# forward 1; ∂â = dS @ ĉ is 1; ∂ĉ over the columns that need it (P or K of them: 1/2 each)
PARTIAL = {
    "anchors": ({"anchors"}, 2.0),
    "positives": ({"positives"}, 1.5),
    "negatives": ({"negatives"}, 1.5),
    "tau": ({"tau"}, 2.0),
    "positives_negatives": ({"positives", "negatives"}, 2.0),
    "all": ({"anchors", "positives", "negatives", "tau"}, 3.0),
}


@pytest.mark.parametrize("case", list(PARTIAL))
def test_only_some_inputs_require_grad(case, monkeypatch):
    """Gradients of exactly the inputs that require grad, equal to the oracle's; the gradient
    GEMMs of the others are skipped."""
    monkeypatch.setitem(chunked.MAX_ROWS, "cpu", 6)
    wanted, expected_units = PARTIAL[case]
    n, d = 20, 36
    a, p, neg = make_inputs(n, d, n, seed=35)
    opts = dict(hard_negative_weight=0.6)

    def leaves(dtype):
        ts = {name: t.to(dtype).detach().clone().requires_grad_(name in wanted)
              for name, t in (("anchors", a), ("positives", p), ("negatives", neg))}
        ts["tau"] = torch.tensor(0.06, dtype=dtype, requires_grad="tau" in wanted)
        return ts

    ref = leaves(torch.float64)
    info_nce_reference(ref["anchors"], ref["positives"], ref["negatives"], temperature=ref["tau"],
                       **opts).backward()
    ours = leaves(torch.float32)

    def run():
        fused_info_nce(ours["anchors"], ours["positives"], ours["negatives"], temperature=ours["tau"],
                       backend="torch", **opts).backward()

    units = gemm_equivalents(run, n, 2 * n, d)
    assert units == pytest.approx(expected_units, rel=1e-9)
    for name in ("anchors", "positives", "negatives", "tau"):
        if name not in wanted:
            assert ours[name].grad is None, name
            continue
        exp = ref[name].grad
        scale = max(exp.abs().max().item(), 1.0 / n)
        torch.testing.assert_close(ours[name].grad.double(), exp, rtol=GRAD_TOL[torch.float32]["rtol"],
                                   atol=GRAD_TOL[torch.float32]["atol"] * scale, msg=lambda m, k=name: f"{k}: {m}")


@pytest.mark.parametrize("option_set", ["unsup", "hard_neg", "symmetric", "mixcse", "anchor_neg"])
def test_three_gemm_equivalents_forward_backward(option_set):
    """One forward+backward does at most 3 GEMM-equivalents (symmetric 4): no recomputation."""
    n, d = 24, 32
    k, opts = split_option_set(option_set, n)
    a, p, neg = make_inputs(n, d, k, seed=36)
    leaves = [t.requires_grad_(True) for t in (a, p, neg) if t is not None]
    m = logit_columns(n, k, opts)
    units = gemm_equivalents(
        lambda: fused_info_nce(a, p, neg, temperature=torch.tensor(0.05, requires_grad=True), backend="torch",
                               **opts).backward(), n, m, d)
    assert units <= (4.05 if opts.get("symmetric") else 3.05), units
    assert all(t.grad is not None for t in leaves)


@pytest.mark.parametrize("rows", [None, 4.5])
def test_symmetric_one_chunk_skips_the_column_pass(rows, monkeypatch):
    """Symmetric: when all N rows fit the budget, one chunk gives the column LSEs (3 GEMM-eq, even
    above the CPU row cap); otherwise a first pass over the positives block does (4)."""
    n, d = 24, 32
    monkeypatch.setitem(chunked.MAX_ROWS, "cpu", 4)
    if rows is not None:
        monkeypatch.setenv(ENV_VAR, repr(budget_mib_for_rows(n, 0, dict(symmetric=True), rows)))
    a, p, _ = make_inputs(n, d, seed=38)
    calls = count_chunks(monkeypatch)
    leaves = [t.requires_grad_(True) for t in (a, p)]
    units = gemm_equivalents(
        lambda: fused_info_nce(*leaves, temperature=0.05, symmetric=True, backend="torch").backward(), n, n, d)
    assert units == pytest.approx(3.0 if rows is None else 4.0, rel=1e-9)
    assert max(r1 - r0 for r0, r1 in calls) == (n if rows is None else 4)
    assert_backend_matches_reference("torch", a.detach(), p.detach(), None, tau=torch.tensor(0.05),
                                     symmetric=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("symmetric", [False, True])
def test_underflowing_target_probability(dtype, symmetric):
    """tau = 0.01 and an anchor opposite to its positive: the target's softmax probability is
    ~exp(-200) (0 in fp32), so the loss comes from the row max instead; still exact."""
    n, d = 6, 16
    a, p, _ = make_inputs(n, d, dtype=torch.float64, seed=37)
    p[0] = -a[0]
    p[1] = a[0]  # row 0's best column is a wrong one, with cosine 1
    a, p = a.to(dtype), p.to(dtype)
    loss = fused_info_nce(a, p, temperature=0.01, symmetric=symmetric, backend="torch")
    assert math.isfinite(loss.item()) and loss.item() > 20
    assert_backend_matches_reference("torch", a, p, None, tau=0.01, symmetric=symmetric)


def test_chunked_scalar_loss_rejects_none_reduction():
    from simcse_kernels.ops.features import normalized_features
    from simcse_kernels.options import InfoNCEOptions

    a, p, _ = make_inputs(4, 8)
    feats = normalized_features(a, p, None, InfoNCEOptions())
    with pytest.raises(ValueError, match="reduction"):
        chunked.chunked_scalar_loss(feats, torch.arange(4), InfoNCEOptions(reduction="none"))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_backend_float64_fallback_uses_the_torch_paths(reduction):
    """``cuda_info_nce`` reached through "auto" computes float64 with the torch backend (before any
    device check, so this runs on CPU): the row-chunked path for mean/sum, the per-row path for none."""
    from simcse_kernels.ops.cuda_loss import cuda_info_nce
    from simcse_kernels.options import InfoNCEOptions

    a, p, neg = make_inputs(9, 24, 9, dtype=torch.float64, seed=39)
    opts = InfoNCEOptions(temperature=0.05, hard_negative_weight=0.4, symmetric=True, reduction=reduction,
                          backend="auto")
    labels = torch.arange(9)
    got = cuda_info_nce(a, p, neg, labels, opts)
    expected = info_nce_reference(a, p, neg, temperature=0.05, hard_negative_weight=0.4, symmetric=True,
                                  reduction=reduction)
    torch.testing.assert_close(got, expected, **LOSS_TOL[torch.float64])


def kept_rows_budget_mib(n, k, opts, rows_per, kept):
    """A symmetric budget (MiB) whose room after R working rows holds ``kept`` fp32 logit rows."""
    return budget_mib_for_rows(n, k, opts, rows_per) + kept * logit_columns(n, k, opts) * 4 / 2**20


@pytest.mark.parametrize("option_set", ["symmetric", "sym_hard_neg", "sym_anchor_mix", "everything"])
@pytest.mark.parametrize(("room", "expected_kept"), [(11, 11), (20, 19)])
def test_symmetric_keeps_first_pass_rows(option_set, room, expected_kept, monkeypatch):
    """Symmetric, N = 23 in chunks of R = 4: the first pass keeps the full logit rows of the last
    chunks that fit the budget (room for 11 rows: rows 12-22, three chunks, the last partial; room
    for 20: rows 4-22), the second pass does not recompute them, and every chunk is filled once."""
    n, d = 23, 40
    k, opts = split_option_set(option_set, n)
    monkeypatch.setitem(chunked.MAX_ROWS, "cpu", 4)
    monkeypatch.setenv(ENV_VAR, repr(kept_rows_budget_mib(n, k, opts, 4, room + 0.5)))
    seen = []
    real_cache_rows = chunked.symmetric_cache_rows
    monkeypatch.setattr(chunked, "symmetric_cache_rows", lambda *a: seen.append(real_cache_rows(*a)) or seen[-1])
    calls = count_chunks(monkeypatch)
    a, p, neg = make_inputs(n, d, k, seed=40)
    assert_backend_matches_reference("torch", a, p, neg, tau=torch.tensor(0.05), **opts)
    assert seen and set(seen) == {expected_kept}
    chunks = [(r, min(r + 4, n)) for r in range(0, n, 4)]
    assert sorted(calls) == sorted(chunks * (len(calls) // len(chunks)))  # each chunk once per call


@pytest.mark.parametrize("kept", [0, 11, 23])
def test_symmetric_kept_rows_gemm_equivalents(kept, monkeypatch):
    """Plain symmetric (M = P = N): 4 - kept/N GEMM-equivalents forward+backward (0, 11 or all 23
    rows kept), the same loss and gradients as the oracle."""
    n, d = 23, 32
    monkeypatch.setitem(chunked.MAX_ROWS, "cpu", 4)
    monkeypatch.setenv(ENV_VAR, repr(kept_rows_budget_mib(n, 0, dict(symmetric=True), 4, kept + 0.5)))
    a, p, _ = make_inputs(n, d, seed=41)
    leaves = [t.requires_grad_(True) for t in (a, p)]
    units = gemm_equivalents(
        lambda: fused_info_nce(*leaves, temperature=0.05, symmetric=True, backend="torch").backward(), n, n, d)
    assert units == pytest.approx(4.0 - kept / n, rel=1e-9)
    assert_backend_matches_reference("torch", a.detach(), p.detach(), None, tau=torch.tensor(0.05),
                                     symmetric=True)


def test_symmetric_cache_rows_budget(monkeypatch):
    """Kept rows: whole trailing chunks within what the budget leaves after R·(M + P) working
    logits; with the default budget room for min(D/64, 16) x the feature bytes (12x at D = 768)."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    n = m = 16384
    feature_bytes = lambda d: 2 * n * d * 4  # noqa: E731
    # D = 768: 12 x 96 MiB = 1152 MiB >= 64 MiB working + 1 GiB of logits: every row is kept
    assert chunked.symmetric_cache_rows(n, m, n, 512, 4, 768, feature_bytes(768), None) == n
    # D = 256: 4 x 32 MiB < 256 MiB, so the 256 MiB default: (256 - 64) MiB / 64 KiB = 3072 rows
    assert chunked.symmetric_cache_rows(n, m, n, 512, 4, 256, feature_bytes(256), None) == 3072
    # D = 4096: at most 16 x the feature bytes (8 GiB here), capped at all N rows
    assert chunked.symmetric_cache_rows(n, m, n, 512, 4, 4096, feature_bytes(4096), None) == n
    # a budget the caller chose bounds the kept rows too, whatever D
    assert chunked.symmetric_cache_rows(n, m, n, 512, 4, 768, feature_bytes(768), 256.0) == 3072
    assert chunked.symmetric_cache_rows(n, m, n, 512, 4, 768, feature_bytes(768), 64.0) == 0
    # whole chunks: N = 16000 in chunks of 512 ends with a 128-row chunk; room for 1000 rows keeps
    # it and one more chunk (640 rows), not a third (1152)
    budget = (512 * 2 * 16000 + 1000 * 16000) * 4 / 2**20
    assert chunked.symmetric_cache_rows(16000, 16000, 16000, 512, 4, 768, 1, budget) == 640
    # one chunk (R >= N) has no first pass
    assert chunked.symmetric_cache_rows(100, 100, 100, 100, 4, 768, 10**9, None) == 0
