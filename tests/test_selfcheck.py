"""The first-use self-check of the fused backends (simcse_kernels/selfcheck.py), on CPU.

The Triton kernels run in the interpreter (``TRITON_INTERPRET=1``); ``SIMCSE_KERNELS_SELFCHECK=force``
turns the check on for CPU tensors, and ``SIMCSE_KERNELS_BACKEND=triton`` makes ``backend="auto"``
pick Triton on CPU (the environment override counts as "auto": fallback with a warning, not an error).
A corrupted kernel is simulated by wrapping the Triton custom ops' forward/backward implementations.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from conftest import make_inputs

from simcse_kernels import InfoNCEOptions, SelfCheckError, fused_info_nce, selfcheck
from simcse_kernels.selfcheck import SelfCheckWarning

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernels in the interpreter (TRITON_INTERPRET=1)")
triton_loss = pytest.importorskip("simcse_kernels.ops.triton_loss", reason="triton is not installed")

N, D = 40, 32
N_SLICED = 70  # > SLICE_ROWS: the check runs on a slice


@pytest.fixture(autouse=True)
def fresh_selfcheck(monkeypatch):
    """Self-check on for CPU tensors, nothing remembered, run_check calls counted."""
    monkeypatch.setenv("SIMCSE_KERNELS_SELFCHECK", "force")
    monkeypatch.delenv("SIMCSE_KERNELS_BACKEND", raising=False)
    selfcheck.reset()
    calls = []
    original = selfcheck.run_check

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(selfcheck, "run_check", counting)
    yield calls
    selfcheck.reset()


def _corrupt(monkeypatch, what):
    """Perturb the Triton backend's loss or one gradient (as a miscompiled kernel would)."""
    if what == "loss":
        forward = triton_loss._forward_impl

        def bad_forward(*args):
            loss, lse, clse = forward(*args)
            return loss + 1e-2, lse, clse

        monkeypatch.setattr(triton_loss, "_forward_impl", bad_forward)
        return
    backward = triton_loss._backward_impl
    index = {"anchors": 0, "positives": 1, "negatives": 2, "temperature": 3}[what]

    def bad_backward(*args):
        grads = list(backward(*args))
        if grads[index].numel():
            grads[index] = grads[index] * 1.05
        return tuple(grads)

    monkeypatch.setattr(triton_loss, "_backward_impl", bad_backward)


def _run(backend, tau=0.05, n=N, **options):
    """Loss and grads (anchors, positives, negatives, tau) of fused_info_nce on fixed inputs."""
    a, p, neg = make_inputs(n, D, n, seed=3)
    leaves = [t.clone().requires_grad_(True) for t in (a, p, neg)]
    tau_leaf = torch.tensor(tau, requires_grad=True) if options.pop("learnable", False) else tau
    loss = fused_info_nce(*leaves, temperature=tau_leaf, backend=backend, **options)
    loss.sum().backward()
    tau_grad = tau_leaf.grad if isinstance(tau_leaf, torch.Tensor) else None
    return [loss.detach()] + [leaf.grad for leaf in leaves] + [tau_grad]


def _assert_same(got, want):
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def _differs(got, want):
    return any(not torch.allclose(g, w, rtol=1e-4, atol=1e-6) for g, w in zip(got, want) if w is not None)


def test_intact_kernel_passes_silently_once_per_key(fresh_selfcheck, monkeypatch):
    monkeypatch.setenv("SIMCSE_KERNELS_BACKEND", "triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SelfCheckWarning)
        first = _run("auto", hard_negative_weight=0.3, learnable=True, n=N_SLICED)
        _run("auto", hard_negative_weight=0.3, learnable=True)  # other N, same key
        assert fresh_selfcheck == ["triton"]  # the same key is checked once
        _run("auto", hard_negative_weight=0.7, learnable=True)  # another weight value: same key
        assert len(fresh_selfcheck) == 1
        _run("auto", hard_negative_weight=0.3, symmetric=True, learnable=True)  # another option set
        _run("triton", hard_negative_weight=0.3, learnable=True, reduction="sum")  # another reduction
        assert len(fresh_selfcheck) == 3
    monkeypatch.delenv("SIMCSE_KERNELS_BACKEND")
    # explicit: no extra check, same result
    _assert_same(first, _run("triton", hard_negative_weight=0.3, learnable=True, n=N_SLICED))
    assert len(fresh_selfcheck) == 3
    results = selfcheck.results()
    assert len(results) == 3 and all(r.ok for r in results.values())
    assert results[next(iter(results))].shapes.startswith("N=64, P=64, K=64, D=32 (slice of N=70)")
    assert {row["tensor"] for r in results.values() for row in r.rows} == {
        "loss", "grad anchors", "grad positives", "grad negatives", "grad temperature"}


@pytest.mark.parametrize("what", ["loss", "positives", "temperature"])
def test_corrupted_kernel_with_auto_warns_once_and_falls_back_to_torch(what, fresh_selfcheck, monkeypatch):
    monkeypatch.setenv("SIMCSE_KERNELS_BACKEND", "triton")  # auto's override: behaves like auto
    _corrupt(monkeypatch, what)
    opts = dict(symmetric=True, learnable=True)
    name = "loss" if what == "loss" else f"grad {what}"
    with pytest.warns(SelfCheckWarning, match=name) as record:
        got = _run("auto", **opts)
    message = str(record[0].message)
    assert "python -m simcse_kernels --json report.json" in message
    assert f"torch {torch.__version__}" in message and "triton" in message and "falling back" in message
    torch_result = _run("torch", **opts)
    _assert_same(got, torch_result)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SelfCheckWarning)  # once per key
        _assert_same(_run("auto", **opts), torch_result)
    assert fresh_selfcheck == ["triton"]
    monkeypatch.setenv("SIMCSE_KERNELS_SELFCHECK", "0")
    assert _differs(_run("triton", **opts), torch_result)  # unchecked, the corrupted kernel's result differs


