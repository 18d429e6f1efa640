"""Shared test helpers: inputs, per-dtype tolerances, and the parity check against the float64 oracle."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from simcse_kernels import fused_info_nce, info_nce_reference
from simcse_kernels.options import InfoNCEOptions
from simcse_kernels.tolerances import (
    GRAD_TOL,
    LOSS_TOL,
    grad_scale_floor,
    loss_scale_floor,
    temperature_grad_floor,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# LOSS_TOL / GRAD_TOL (imported above): tolerances per input dtype, relative to the scale of the float64
# reference value; one table in the package, shared with the first-use self-check and
# `python -m simcse_kernels`. The fused backends compute in fp32 (fp64 for fp64), so the loss is
# accurate to fp32 round-off; gradients come back in the input dtype and carry its rounding.


# Option sets every backend's parity suite runs ("k": "n" means K = N hard negatives).
OPTION_SETS = {
    "unsup": dict(),
    "hard_neg": dict(k="n", hard_negative_weight=0.7),
    "hard_neg_w0": dict(k="n"),
    "symmetric": dict(symmetric=True),
    "anchor_neg": dict(anchor_negatives=True),
    "mixcse": dict(mix_lambda=0.2),
    "mixcse_sup": dict(k="n", mix_lambda=0.35, hard_negative_weight=0.4),
    "sym_hard_neg": dict(k="n", symmetric=True, hard_negative_weight=-0.3),
    "sym_anchor_mix": dict(symmetric=True, anchor_negatives=True, mix_lambda=0.6),
    "everything": dict(k="n", symmetric=True, anchor_negatives=True, mix_lambda=0.5, hard_negative_weight=1.0),
    "sum": dict(reduction="sum"),
    "none": dict(k="n", reduction="none", anchor_negatives=True),
}


# Margin / similarity option sets (issue 21), crossed with the existing options; "dot" sets get
# features scaled by 1/sqrt(D) (make_margin_inputs) so that raw dot products stay O(1) like cosines.
MARGIN_OPTION_SETS = {
    "cosface": dict(margin=0.35),
    "arcface": dict(angular_margin=0.5),
    "arc_plus_margin_hard_neg": dict(k="n", hard_negative_weight=0.7, angular_margin=0.3, margin=0.1),
    "margin_symmetric": dict(symmetric=True, margin=0.3),
    "arc_symmetric_anchor_neg": dict(symmetric=True, anchor_negatives=True, angular_margin=0.4),
    "margin_mixcse": dict(k="n", mix_lambda=0.3, hard_negative_weight=0.4, margin=0.2),
    "margin_everything": dict(k="n", symmetric=True, anchor_negatives=True, mix_lambda=0.5,
                              hard_negative_weight=1.0, margin=0.25, angular_margin=0.2),
    "margin_sum": dict(reduction="sum", angular_margin=0.5),
    "margin_none": dict(k="n", reduction="none", anchor_negatives=True, margin=0.3),
    "dot": dict(similarity="dot"),
    "dot_margin_hard_neg": dict(k="n", hard_negative_weight=0.5, similarity="dot", margin=0.3),
    "dot_margin_symmetric": dict(symmetric=True, anchor_negatives=True, similarity="dot", margin=0.2),
}


def make_margin_inputs(option_set, n, d, *, dtype=torch.float32, device="cpu", seed=0, n_pos=None):
    """(anchors, positives, negatives, options) of a ``MARGIN_OPTION_SETS`` entry (``k="n"``: K = N).

    "dot" sets: the features are scaled by 1/sqrt(D) before rounding to ``dtype`` (|x| ~ 1, as cosines).
    """
    opts = dict(MARGIN_OPTION_SETS[option_set])
    k = opts.pop("k", 0)
    k = n if k == "n" else k
    a, p, neg = make_inputs(n, d, k, dtype=torch.float64, seed=seed, n_pos=n_pos)
    scale = d ** -0.5 if opts.get("similarity") == "dot" else 1.0
    cast = lambda t: None if t is None else (t * scale).to(dtype=dtype, device=device)
    return cast(a), cast(p), cast(neg), opts


def split_option_set(option_set, n):
    """(K, loss options) of an ``OPTION_SETS`` entry for a batch of n anchors."""
    opts = dict(OPTION_SETS[option_set])
    k = opts.pop("k", 0)
    return (n if k == "n" else k), opts


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def make_inputs(n, d, k=0, *, dtype=torch.float32, device="cpu", seed=0, n_pos=None):
    """Random anchors (n, d), positives (n_pos or n, d), negatives (k, d) or None, rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    n_pos = n if n_pos is None else n_pos
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    # positives correlated with anchors so the softmax is not flat
    p = torch.randn(n_pos, d, generator=g, dtype=torch.float64)
    p[: min(n, n_pos)] += 1.5 * a[: min(n, n_pos)]
    neg = torch.randn(k, d, generator=g, dtype=torch.float64) if k else None
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)
    return cast(a), cast(p), cast(neg)


