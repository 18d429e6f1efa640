"""GEMM work of one forward+backward, counted on CPU (issue 12): the FLOP bounds of every backend.

Unit: one similarity GEMM, 2·N·M·D FLOPs (M = every logit column). Triton: every ``tl.dot`` the
interpreter runs, with the block sizes of a CUDA device, plus the torch matmuls inside its custom
ops; torch/naive: ``FlopCounterMode`` (see :mod:`simcse_kernels.analysis.gemm_count`).
Bounds: fused (Triton) <= 4 (symmetric <= 5); ``torch`` with a scalar loss <= 3 (symmetric <= 4).
"""

from __future__ import annotations

import os

import pytest

from simcse_kernels.analysis import gemm_count as gc

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="counting the Triton dots needs TRITON_INTERPRET=1 (kernels in the CPU interpreter)")

DIMS = [128, 384, 768, 1024]
#: the issue's modes: unsup, sup with weight, MixCSE, symmetric, anchor negatives, learnable tau
MODES = ["unsup", "sup_weight", "mixcse", "symmetric", "anchor_neg", "learnable_tau"]
N = 64  # a multiple of every CUDA block of fp32 inputs (64 x 64 x 32): no padded tile is counted
SLACK = 0.05


def _bound(backend, mode):
    return gc.gemm_bound(backend, bool(gc.MODES[mode].get("symmetric"))) + SLACK


def expected_triton(mode, n=N):
    """The default Triton path's exact count: forward 1 (+ the column-LSE kernel over the positives
    block when symmetric), recompute of ∂L/∂s 1, and the gradient GEMMs: the row GEMM over every
    column but mix4's, the column GEMMs over P, K, the anchor negatives and (into ∂p̂) mix4."""
    opts = gc.MODES[mode]
    m = gc.logit_columns(n, mode)
    k = n if opts.get("k") == "n" else 0
    n_an = n if opts.get("anchor_negatives") else 0
    n_mix = n if opts.get("mix_lambda") is not None else 0
    row_cols = n + k + n_an + n_mix
    col_cols = n + k + n_an + n_mix
    return 2.0 + (n / m if opts.get("symmetric") else 0.0) + (row_cols + col_cols) / m


@needs_interpreter
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("mode", MODES)
def test_triton_default_backward_gemm_count(mode, d):
    r = gc.count_flops("triton", mode, N, d)
    assert r["dot_flops"] >= 2 * r["unit_flops"]  # forward + recomputation are Triton dots
    assert r["torch_flops"] > 0  # the gradient GEMMs are torch matmuls
    assert r["gemm_equiv"] == pytest.approx(expected_triton(mode), abs=1e-9)
    assert r["gemm_equiv"] <= _bound("triton", mode)


MIX_MODES = ["mixcse", "mixcse_sup", "everything"]


@needs_interpreter
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mode", MIX_MODES)
def test_triton_mixcse_gemm_count_16bit(mode, dtype):
    """MixCSE in bf16/fp16: one 16-bit dot per logit tile (the mixed tiles come from raw dots by
    linearity), so the count is exactly the fp32 formula. N = 128: a multiple of the 16-bit CUDA
    blocks (``block_config``: BLOCK_M 128, BLOCK_N 64, D a multiple of BLOCK_K). The interpreter's
    dot is wrapped twice here
    (conftest's bf16 patch on the class, the counter on the instance): every dot is counted once,
    and every dot has two 16-bit operands (no fp32 mixture operand; the count rules out split parts)."""
    import torch
    from triton.runtime import interpreter

    seen = []
    builder = interpreter.interpreter_builder
    cls_dot = type(builder).create_dot

    def spy(self, a, b, d, *args, **kwargs):
        seen.append((str(a.dtype), str(b.dtype)))
        return cls_dot(self, a, b, d, *args, **kwargs)

    n, d = 128, 128
    type(builder).create_dot = spy
    try:
        r = gc.count_flops("triton", mode, n, d, getattr(torch, dtype))
    finally:
        type(builder).create_dot = cls_dot
    assert r["gemm_equiv"] == pytest.approx(expected_triton(mode, n), abs=1e-9)
    assert r["gemm_equiv"] <= _bound("triton", mode)
    assert seen and r["dot_flops"] >= 2 * r["unit_flops"]
    assert all(a == b == ("bf16" if dtype == "bfloat16" else "fp16") for a, b in seen), set(seen)


