"""Class-weight heads at scale on the ``"torch"`` backend (issue 21, :mod:`simcse_kernels.ops.chunked_class_head`):
C >> N classes, loss and every gradient (class weights, embeddings, learnable temperature) against
the float64 oracle under budgets that force each plan, the GEMM work of each plan, and the peak
extra memory at N = 512, C = 2^20 within the budget plus the plan's O(N + C) vectors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_backend_matches_reference

import simcse_kernels.functional as functional
import simcse_kernels.ops.chunked_class_head as ch
from simcse_kernels import fused_info_nce, info_nce_reference
from simcse_kernels.analysis.gemm_count import flop_counter_mode
from simcse_kernels.ops.budget import ENV_VAR
from simcse_kernels.options import InfoNCEOptions

PROBE = Path(__file__).with_name("class_head_memory_probe.py")
N, D, C = 9, 100, 301  # N not a multiple of any tile, C odd and > 4N
#: (margin, angular_margin, similarity)
MARGINS = {
    "plain": (0.0, 0.0, "cosine"),
    "cosface": (0.35, 0.0, "cosine"),
    "arcface": (0.0, 0.5, "cosine"),
    "both": (0.2, 0.3, "cosine"),
    "dot_margin": (0.3, 0.0, "dot"),
}


@pytest.fixture
def plan_spy(monkeypatch):
    """Records the plan of every class-head call made through ``fused_info_nce``."""
    plans = []
    real = ch.class_head_plan

    def spy(*args):
        plans.append(real(*args))
        return plans[-1]

    monkeypatch.setattr(ch, "class_head_plan", spy)
    return plans


def _budget_mib(logits: int, dtype: torch.dtype) -> float:
    return (logits * torch.finfo(dtype).bits // 8 + 0.5) / 2**20  # + half a byte: int() of the MiB is exact


#: name -> (budget in logits, ROWS_MIN for the run, expected plan (mode, rows, cols))
PLANS = {
    "rows_4_per_chunk": (4 * C, 2, ("rows", 4, C)),  # 3 row chunks of full rows, the last of 1 row
    "columns_all_rows": (9 * 37, None, ("columns", 9, 37)),  # 9 x 37 tiles: 8 full + one of 5 columns
    "columns_square": (26, None, ("columns", 5, 5)),  # fewer columns than rows fit: 5 x 5 tiles
}


def _inputs(dtype, similarity, seed=70, layout="rows"):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 300, 5, 5, 17, 150, 299, 36, 37])
    a = a + 1.5 * w[labels]  # rows near their class: the softmax is neither flat nor one-hot
    if similarity == "dot":
        a, w = a / D ** 0.5, w / D ** 0.5
    a, w = a.to(dtype), w.to(dtype)
    if layout == "transposed":  # pytorch-metric-learning's W is (D, C): the candidates are its transpose
        w = w.t().contiguous().t()
    return a, w, labels


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("margins", list(MARGINS))
@pytest.mark.parametrize("plan", list(PLANS))
def test_class_head_matches_reference(plan, margins, dtype, plan_spy, monkeypatch):
    """Loss and the gradients to embeddings, class weights and a learnable tau equal the float64 oracle.

    fp32 runs reduction="sum", fp64 "mean"; CosFace and the combined margins run on PML's layout
    (the class matrix a transposed (D, C) tensor), the others on a row-major (C, D) one."""
    reduction = "sum" if dtype == torch.float32 else "mean"
    layout = "transposed" if margins in ("cosface", "both") else "rows"
    logits, rows_min, expected = PLANS[plan]
    monkeypatch.setenv(ENV_VAR, repr(_budget_mib(logits, dtype)))
    if rows_min is not None:
        monkeypatch.setattr(ch, "ROWS_MIN", rows_min)
    margin, angular, similarity = MARGINS[margins]
    a, w, labels = _inputs(dtype, similarity, layout=layout)
    assert_backend_matches_reference("torch", a, w, None, tau=torch.tensor(0.1, dtype=dtype), labels=labels,
                                     reduction=reduction, margin=margin, angular_margin=angular,
                                     similarity=similarity)
    assert plan_spy and all(tuple(p) == expected for p in plan_spy), plan_spy


#: gradcheck's shapes (N = 3, C = 14, D = 5) -> (budget in logits, ROWS_MIN, plan)
GRADCHECK_PLANS = {"rows": (2 * 14, 2, ("rows", 2, 14)), "columns": (12, None, ("columns", 3, 4)),
                   "columns_square": (4, None, ("columns", 2, 2))}


@pytest.mark.parametrize("plan", list(GRADCHECK_PLANS))
def test_class_head_gradcheck(plan, plan_spy, monkeypatch):
    """float64 gradcheck (anchors, class weights, tau) with ArcFace + CosFace margins, each plan."""
    logits, rows_min, expected = GRADCHECK_PLANS[plan]
    monkeypatch.setenv(ENV_VAR, repr(_budget_mib(logits, torch.float64)))
    if rows_min is not None:
        monkeypatch.setattr(ch, "ROWS_MIN", rows_min)
    g = torch.Generator().manual_seed(71)
    w = torch.randn(14, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([13, 2, 2])
    a = torch.randn(3, 5, generator=g, dtype=torch.float64) + w[labels]
    leaves = [a.requires_grad_(True), w.requires_grad_(True), torch.tensor(0.3, dtype=torch.float64,
                                                                          requires_grad=True)]

    def fn(a, w, tau):
        return fused_info_nce(a, w, labels=labels, temperature=tau, margin=0.2, angular_margin=0.3, backend="torch")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)
    assert plan_spy and all(tuple(p) == expected for p in plan_spy), plan_spy


def test_plan_choice():
    """Rows while min(N, ROWS_MIN) full rows fit; else tiles within the budget (N = 512, C = 2^20, 8 MiB)."""
    mib = 1 << 20
    assert ch.class_head_plan(512, 65536, 4, 64 * mib) == ("rows", 256, 65536)
    assert ch.class_head_plan(512, 65536, 4, 1024 * mib) == ("rows", 512, 65536)
    big = ch.class_head_plan(512, 1 << 20, 4, 8 * mib)
    assert big == ("columns", 512, 4096) and big.tile_bytes(4) == 8 * mib
    assert ch.class_head_plan(512, 1 << 20, 4, 256 * mib) == ("rows", 64, 1 << 20)
    assert ch.class_head_plan(512, 1 << 20, 4, 255 * mib).mode == "columns"
    tiny = ch.class_head_plan(512, 1 << 20, 4, 100)  # 25 logits: 5 x 5 tiles
    assert tiny == ("columns", 5, 5)
    assert ch.class_head_plan(3, 100, 4, 1) == ("columns", 1, 1)  # less than one logit: 1 x 1
    for n, c, budget in [(7, 1000, 3000), (512, 1 << 20, 8 * mib), (100, 50000, 10**6), (600, 4000, 10**5)]:
        plan = ch.class_head_plan(n, c, 4, budget)
        assert plan.tile_bytes(4) <= budget and 1 <= plan.rows <= min(n, ch.MAX_ROWS) and 1 <= plan.cols <= c


@pytest.mark.parametrize(("plan", "expected"), [(("rows", 16, 4096), 3.0), (("rows", 64, 4096), 3.0),
                                                (("columns", 64, 1000), 4.0), (("columns", 40, 512), 4.0)])
def test_class_head_gemm_count(plan, expected):
    """One forward+backward: 3 GEMM-equivalents (2·N·C·D FLOPs each) with full rows, 4 with two-pass tiles."""
    n, c, d = 64, 4096, 32
    g = torch.Generator().manual_seed(72)
    a = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(c, d, generator=g, requires_grad=True)
    tau = torch.tensor(0.05, requires_grad=True)
    labels = torch.randint(0, c, (n,), generator=g)
    opts = InfoNCEOptions(temperature=tau, margin=0.2, angular_margin=0.3, backend="torch")
    with flop_counter_mode() as counter:
        ch.class_head_loss(a, w, labels, opts, ch.ClassHeadPlan(*plan)).backward()
    assert counter.get_total_flops() / (2.0 * n * c * d) == pytest.approx(expected, rel=1e-12)
    assert a.grad is not None and w.grad is not None and tau.grad is not None


def _uses_class_head(monkeypatch, *args, **kwargs):
    calls = []
    real = functional.class_head_loss
    monkeypatch.setattr(functional, "class_head_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss = fused_info_nce(*args, backend="torch", **kwargs)
    return bool(calls), loss


@pytest.mark.parametrize(("n_pos", "kwargs", "dtype", "taken"), [
    (36, dict(margin=0.3), torch.float32, True),  # P = 4N
    (35, dict(margin=0.3), torch.float32, False),  # P < 4N: the general path
    (301, dict(symmetric=True), torch.float32, False),
    (301, dict(anchor_negatives=True), torch.float32, False),
    (301, dict(reduction="none"), torch.float32, False),
    (301, dict(reduction="sum", similarity="dot"), torch.float64, True),
    (301, dict(), torch.bfloat16, False),  # 16-bit class weights: the general path (fp32 copies)
])
def test_dispatch_rule(n_pos, kwargs, dtype, taken, monkeypatch):
    a, w, _ = _inputs(torch.float64, "cosine")
    w = w[:n_pos]
    labels = torch.arange(N) % n_pos
    used, loss = _uses_class_head(monkeypatch, a.to(dtype), w.to(dtype), labels=labels, **kwargs)
    assert used == taken
    expected = info_nce_reference(a.to(dtype).double(), w.to(dtype).double(), labels=labels, **kwargs)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=2e-5)  # fp32 round-off of a loss ~ 1/tau


def test_hard_negatives_use_general_path(monkeypatch):
    a, w, labels = _inputs(torch.float64, "cosine")
    used, _ = _uses_class_head(monkeypatch, a, w, a + 0.1, labels=labels)
    assert not used


def test_retained_graph_second_backward_and_gradient_handed_over(monkeypatch):
    """PML's layout (W (D, C), candidates W.t()): W.grad is the class head's own buffer, contiguous (no copy);
    a second backward through a retained graph forms the same gradients again."""
    seen = []
    real = ch.ClassHeadFunction.backward

    def spy(ctx, grad):
        out = real(ctx, grad)
        seen.append(out[1].data_ptr())
        return out

    monkeypatch.setattr(ch.ClassHeadFunction, "backward", staticmethod(spy))
    a, w, labels = _inputs(torch.float64, "cosine")
    weight = w.t().contiguous().requires_grad_(True)  # (D, C)
    x = a.clone().requires_grad_(True)
    loss = fused_info_nce(x, weight.t(), labels=labels, margin=0.35, temperature=1 / 16, backend="torch")
    loss.backward(retain_graph=True)
    assert weight.grad.is_contiguous() and weight.grad.data_ptr() == seen[0]
    first = (x.grad.clone(), weight.grad.clone())
    x.grad = weight.grad = None
    (2 * loss).backward()
    torch.testing.assert_close(x.grad, 2 * first[0], rtol=1e-14, atol=0)
    torch.testing.assert_close(weight.grad, 2 * first[1], rtol=1e-14, atol=0)
    x2, w2 = a.clone().requires_grad_(True), w.clone().requires_grad_(True)
    info_nce_reference(x2, w2, labels=labels, margin=0.35, temperature=1 / 16).backward()
    torch.testing.assert_close(first[0], x2.grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(first[1], w2.grad.t(), rtol=1e-10, atol=1e-13)


def test_frozen_weights_no_grad_and_zero_class_vector(monkeypatch):
    """Frozen class weights get no gradient; under no_grad only the loss is computed; a zero class
    vector (norm clamped to eps: ŵ = 0, ∂W = ∂ŵ / eps) gets the oracle's gradient."""
    monkeypatch.setenv(ENV_VAR, repr(_budget_mib(26, torch.float64)))  # 5 x 5 tiles
    a, w, labels = _inputs(torch.float64, "cosine")
    w[7] = 0.0  # no row targets class 7
    x = a.clone().requires_grad_(True)
    loss = fused_info_nce(x, w, labels=labels, margin=0.2, temperature=0.1, backend="torch")
    loss.backward()
    x_ref = a.clone().requires_grad_(True)
    info_nce_reference(x_ref, w, labels=labels, margin=0.2, temperature=0.1).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-13)
    with torch.no_grad():
        torch.testing.assert_close(fused_info_nce(a, w, labels=labels, margin=0.2, temperature=0.1, backend="torch"),
                                   loss.detach(), rtol=1e-14, atol=0)
    w1, w2 = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    fused_info_nce(a, w1, labels=labels, margin=0.2, temperature=0.1, backend="torch").backward()
    info_nce_reference(a, w2, labels=labels, margin=0.2, temperature=0.1).backward()
    assert w2.grad[7].abs().max() > 1e6  # ∂ŵ / eps (eps = 1e-12): the clamped branch is exercised
    torch.testing.assert_close(w1.grad[7], w2.grad[7], rtol=1e-9, atol=0)
    others = torch.ones(C, dtype=torch.bool)
    others[7] = False
    torch.testing.assert_close(w1.grad[others], w2.grad[others], rtol=1e-9, atol=1e-13)
    assert F.cosine_similarity(w1.grad[7:8], w2.grad[7:8]).item() == pytest.approx(1.0, abs=1e-12)