def loss_and_grads(loss_fn, a, p, neg, tau, **options):
    """Loss and gradients w.r.t. (anchors, positives, negatives, tau) of ``loss_fn``."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (a, p, neg)]
    tau_leaf = tau.detach().clone().requires_grad_(True) if isinstance(tau, torch.Tensor) else tau
    loss = loss_fn(leaves[0], leaves[1], leaves[2], temperature=tau_leaf, **options)
    weight = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    (loss * weight).sum().backward()
    grads = [t.grad if t is not None else None for t in leaves]
    grads.append(tau_leaf.grad if isinstance(tau_leaf, torch.Tensor) else None)
    return loss.detach(), grads


def _assert_close_scaled(actual, expected, tol, what, min_scale=0.0):
    """``atol`` is relative to the largest |expected| entry (at least ``min_scale``; 1 if all zero)."""
    expected = expected.double().cpu()
    actual = actual.double().cpu()
    scale = max(expected.abs().max().item(), min_scale) or 1.0
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=lambda m: f"{what}: {m}")


def assert_backend_matches_reference(backend, a, p, neg, tau=0.05, **options):
    """Loss and every gradient of ``backend`` equal the float64 naive oracle on the same inputs."""
    dtype = a.dtype
    # the float64 oracle runs on the inputs' device (fp64 on a GPU is quick for the large cases)
    tau64 = tau.double().to(a.device) if isinstance(tau, torch.Tensor) else tau
    to64 = lambda t: None if t is None else t.double()
    exp_loss, exp_grads = loss_and_grads(info_nce_reference, to64(a), to64(p), to64(neg), tau64, **options)
    act_loss, act_grads = loss_and_grads(fused_info_nce, a, p, neg, tau, backend=backend, **options)
    assert act_loss.shape == exp_loss.shape
    # Each row's loss is lse - target, a difference of logits of size up to 1/tau: that is the
    # unit of its round-off (times N for a sum).
    tau_value = float(tau64)
    reduction = options.get("reduction", "mean")
    loss_unit = loss_scale_floor(a.shape[0], tau_value, reduction)
    _assert_close_scaled(act_loss, exp_loss, LOSS_TOL[dtype], "loss", min_scale=loss_unit)
    for name, act, exp, src in zip(("anchors", "positives", "negatives", "temperature"), act_grads, exp_grads,
                                   (a, p, neg, tau)):
        if exp is None:
            assert act is None, f"{name}: unexpected gradient"
            continue
        assert act is not None, f"{name}: missing gradient"
        # Unit of one gradient term: |g_i| |ŷ_j| / (tau |x|) with ŷ entries ~ 1/sqrt(D). Gradients of
        # saturated rows (softmax ~ one-hot) are far below it and below fp32 resolution there.
        # dL/dtau = -(1/tau) sum dS_ij s_ij is a cancelling sum of N·M terms: its round-off is bounded
        # by the sum of their magnitudes (in any summation order), not by the (possibly ~0) result.
        if name == "temperature":
            min_scale = reference_temperature_floor(a, p, neg, tau_value, **options)
        else:
            min_scale = grad_scale_floor(name, src, a.shape[0], tau_value, reduction)
        if name != "temperature":
            assert act.dtype == src.dtype, f"{name}: grad dtype {act.dtype} != input dtype {src.dtype}"
        _assert_close_scaled(act, exp, GRAD_TOL[dtype], f"grad {name}", min_scale=min_scale)


def reference_temperature_floor(a, p, neg, tau, labels=None, **options):
    """:func:`temperature_grad_floor` of the loss :func:`loss_and_grads` differentiates (its upstream
    weights), for ``fused_info_nce`` keyword ``options``."""
    options = {k: v for k, v in options.items() if k not in ("backend", "chunk_budget_mib")}
    return temperature_grad_floor(a, p, neg, labels, InfoNCEOptions(temperature=float(tau), **options))


def interpret_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


#: where the Triton tests run: the CPU interpreter, or CUDA when there is a GPU and no interpreter
TRITON_DEVICE = "cpu" if interpret_triton() or not torch.cuda.is_available() else "cuda"
#: module mark of the Triton test files
needs_triton_runtime = pytest.mark.skipif(
    not (torch.cuda.is_available() or interpret_triton()),
    reason="the Triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 to run its kernels in the CPU "
    "interpreter",
)


#: a small corpus for the trainer's fault and signal tests (a tiny BERT's vocabulary is built from it)
TINY_TRAIN_SENTS = [f"line {i}: the {a} {b} near the {c}." for i, (a, b, c) in enumerate(
    zip(["quick", "lazy", "small", "red"] * 6, ["fox", "dog", "bird", "cat", "cow"] * 5, ["river", "hill", "town"] * 8))]


def tiny_model_and_corpus(root: Path) -> tuple[Path, Path]:
    """A 1-layer tiny BERT (hidden 16) over :data:`TINY_TRAIN_SENTS` and the corpus file, under ``root``."""
    from simcse_kernels.train.tiny import build_tiny_bert

    model_dir = build_tiny_bert(root / "tiny", TINY_TRAIN_SENTS, hidden=16, layers=1)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(TINY_TRAIN_SENTS) + "\n")
    return model_dir, corpus


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a gloo process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Triton interpreter: bf16 tl.dot (test-only patch)

def _interpreter_builder():
    """triton's interpreter builder class, or None when triton (or its interpreter) is not importable."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return None
    builder = getattr(interpreter, "InterpreterBuilder", None)
    ok = builder is not None and hasattr(builder, "create_dot") and hasattr(builder, "cast_impl")
    return builder if ok else None


