"""Backend "triton" against the float64 oracle: loss and every gradient, every option.

On CPU the kernels run in the Triton interpreter (``TRITON_INTERPRET=1`` must be set before triton
is imported, as the CI does); the ``cuda``-marked tests need a GPU and compiled kernels.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    LOSS_TOL,
    MARGIN_OPTION_SETS,
    OPTION_SETS,
    TRITON_DEVICE,
    assert_backend_matches_reference,
    interpret_triton,
    interpreter_bf16_dot_patchable,
    loss_and_grads,
    make_inputs,
    make_margin_inputs,
    needs_triton_runtime,
    split_option_set,
)

from simcse_kernels import fused_info_nce, info_nce_reference
from simcse_kernels.options import InfoNCEOptions

INTERPRET = interpret_triton()
pytestmark = needs_triton_runtime
triton_loss = pytest.importorskip("simcse_kernels.ops.triton_loss", reason="triton is not installed")

DEVICE = TRITON_DEVICE
# conftest patches the interpreter's bf16 tl.dot (it multiplied the uint16 bits) to fp32 products/accumulation
skip_bf16_interpreted = pytest.mark.skipif(
    DEVICE == "cpu" and not interpreter_bf16_dot_patchable(),
    reason="the Triton interpreter computes tl.dot wrongly for bf16 (numpy has no bf16) and conftest cannot "
    "patch it in this triton version")
needs_compiled_cuda = pytest.mark.skipif(
    INTERPRET, reason="large shapes need compiled kernels, not the interpreter")




def _tau(value, dtype):
    """A learnable temperature in the compute dtype (fp64 runs need an fp64 tau to meet fp64 tolerances)."""
    return torch.tensor(value, dtype=torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.fixture
def small_blocks(monkeypatch):
    """Interpreter blocks of 16: every masked/diagonal entry lands on some tile edge."""
    monkeypatch.setattr(triton_loss, "INTERPRET_BLOCKS",
                        dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, BLOCK_DO=32))


# ---------------------------------------------------------------------------------------------
# parity on CPU (interpreter) or GPU

@pytest.mark.parametrize("option_set", list(OPTION_SETS))
@pytest.mark.parametrize("n,d", [(1, 100), (7, 100), (129, 100)])
def test_parity_every_option_learnable_tau(option_set, n, d):
    k, opts = split_option_set(option_set, n)
    a, p, neg = make_inputs(n, d, k, dtype=torch.float32, seed=n + d, device=DEVICE)
    assert_backend_matches_reference("triton", a, p, neg, tau=_tau(0.05, a.dtype), **opts)


@pytest.mark.parametrize("option_set", ["unsup", "hard_neg", "symmetric", "everything"])
def test_parity_d384_several_k_and_output_blocks(option_set):
    """N = 129 (not a block multiple), D = 384: several K steps, row and column tiles in the backward."""
    k, opts = split_option_set(option_set, 129)
    a, p, neg = make_inputs(129, 384, k, seed=11, device=DEVICE)
    assert_backend_matches_reference("triton", a, p, neg, tau=_tau(0.05, a.dtype), **opts)


@pytest.mark.parametrize("dtype", [
    torch.float64, torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=skip_bf16_interpreted)])
@pytest.mark.parametrize("option_set", ["unsup", "hard_neg", "everything"])
def test_parity_dtypes(dtype, option_set):
    k, opts = split_option_set(option_set, 33)
    a, p, neg = make_inputs(33, 100, k, dtype=dtype, seed=3, device=DEVICE)
    assert_backend_matches_reference("triton", a, p, neg, tau=_tau(0.07, dtype), **opts)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_parity_float_temperature(dtype):
    """A Python-float temperature (no tau gradient)."""
    a, p, neg = make_inputs(20, 64, 20, dtype=dtype, seed=8, device=DEVICE)
    assert_backend_matches_reference("triton", a, p, neg, tau=0.1, hard_negative_weight=0.5, symmetric=True)


@pytest.mark.parametrize("option_set", ["hard_neg", "symmetric", "anchor_neg", "mixcse", "everything"])
def test_parity_small_blocks_cross_tile_edges(option_set, small_blocks):
    """Blocks of 16 (K, output-D chunks of 32): N = 23, D = 100 crosses every kind of tile edge."""
    k, opts = split_option_set(option_set, 23)
    a, p, neg = make_inputs(23, 100, k, seed=9, device=DEVICE)
    assert_backend_matches_reference("triton", a, p, neg, tau=_tau(0.1, a.dtype), **opts)


@pytest.mark.parametrize("k", [0, 5, 40])
def test_more_candidates_than_anchors_and_custom_labels(k):
    """M > N: P = 20 > N = 12, K in {0, 5, 40}; permuted labels, one target among the negatives."""
    a, p, neg = make_inputs(12, 100, k, n_pos=20, seed=4, device=DEVICE)
    labels = torch.randperm(20, generator=torch.Generator().manual_seed(1))[:12]
    if k:
        labels[3] = 20 + min(3, k - 1)  # its own hard negative column when K > 3
        labels[7] = 20 + k - 1
    opts = dict(hard_negative_weight=0.2) if k >= 12 else {}  # the weight pairs anchor i with negative i: K >= N
    assert_backend_matches_reference("triton", a, p, neg, tau=_tau(0.05, a.dtype), labels=labels.to(DEVICE),
                                     **opts)


def test_fewer_positives_than_candidates_anchor_negatives_and_labels():
    """P < N with explicit labels and anchor negatives: row i's self column is still i."""
    a, p, neg = make_inputs(10, 48, 10, n_pos=4, seed=12, device=DEVICE)  # K >= N: the weight pairs i with i
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 4, 6])
    assert_backend_matches_reference("triton", a, p, neg, tau=_tau(0.05, a.dtype), labels=labels.to(DEVICE),
                                     anchor_negatives=True, hard_negative_weight=0.3)