@needs_interpreter
@pytest.mark.parametrize("backend", ["triton", "triton_atomic"])
@pytest.mark.parametrize("mode", ["margin_everything", "dot_margin"])
def test_triton_margin_and_dot_gemm_count(mode, backend):
    """Margins (CosFace + ArcFace) and dot similarity with every other option: the margins live in the
    tile epilogues (the target cosines are a rowwise O(N·D) dot, not a GEMM), so the count is the
    options' count without margins, within the fused bound (symmetric: 5), in both backward modes."""
    r = gc.count_flops(backend, mode, N, 128)
    if backend == "triton":
        assert r["gemm_equiv"] == pytest.approx(expected_triton(mode), abs=1e-9)
    assert r["gemm_equiv"] <= _bound("triton", mode)


@needs_interpreter
def test_triton_gemm_count_all_options_and_several_row_chunks():
    """N = 128 with a budget of exactly 64 rows per ∂L/∂s chunk (two chunks): chunking adds no work."""
    mode, n, d = "everything", 128, 128
    m = gc.logit_columns(n, mode)
    budget_mib = 64 * m * 4 / 2**20  # 64 fp32 rows of M columns
    r = gc.count_flops("triton", mode, n, d, chunk_budget_mib=budget_mib)
    assert r["gemm_equiv"] == pytest.approx(expected_triton(mode, n), abs=1e-9)
    assert r["gemm_equiv"] <= _bound("triton", mode)


@needs_interpreter
def test_count_context_restores_interpreter_and_env():
    from triton.runtime import interpreter

    from simcse_kernels.ops import triton_loss

    impls = (triton_loss._forward_impl, triton_loss._backward_impl)
    env = (os.environ.get("SIMCSE_TRITON_BLOCKS"), os.environ.get("SIMCSE_TRITON_BWD"))
    gc.count_flops("triton_atomic", "unsup", N, 128)
    assert "create_dot" not in vars(interpreter.interpreter_builder)
    assert (triton_loss._forward_impl, triton_loss._backward_impl) == impls
    assert (os.environ.get("SIMCSE_TRITON_BLOCKS"), os.environ.get("SIMCSE_TRITON_BWD")) == env
    assert triton_loss.block_config("fwd", 128, __import__("torch").float32)["BLOCK_M"] == \
        triton_loss.INTERPRET_BLOCKS["BLOCK_M"]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("mode", MODES)
def test_torch_backend_gemm_count(mode, d, reduction):
    r = gc.count_flops("torch", mode, N, d, reduction=reduction)
    assert r["torch_flops"] >= r["unit_flops"]  # at least the forward GEMM was seen
    assert r["gemm_equiv"] <= _bound("torch", mode)


@pytest.mark.parametrize("mode", MODES)
def test_meta_count_equals_the_count_on_data(mode):
    """Counting on the meta device (any N, no data) sees the same matmuls as a real CPU call."""
    real = gc.count_gemm_equivalents("torch", mode, 40, 96, chunk_budget_mib=0.02)
    assert gc.count_gemm_equivalents("torch", mode, 40, 96, chunk_budget_mib=0.02, meta_plan_of="cpu") == \
        pytest.approx(real, rel=1e-12)


def test_torch_symmetric_counts_at_benchmark_sizes():
    """The CPU plan at N = 16384 with the default budget: D = 768 keeps every first-pass row (3),
    D = 256 keeps 3072 of 16384 (4 - 3072/16384); the meta plan leaves MAX_ROWS as it was."""
    from simcse_kernels.ops import chunked

    before = dict(chunked.MAX_ROWS)
    assert gc.count_gemm_equivalents("torch", "symmetric", 16384, 768, meta_plan_of="cpu") == pytest.approx(3.0)
    assert gc.count_gemm_equivalents("torch", "symmetric", 16384, 256, meta_plan_of="cpu") == \
        pytest.approx(4.0 - 3072 / 16384)
    # N = 600 in CPU chunks of 512 with room for 100 kept rows: the last chunk's 88 rows are kept
    budget = (512 * 1200 + 100 * 600) * 4 / 2**20
    real = gc.count_gemm_equivalents("torch", "symmetric", 600, 16, chunk_budget_mib=budget)
    assert real == pytest.approx(4.0 - 88 / 600)
    assert gc.count_gemm_equivalents("torch", "symmetric", 600, 16, chunk_budget_mib=budget,
                                     meta_plan_of="cpu") == pytest.approx(real, rel=1e-12)
    assert chunked.MAX_ROWS == before
    with pytest.raises(ValueError, match="meta_plan_of"):
        gc.count_flops("triton", "unsup", 64, 64, meta_plan_of="cpu")