def interpreter_bf16_dot_patchable() -> bool:
    """True when the session fixture below can make the interpreter's bf16 ``tl.dot`` correct."""
    return interpret_triton() and _interpreter_builder() is not None


def _bf16_bits_to_fp32(data):
    """The interpreter keeps bf16 as its uint16 bit patterns: widen them to the fp32 of the same value."""
    import numpy as np

    return (np.asarray(data).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _make_fp32_dot_for_bf16(original):
    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        import numpy as np
        import triton.language as tl
        from triton.runtime.interpreter import TensorHandle

        if a.dtype != tl.bfloat16 and b.dtype != tl.bfloat16:
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        if d.data.dtype != np.float32:
            raise NotImplementedError(f"bf16 tl.dot with a {d.data.dtype} accumulator is not emulated")
        a32 = _bf16_bits_to_fp32(a.data) if a.dtype == tl.bfloat16 else a.data.astype(np.float32)
        b32 = _bf16_bits_to_fp32(b.data) if b.dtype == tl.bfloat16 else b.data.astype(np.float32)
        # exact bf16 products, fp32 accumulation (as tensor cores do for bf16 x bf16 -> fp32)
        return TensorHandle(np.matmul(a32, b32, dtype=np.float32) + d.data, d.dtype.scalar)

    create_dot.simcse_bf16_as_fp32 = True
    create_dot.original = original
    return create_dot


def _fp32_to_bf16_bits_rtne(data):
    """fp32 -> bf16 bit patterns rounded to nearest even (as a GPU's ``.to(tl.bfloat16)``); NaN stays NaN."""
    import numpy as np

    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet_nan = (bits >> np.uint32(16)) | np.uint32(0x40)
    return np.where(np.isnan(data), quiet_nan, rounded).astype(np.uint16)


def _make_rtne_cast_to_bf16(original):
    def cast_impl(self, src, dst_type):
        import triton.language as tl
        from triton.runtime.interpreter import TensorHandle

        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return TensorHandle(_fp32_to_bf16_bits_rtne(src.data), dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl.simcse_bf16_rtne = True
    cast_impl.original = original
    return cast_impl


@pytest.fixture(autouse=True, scope="session")
def interpreter_bf16_dot():
    """Under TRITON_INTERPRET=1, make the interpreter's bf16 arithmetic what a GPU does (numpy has no bf16;
    the interpreter keeps bf16 as uint16 bits):

    * ``tl.dot`` multiplied the uint16 bits of bf16 operands: convert them to the fp32 of the same
      values and accumulate in fp32 instead (as tensor cores do);
    * fp32 -> bf16 casts (``.to(tl.bfloat16)``, stores into bf16 tensors) truncated the mantissa: round
      to nearest even instead.
    """
    builder = _interpreter_builder() if interpret_triton() else None
    if builder is None or getattr(builder.create_dot, "simcse_bf16_as_fp32", False):
        yield
        return
    originals = builder.create_dot, builder.cast_impl
    builder.create_dot = _make_fp32_dot_for_bf16(originals[0])
    builder.cast_impl = _make_rtne_cast_to_bf16(originals[1])
    try:
        yield
    finally:
        builder.create_dot, builder.cast_impl = originals