#: (C,) vectors alive at once, in bytes per class: the huge-row check before the loss (the per-row
#: min and max, their maximum and its float64 scale temporaries, ~45 B) is the largest; the pass
#: itself holds the inverse norms (4 B), the clamp mask (1 B) and the norms while forming them (4 B)
BYTES_PER_CLASS = 48
#: (N, D) fp32 matrices at once: unit anchors, anchors / tau, the target rows W[labels], their unit
#: copy, the anchor gradient and the normalization backward's temporaries
ROW_MATRICES = 16
#: allocator, BLAS and interpreter slack
SLACK_BYTES = 4 << 20


@pytest.mark.slow
def test_class_head_memory_at_a_million_classes():
    """N = 512, C = 2^20, D = 32, an 8 MiB budget (one row of logits is 4 MiB): extra peak memory beyond
    the inputs and the two gradients is at most the plan's tile + O(N + C), far below one (C, D)
    copy (128 MiB) or the N x C logits (2 GiB)."""
    n, c, d, budget_mib = 512, 1 << 20, 32, 8.0
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, str(PROBE), "--n", str(n), "--classes", str(c), "--dim", str(d),
                          "--budget-mib", str(budget_mib), "--angular-margin", "0.3"],
                         check=True, capture_output=True, text=True, timeout=600, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    plan = ch.ClassHeadPlan(**result["plan"])
    assert plan.mode == "columns" and plan.tile_bytes(4) <= budget_mib * 2**20
    bound = plan.tile_bytes(4) + BYTES_PER_CLASS * c + ROW_MATRICES * n * d * 4 + SLACK_BYTES
    assert bound < c * d * 4 / 2  # the bound excludes even half a (C, D) copy
    assert result["extra_peak_bytes"] <= bound, result