@pytest.mark.parametrize("mode", MODES)
def test_naive_gemm_count(mode):
    """The baseline: one logit GEMM forward, autograd's two backward (none into detached mixtures)."""
    r = gc.count_flops("naive", mode, N, 256)
    opts = gc.MODES[mode]
    m = gc.logit_columns(N, mode)
    n_mix = N if opts.get("mix_lambda") is not None else 0
    assert r["gemm_equiv"] == pytest.approx(3.0 - 2 * n_mix / m, abs=1e-9)


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        gc.count_flops("cuda", "unsup", N, 128)
    with pytest.raises(ValueError, match="mode"):
        gc.count_flops("torch", "nope", N, 128)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", list(gc.MARGIN_MODES))
def test_torch_margins_add_no_gemm(mode, reduction):
    """Margin softmax (issue 21) on the torch backend: exactly the count of the same mode without the
    margins (the target entry's f'(c) correction is rank-1 per row, not a GEMM), so at most 3
    GEMM-equivalents (symmetric as without margins: 3 in one chunk, <= 4 in several)."""
    n, d = N, 128
    margined = gc.count_gemm_equivalents("torch", mode, n, d, reduction=reduction)
    plain_opts = {k: v for k, v in gc.MODES[mode].items() if k not in ("margin", "angular_margin", "similarity")}
    gc.MODES["_plain"] = plain_opts
    try:
        plain = gc.count_gemm_equivalents("torch", "_plain", n, d, reduction=reduction)
    finally:
        del gc.MODES["_plain"]
    assert margined == pytest.approx(plain, rel=1e-12)
    assert margined <= _bound("torch", mode)
    if not gc.MODES[mode].get("symmetric"):
        assert margined <= 3.0 + 1e-9
    # several row chunks (tiny budget): still no GEMM beyond the plain path's
    chunked_count = gc.count_gemm_equivalents("torch", mode, 40, 96, chunk_budget_mib=0.02)
    assert chunked_count <= _bound("torch", mode)


ST_COLUMN_MODES = {"gte", "gte_hardness", "doc_to_query_joint", "symmetric_hardness"}


@pytest.mark.parametrize("mode", list(gc.ST_MODES))
def test_torch_st_directions_gemm_count(mode):
    """sentence-transformers' directions / hardness (issue 22) on the torch backend, counted per similarity
    block (query-doc, query-query, doc-doc; the doc_to_query terms are a column of the query-doc block):
    3 GEMM-equivalents when the rows fit one chunk (hardness is an in-place rescale, no GEMM). In several
    row chunks a loss with doc_to_query terms needs a first pass for the column log-sum-exps: the
    symmetric (per_direction) one over the positives block (< 4), a joint one over every block (4)."""
    one = gc.count_gemm_equivalents("torch", mode, N, 128)
    assert one == pytest.approx(3.0, abs=1e-9)
    several = gc.count_gemm_equivalents("torch", mode, 40, 96, chunk_budget_mib=0.003)
    if mode in ST_COLUMN_MODES:
        assert 3.0 < several <= 4.0 + 1e-9
    else:
        assert several == pytest.approx(3.0, abs=1e-9)
    assert gc.count_gemm_equivalents("torch", mode, 40, 96, chunk_budget_mib=0.003, meta_plan_of="cpu") == \
        pytest.approx(several, rel=1e-12)


@pytest.mark.parametrize("mode", list(gc.ST_MODES))
def test_naive_st_directions_gemm_count(mode):
    """The naive baseline on the same modes: one GEMM per similarity block forward, two backward."""
    assert gc.count_gemm_equivalents("naive", mode, N, 128) == pytest.approx(3.0, abs=1e-9)
