"""pytest-benchmark suite: every provider x mode x pass on the same inputs.

    pytest benchmarks/ --benchmark-only                       # defaults: see below
    SIMCSE_BENCH_N=16384 SIMCSE_BENCH_D=768 SIMCSE_BENCH_DTYPE=bf16 pytest benchmarks/ --benchmark-only \\
        --benchmark-group-by=group --benchmark-columns=median,iqr,min,max,rounds

Sizes come from the environment: ``SIMCSE_BENCH_N`` (default 8192 on GPU, 512 on CPU),
``SIMCSE_BENCH_D`` (768 / 256), ``SIMCSE_BENCH_DTYPE`` (bf16 / fp32), ``SIMCSE_BENCH_DEVICE``
(cuda if available). Benchmarks are grouped by ``mode-pass`` so providers sit side by side; each
records its loss, nominal GFLOP and (GPU) peak extra memory in ``extra_info``. Unavailable
providers and modes a provider cannot compute are skipped with the reason. A CUDA OOM is
recorded (``extra_info["status"] = "OOM"``) and the benchmark is skipped, not failed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402
import providers as P  # noqa: E402

DEVICE = torch.device(os.environ.get("SIMCSE_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
GPU = DEVICE.type == "cuda"
N = int(os.environ.get("SIMCSE_BENCH_N", 8192 if GPU else 512))
D = int(os.environ.get("SIMCSE_BENCH_D", 768 if GPU else 256))
DTYPE_NAME = os.environ.get("SIMCSE_BENCH_DTYPE", "bf16" if GPU else "fp32")
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}[DTYPE_NAME]
ROUNDS = int(os.environ.get("SIMCSE_BENCH_ROUNDS", 10 if GPU else 3))


def _call(fn, inputs):
    def run():
        out = fn(*inputs)
        measure.sync(DEVICE)
        return out

    return run


@pytest.mark.parametrize("pass_", P.PASSES)
@pytest.mark.parametrize("mode", list(P.MODES))
@pytest.mark.parametrize("provider", P.ALL_PROVIDERS)
def test_loss(benchmark, provider, mode, pass_):
    """Time one provider on one mode/pass (``benchmark.pedantic``: warm-up round, then ROUNDS rounds)."""
    prov = P.PROVIDERS[provider]
    reason = prov.unavailable_reason(DEVICE, D)
    if reason:
        pytest.skip(reason)
    if not prov.supports(mode):
        pytest.skip(f"n/a: {provider} cannot compute mode {mode}")
    backward = pass_ == "fwdbwd"
    benchmark.group = f"{mode}-{pass_} N={N} D={D} {DTYPE_NAME} {DEVICE.type}"
    benchmark.extra_info.update(provider=provider, mode=mode, **{"pass": pass_}, n=N, d=D, dtype=DTYPE_NAME,
                                gflop_nominal=P.useful_flops(mode, pass_, N, D) / 1e9)
    inputs = P.make_inputs(N, D, mode, dtype=DTYPE, device=DEVICE, seed=0, requires_grad=backward)
    fn = prov.make(mode, backward, D)
    run = _call(fn, inputs)
    try:
        loss = run()  # first call outside the timing (compilation, autotuning)
        benchmark.extra_info["loss"] = float(loss)
        if GPU:
            benchmark.extra_info["peak_extra_mib"] = measure.cuda_extra_memory(run, DEVICE) / 2**20
        benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    except Exception as exc:
        if not measure.is_oom(exc):
            raise
        benchmark.extra_info["status"] = "OOM"
        fn = inputs = run = None
        measure.free_memory(DEVICE, collect=True)
        pytest.skip(f"OOM at N={N}")
    assert torch.isfinite(loss), f"{provider} {mode}: non-finite loss {loss}"