def test_corrupted_kernel_explicit_backend_raises(fresh_selfcheck, monkeypatch):
    _corrupt(monkeypatch, "negatives")
    with pytest.raises(SelfCheckError, match="grad negatives.*requested explicitly"):
        _run("triton", hard_negative_weight=0.2)
    with pytest.raises(SelfCheckError):  # remembered: raises again without re-checking
        _run("triton", hard_negative_weight=0.2)
    assert fresh_selfcheck == ["triton"]
    # the same key under "auto" (its env override) falls back with a warning instead
    monkeypatch.setenv("SIMCSE_KERNELS_BACKEND", "triton")
    with pytest.warns(SelfCheckWarning, match="grad negatives"):
        got = _run("auto", hard_negative_weight=0.2)
    _assert_same(got, _run("torch", hard_negative_weight=0.2))
    assert fresh_selfcheck == ["triton"]


@pytest.mark.parametrize("grad_off", [torch.no_grad, torch.inference_mode])
def test_corrupted_kernel_is_caught_with_gradients_off(grad_off, fresh_selfcheck, monkeypatch):
    """The check builds its own graph even when the caller runs under no_grad / inference_mode."""
    monkeypatch.setenv("SIMCSE_KERNELS_BACKEND", "triton")
    _corrupt(monkeypatch, "anchors")
    a, p, _ = make_inputs(N, D, seed=5)
    with grad_off(), pytest.warns(SelfCheckWarning, match="grad anchors"):
        loss = fused_info_nce(a * 1, p * 1, temperature=torch.tensor(0.05))
    torch.testing.assert_close(loss, fused_info_nce(a, p, backend="torch"))


def test_disabled_by_env_and_cuda_only_by_default(fresh_selfcheck, monkeypatch):
    _corrupt(monkeypatch, "loss")
    monkeypatch.setenv("SIMCSE_KERNELS_SELFCHECK", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SelfCheckWarning)
        corrupted = _run("triton")
        monkeypatch.delenv("SIMCSE_KERNELS_SELFCHECK")  # default: CUDA devices only, these are CPU tensors
        _assert_same(_run("triton"), corrupted)
    assert fresh_selfcheck == []
    assert _differs(corrupted, _run("torch"))  # the corruption is real, the check was off
    monkeypatch.setenv("SIMCSE_KERNELS_SELFCHECK", "sometimes")
    with pytest.raises(ValueError, match="SIMCSE_KERNELS_SELFCHECK"):
        _run("triton")


def test_not_run_while_compiling_and_fullgraph_still_traces(fresh_selfcheck):
    a, p, neg = make_inputs(9, 32, 9, seed=14)

    def loss_fn(x, y, z):
        return fused_info_nce(x, y, z, hard_negative_weight=0.2, symmetric=True, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    got = compiled(a, p, neg)
    assert fresh_selfcheck == []  # traced, not checked
    want = loss_fn(a, p, neg)  # eager: checked
    assert fresh_selfcheck == ["triton"]
    torch.testing.assert_close(got, want)


def test_slice_inputs_remaps_labels_into_the_slice():
    a, p, neg = make_inputs(100, 8, 80, n_pos=90, seed=1)
    labels = torch.tensor([3, 70, 89, 90 + 5, 90 + 79] + list(range(95)))
    sa, sp, sn, sl = selfcheck.slice_inputs(a, p, neg, labels, rows=64)
    assert sa.shape == (64, 8) and sp.shape == (64, 8) and sn.shape == (64, 8)
    assert torch.equal(sa, a[:64]) and torch.equal(sn, neg[:64])
    assert sl[:5].tolist() == [3, 70 % 64, 89 % 64, 64 + 5, 64 + 79 % 64]  # kinds kept: positive / negative
    assert sl[5:].tolist() == [i % 64 for i in range(59)]
    assert ((sl >= 0) & (sl < 128)).all()
    # default labels stay the identity; no negatives
    _, _, none, ident = selfcheck.slice_inputs(a, p, None, torch.arange(100), rows=64)
    assert none is None and torch.equal(ident, torch.arange(64))


def test_check_key_fields():
    a, _, neg = make_inputs(4, 8, 4)
    key = selfcheck.check_key("triton", a, neg, InfoNCEOptions(hard_negative_weight=0.5, mix_lambda=0.1))
    assert key[:4] == ("triton", "cpu", torch.float32, 8)
    assert key == selfcheck.check_key("triton", a, neg, InfoNCEOptions(hard_negative_weight=0.9, mix_lambda=0.7))
    assert key != selfcheck.check_key("triton", a, None, InfoNCEOptions(hard_negative_weight=0.5, mix_lambda=0.1))


def test_check_key_includes_margins_and_similarity():
    """Margins and dot similarity run other kernel variants (MARGIN epilogues, no normalization): own keys."""
    a, _, _ = make_inputs(4, 8)
    base = selfcheck.check_key("triton", a, None, InfoNCEOptions())
    keys = [selfcheck.check_key("triton", a, None, InfoNCEOptions(**opts))
            for opts in (dict(margin=0.3), dict(angular_margin=0.5), dict(similarity="dot"))]
    assert len({base, *keys}) == 4
    assert keys[0] == selfcheck.check_key("triton", a, None, InfoNCEOptions(margin=0.1))
    described = selfcheck._describe_key(keys[2])
    assert "similarity=dot" in described and "margin!=0=False" in described