def test_symmetric_with_labels_repeated_targets():
    a, p, _ = make_inputs(10, 64, n_pos=15, seed=5, device=DEVICE)
    labels = torch.tensor([3, 1, 4, 14, 5, 9, 2, 6, 5, 3])
    assert_backend_matches_reference("triton", a, p, None, tau=_tau(0.05, a.dtype), labels=labels.to(DEVICE),
                                     symmetric=True)


def test_zero_vectors_give_finite_loss_and_grads():
    a, p, neg = make_inputs(8, 32, 8, seed=6, device=DEVICE)
    a[2] = 0
    p[5] = 0
    neg[1] = 0
    assert_backend_matches_reference("triton", a, p, neg, tau=_tau(0.05, a.dtype), hard_negative_weight=0.3,
                                     mix_lambda=0.2, anchor_negatives=True, symmetric=True)


def test_empty_negatives_tensor_is_no_negatives():
    a, p, _ = make_inputs(9, 40, seed=7, device=DEVICE)
    empty = a.new_zeros((0, 40))
    got = fused_info_nce(a, p, empty, backend="triton")
    want = info_nce_reference(a.double(), p.double())
    torch.testing.assert_close(got.double(), want, **LOSS_TOL[torch.float32])


def test_loss_dtype_and_grad_dtypes_and_no_grad_for_mixtures():
    a, p, neg = make_inputs(6, 32, 6, dtype=torch.float16, seed=2, device=DEVICE)
    a.requires_grad_(True)
    p.requires_grad_(True)
    loss = fused_info_nce(a, p, neg, mix_lambda=0.3, backend="triton")
    assert loss.dtype == torch.float32 and loss.shape == ()
    loss.backward()
    assert a.grad.dtype == torch.float16 and p.grad.dtype == torch.float16
    assert torch.isfinite(a.grad).all() and torch.isfinite(p.grad).all()


def test_gradients_are_deterministic():
    a, p, neg = make_inputs(40, 64, 40, seed=13, device=DEVICE)
    runs = [loss_and_grads(fused_info_nce, a, p, neg, _tau(0.05, a.dtype), backend="triton",
                           hard_negative_weight=0.3, anchor_negatives=True)[1] for _ in range(2)]
    for g0, g1 in zip(*runs):
        assert torch.equal(g0, g1)


