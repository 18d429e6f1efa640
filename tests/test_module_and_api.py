"""The nn.Module face, learnable temperature, the drop-in equivalence and backend selection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import make_inputs

import simcse_kernels
from simcse_kernels import FusedInfoNCE, InfoNCEOptions, available_backends, fused_info_nce
from simcse_kernels.backends import NAIVE_MAX_LOGITS_ON_CPU, resolve_backend
from simcse_kernels.tolerances import GRAD_TOL, temperature_grad_floor


def test_drop_in_for_the_usual_loss():
    z1, z2, _ = make_inputs(32, 64, dtype=torch.float32, seed=1)
    usual = F.cross_entropy(F.normalize(z1) @ F.normalize(z2).T / 0.05, torch.arange(32))
    for backend in ("auto", "naive", "torch"):
        torch.testing.assert_close(fused_info_nce(z1, z2, backend=backend), usual, rtol=1e-5, atol=1e-5)


def test_module_matches_functional_and_learns_temperature():
    a, p, neg = make_inputs(16, 32, 16, seed=2)
    module = FusedInfoNCE(temperature=0.05, hard_negative_weight=0.5, learnable_temperature=True, backend="torch")
    assert [name for name, _ in module.named_parameters()] == ["log_temperature"]
    loss = module(a, p, neg)
    expected = fused_info_nce(a, p, neg, temperature=0.05, hard_negative_weight=0.5, backend="naive")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    loss.backward()
    tau = torch.tensor(0.05, requires_grad=True)
    fused_info_nce(a, p, neg, temperature=tau, hard_negative_weight=0.5, backend="naive").backward()
    # d/dlog(tau) = tau * d/dtau; both fp32 sums cancel: each within fp32's atol of the sum of |terms|
    floor = temperature_grad_floor(a, p, neg, None, InfoNCEOptions(temperature=0.05, hard_negative_weight=0.5),
                                   loss_weight=1.0)
    torch.testing.assert_close(module.log_temperature.grad, 0.05 * tau.grad, rtol=1e-4,
                               atol=2 * GRAD_TOL[torch.float32]["atol"] * 0.05 * floor)
    assert "learnable" in repr(module)


def test_fp16_and_bf16_grads_come_back_in_input_dtype():
    for dtype in (torch.float16, torch.bfloat16):
        a, p, _ = make_inputs(8, 16, dtype=dtype)
        a.requires_grad_(True)
        loss = fused_info_nce(a, p, backend="torch")
        assert loss.dtype == torch.float32
        loss.backward()
        assert a.grad.dtype == dtype


def test_auto_backend_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, 1000) == "naive"
    assert resolve_backend("auto", cpu, NAIVE_MAX_LOGITS_ON_CPU + 1) == "torch"
    assert {"torch", "naive"} <= set(available_backends("cpu"))


def test_env_override_of_auto(monkeypatch):
    monkeypatch.setenv("SIMCSE_KERNELS_BACKEND", "torch")
    assert resolve_backend("auto", torch.device("cpu"), 10) == "torch"


def test_public_names():
    for name in ("fused_info_nce", "FusedInfoNCE", "info_nce_reference", "available_backends", "InfoNCEOptions"):
        assert hasattr(simcse_kernels, name)


def test_torch_compile_fullgraph_with_learnable_temperature():
    """fused_info_nce compiles as one graph (no breaks) and matches eager, grads included."""
    a, p, neg = make_inputs(8, 16, 8, seed=3)
    results = []
    for compiled in (False, True):
        a_ = a.clone().requires_grad_(True)
        tau = torch.tensor(0.05, requires_grad=True)

        def loss_fn(a, p, n, tau):
            return fused_info_nce(a, p, n, temperature=tau, hard_negative_weight=0.3, backend="torch")

        fn = torch.compile(loss_fn, fullgraph=True, backend="aot_eager") if compiled else loss_fn
        loss = fn(a_, p, neg, tau)
        loss.backward()
        results.append((loss.detach(), a_.grad, tau.grad))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager)