@pytest.mark.parametrize("which", [0, 1, 2, 3])
@pytest.mark.parametrize("bwd_mode,seed", [("default", 15), ("atomic", 16)])
def test_only_some_inputs_require_grad(which, bwd_mode, seed, monkeypatch):
    """Gradients not asked for are skipped (no kernel); the asked-for one equals the default full backward's
    (bit for bit for the default backward; to round-off for the atomic one, whose sums are reordered)."""
    a, p, neg = make_inputs(20, 48, 20, seed=seed, device=DEVICE)
    tau = _tau(0.05, a.dtype).to(DEVICE)
    opts = dict(hard_negative_weight=0.3, anchor_negatives=True, symmetric=True, mix_lambda=0.4,
                backend="triton")

    def grads(mask):
        leaves = [t.clone().requires_grad_(m) for t, m in zip((a, p, neg, tau), mask)]
        fused_info_nce(*leaves[:3], temperature=leaves[3], **opts).backward()
        return [leaf.grad for leaf in leaves]

    full = grads([True] * 4)
    if bwd_mode == "atomic":
        monkeypatch.setenv("SIMCSE_TRITON_BWD", "atomic")
    part = grads([i == which for i in range(4)])
    for i, g in enumerate(part):
        if i != which:
            assert g is None
        elif bwd_mode == "default":
            assert torch.equal(g, full[i])
        else:
            torch.testing.assert_close(g, full[i], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("option_set,n,d", [
    ("everything", 7, 100), ("everything", 129, 100), ("hard_neg", 129, 100), ("sym_anchor_mix", 40, 100),
    ("none", 33, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parity_atomic_backward(option_set, n, d, dtype, monkeypatch):
    """The alternative one-kernel-per-tile backward with atomics (``SIMCSE_TRITON_BWD=atomic``)."""
    monkeypatch.setenv("SIMCSE_TRITON_BWD", "atomic")
    k, opts = split_option_set(option_set, n)
    a, p, neg = make_inputs(n, d, k, dtype=dtype, seed=n + 5, device=DEVICE)
    assert_backend_matches_reference("triton", a, p, neg, tau=_tau(0.05, dtype), **opts)


# ---------------------------------------------------------------------------------------------
# margins (CosFace / ArcFace) and dot similarity (issue 21)

@pytest.mark.parametrize("option_set", list(MARGIN_OPTION_SETS))
@pytest.mark.parametrize("bwd_mode", ["default", "atomic"])
def test_margin_parity_learnable_tau(option_set, bwd_mode, monkeypatch):
    """Every margin / dot option set, both backward modes, N = 37 (not a block multiple), D = 100."""
    if bwd_mode == "atomic":
        monkeypatch.setenv("SIMCSE_TRITON_BWD", "atomic")
    a, p, neg, opts = make_margin_inputs(option_set, 37, 100, seed=21, device=DEVICE)
    assert_backend_matches_reference("triton", a, p, neg, tau=_tau(0.05, a.dtype), **opts)


@pytest.mark.parametrize("dtype", [
    torch.float64, torch.float16, pytest.param(torch.bfloat16, marks=skip_bf16_interpreted)])
@pytest.mark.parametrize("option_set", ["arc_plus_margin_hard_neg", "margin_everything", "dot_margin_symmetric"])
def test_margin_parity_dtypes(dtype, option_set):
    a, p, neg, opts = make_margin_inputs(option_set, 33, 100, dtype=dtype, seed=22, device=DEVICE)
    assert_backend_matches_reference("triton", a, p, neg, tau=_tau(0.07, dtype), **opts)


@pytest.mark.parametrize("option_set", ["arc_symmetric_anchor_neg", "margin_mixcse", "dot_margin_hard_neg"])
def test_margin_parity_small_blocks_cross_tile_edges(option_set, small_blocks):
    a, p, neg, opts = make_margin_inputs(option_set, 41, 100, seed=23, device=DEVICE)
    assert_backend_matches_reference("triton", a, p, neg, tau=_tau(0.05, a.dtype), **opts)


@pytest.mark.parametrize("similarity,margins", [("cosine", dict(margin=0.3, angular_margin=0.4)),
                                                ("dot", dict(margin=0.3))])
def test_margin_more_candidates_than_anchors_custom_labels_symmetric(similarity, margins):
    """M > N (P = 20 > N = 12, K = 13 >= N as the hard-negative weight needs), permuted and repeated
    labels, one target among the negatives."""
    a, p, neg = make_inputs(12, 100, 13, n_pos=20, seed=24, device=DEVICE)
    if similarity == "dot":
        a, p, neg = (t * 0.1 for t in (a, p, neg))
    labels = torch.randperm(20, generator=torch.Generator().manual_seed(2))[:12]
    labels[3] = 20 + 3  # its own hard negative
    assert_backend_matches_reference("triton", a, p, neg, tau=_tau(0.05, a.dtype), labels=labels.to(DEVICE),
                                     hard_negative_weight=0.3, similarity=similarity, **margins)
    sym_labels = torch.tensor([3, 1, 4, 14, 5, 9, 2, 6, 5, 3, 3, 19]).to(DEVICE)
    assert_backend_matches_reference("triton", a, p, None, tau=_tau(0.05, a.dtype), labels=sym_labels,
                                     symmetric=True, similarity=similarity, **margins)


@pytest.mark.parametrize("bwd_mode", ["default", "atomic"])
def test_arcface_target_cosines_near_one_have_finite_exact_gradients(bwd_mode, monkeypatch):
    """Dropout views of one sentence (cos ≈ 0.99..1): ArcFace's f'(c) is large but finite (clamped)."""
    if bwd_mode == "atomic":
        monkeypatch.setenv("SIMCSE_TRITON_BWD", "atomic")
    g = torch.Generator().manual_seed(25)
    a = torch.randn(19, 64, generator=g, dtype=torch.float64)
    p = a + 0.01 * torch.randn(19, 64, generator=g, dtype=torch.float64)
    p[:3] = a[:3]  # exactly cos = 1: the clamp is active (f'(c) = 0 there)
    a, p = a.float(), p.float()
    tau = _tau(0.05, a.dtype)
    loss, grads = loss_and_grads(fused_info_nce, a, p, None, tau, backend="triton", angular_margin=0.5)
    assert grads[2] is None
    assert torch.isfinite(loss).all() and all(torch.isfinite(t).all() for t in grads if t is not None)
    assert_backend_matches_reference("triton", a, p, None, tau=tau, angular_margin=0.5, margin=0.1)


# ---------------------------------------------------------------------------------------------
# availability, custom ops, fake tensors, torch.compile

def test_unavailable_reason():
    cpu_reason = triton_loss.unavailable_reason(torch.device("cpu"))
    if INTERPRET:
        assert cpu_reason is None
    else:
        assert "TRITON_INTERPRET=1" in cpu_reason
    assert "device type" in triton_loss.unavailable_reason(torch.device("meta"))


def test_unavailable_reason_without_interpreter(monkeypatch):
    monkeypatch.setattr(triton_loss, "_INTERPRETED_AT_IMPORT", False)
    assert "TRITON_INTERPRET=1" in triton_loss.unavailable_reason("cpu")


def _op_args(n=6, d=32, k=6, symmetric=True, mix=True, dtype=torch.float32, device=DEVICE):
    a, p, neg = make_inputs(n, d, k, dtype=dtype, seed=21, device=device)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    mix3 = p.to(cdt).roll(-1, 0) if mix else None
    mix4 = a.to(cdt).roll(-1, 0) if mix else None
    tau = torch.tensor(0.05, dtype=cdt, device=device)
    labels = torch.arange(n, device=device)
    # the mixtures are rolled copies, i.e. MixCSE's with λ = 0 (the last argument, mix_lambda)
    return a, p, neg, mix3, mix4, tau, labels, 0.4, True, symmetric, 0.0 if mix else None


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck needs torch >= 2.4")
def test_opcheck_custom_ops():
    """Schema, fake (meta) implementation and AOT dispatch of both custom ops."""
    args = _op_args()
    torch.library.opcheck(torch.ops.simcse_kernels.triton_info_nce_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    loss, lse, clse = torch.ops.simcse_kernels.triton_info_nce_fwd(*args)
    a, p, neg, mix3, mix4, tau, labels, w, anchor_neg, sym, lam = args
    bwd_args = (torch.ones_like(loss), a, p, neg, mix3, mix4, tau, labels, lse, clse, w, anchor_neg, sym,
                True, True, True, True, None, lam)
    torch.library.opcheck(torch.ops.simcse_kernels.triton_info_nce_bwd.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("symmetric,with_neg", [(True, True), (False, False)])
def test_fake_tensor_shapes(symmetric, with_neg):
    """The meta path: shapes and dtypes under FakeTensorMode, no kernel launched."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.empty(5, 24, dtype=torch.bfloat16)
        p = torch.empty(7, 24, dtype=torch.bfloat16)
        neg = torch.empty(3, 24, dtype=torch.bfloat16) if with_neg else None
        labels = torch.zeros(5, dtype=torch.int64)
        loss, lse, clse = torch.ops.simcse_kernels.triton_info_nce_fwd(
            a, p, neg, None, None, torch.empty(()), labels, 0.0, False, symmetric)
        grads = torch.ops.simcse_kernels.triton_info_nce_bwd(
            loss, a, p, neg, None, None, torch.empty(()), labels, lse, clse, 0.0, False, symmetric,
            True, True, True, True)
        per_row = triton_loss.triton_info_nce(a, p, neg, labels, InfoNCEOptions(reduction="none",
                                                                                symmetric=symmetric))
    assert loss.shape == (5,) and loss.dtype == torch.float32
    assert clse.shape == ((7,) if symmetric else (0,))
    assert grads[0].shape == (5, 24) and grads[0].dtype == torch.bfloat16
    assert grads[1].shape == (7, 24)
    assert grads[2].shape == ((3, 24) if with_neg else (0, 24))
    assert grads[3].shape == () and per_row.shape == (5,)


@pytest.mark.parametrize("extra", [{}, dict(margin=0.2, angular_margin=0.3)])
def test_torch_compile_fullgraph_no_graph_break(extra):
    """The autograd Function + custom ops trace as one graph (aot_eager: no C++ compiler needed)."""
    a, p, neg = make_inputs(9, 32, 9, seed=14, device=DEVICE)
    labels = torch.arange(9, device=DEVICE)
    options = InfoNCEOptions(hard_negative_weight=0.2, symmetric=True, mix_lambda=0.3, backend="triton", **extra)

    def loss_fn(x, y, z):
        return triton_loss.triton_info_nce(x, y, z, labels, options)

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, loss_fn):
        leaves = [t.clone().requires_grad_(True) for t in (a, p, neg)]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [leaf.grad for leaf in leaves])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)
    exp_loss = info_nce_reference(a.double(), p.double(), neg.double(), hard_negative_weight=0.2,
                                  symmetric=True, mix_lambda=0.3, **extra)
    torch.testing.assert_close(results[0][0].double(), exp_loss, **LOSS_TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# GPU: large shapes with compiled kernels

@pytest.mark.cuda
@needs_compiled_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("option_set", ["unsup", "everything"])
def test_cuda_large_parity(dtype, option_set):
    """N = 8192, D = 768 against the float64 oracle (conftest computes it on the inputs' GPU)."""
    k, opts = split_option_set(option_set, 8192)
    a, p, neg = make_inputs(8192, 768, k, dtype=dtype, seed=31, device="cuda")
    assert_backend_matches_reference("triton", a, p, neg, tau=torch.tensor(0.05, device="cuda"), **opts)


@pytest.mark.cuda
@needs_compiled_cuda
def test_cuda_large_parity_atomic_backward(monkeypatch):
    monkeypatch.setenv("SIMCSE_TRITON_BWD", "atomic")
    k, opts = split_option_set("everything", 8192)
    a, p, neg = make_inputs(8192, 768, k, dtype=torch.bfloat16, seed=33, device="cuda")
    assert_backend_matches_reference("triton", a, p, neg, tau=torch.tensor(0.05, device="cuda"), **opts)


@pytest.mark.cuda
@needs_compiled_cuda
def test_cuda_default_backward_is_bitwise_deterministic():
    a, p, neg = make_inputs(4096, 768, 4096, dtype=torch.bfloat16, seed=34, device="cuda")
    runs = [loss_and_grads(fused_info_nce, a, p, neg, torch.tensor(0.05, device="cuda"), backend="triton",
                           hard_negative_weight=0.3, symmetric=True)[1] for _ in range(2)]
    for g0, g1 in zip(*runs):
        assert torch.equal(g0, g1)


@pytest.mark.cuda
@needs_compiled_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_cuda_dtypes_odd_shapes(dtype):
    a, p, neg = make_inputs(1000, 100, 1000, dtype=dtype, seed=32, device="cuda")
    assert_backend_matches_reference("triton", a, p, neg, tau=_tau(0.05, dtype).cuda(),
                                     hard_negative_weight=0.5, symmetric=True, mix_lambda=0.3)


@pytest.mark.cuda
@needs_compiled_cuda
def test_cuda_huge_batch_bounded_memory():
    """N = 262144 anchors and positives (a 262144² logit matrix would need 256 GiB in fp32)."""
    n, d = 262144, 384
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    noise = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    p = (a.detach() + noise).requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fused_info_nce(a, p, backend="triton", check_inputs=False)
    loss.backward()
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - base
    # O((N + M)·D) work buffers (fp32 ∂x̂ for anchors and positives, the grads, the row stats)
    assert peak_extra < 16 * n * d * 4, f"peak extra memory {peak_extra / 2**30:.2f} GiB"
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all() and torch.isfinite(p.grad).all()
    with torch.no_grad():
        expected = fused_info_nce(a.detach(), p.detach(), backend="torch", check_inputs=False)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-4)
