"""Smoke test of the benchmark scripts at tiny CPU sizes (no timing assertions).

Runs ``benchmarks/bench_loss.py``, ``max_batch.py``, ``matmul_peak.py`` and ``plots.py`` as a user
would (subprocesses) and checks that the table, CSV, JSON, markdown and PNG files are produced with
the expected providers and columns, and that every provider's loss on the same inputs equals the
float64 reference within the project's fp32 loss tolerance (a cheap cross-check of the providers).

``torch.compile`` is left out (``--skip-providers compile``): on this CPU each of its 8 graphs
(4 modes x fwd/fwd+bwd) takes ~3-20 s to build with Inductor's C++ backend, several times this
test's whole budget; the GPU suite (``benchmarks/run_gpu_suite.sh``) runs it.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LOSS_TOL

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
COMPILE_SKIP_REASON = "left out by --skip-providers"


def _load(name: str):
    """Import ``benchmarks/<name>.py`` under a private name, leaving no plain-named modules behind."""
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
        for plain in ("providers", "measure", "plots"):
            if plain not in before:
                sys.modules.pop(plain, None)
    return module


def _run(args: list[str], env_drop=(), timeout=240) -> str:
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _expected_providers(providers_mod, skip=("compile",), env_interpret=False) -> list[str]:
    names = []
    for name in providers_mod.ALL_PROVIDERS:
        if name in skip:
            continue
        if name == "triton" and not env_interpret:
            continue  # the main run drops TRITON_INTERPRET: no Triton on CPU
        if providers_mod.PROVIDERS[name].unavailable_reason(torch.device("cpu"), 100) is None:
            names.append(name)
    return names


def _check_losses(rows: list[dict], tau: float) -> int:
    """Every ok row's loss equals its float64 reference (same inputs) within the fp32 loss tolerance."""
    tol = LOSS_TOL[torch.float32]
    checked = 0
    for r in rows:
        if r["status"] != "ok":
            continue
        assert r["loss_fp64_ref"] is not None, r
        ref, loss = float(r["loss_fp64_ref"]), float(r["loss"])
        scale = max(abs(ref), 1.0 / tau)
        assert abs(loss - ref) <= tol["atol"] * scale + tol["rtol"] * abs(ref), (
            f"{r['provider']} {r['mode']} {r['pass']} N={r['n']}: loss {loss} vs fp64 {ref}")
        checked += 1
    # the same inputs give the same loss across providers (fwd and fwd+bwd runs too)
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault((r["mode"], r["n"]), []).append(float(r["loss"]))
    for key, losses in groups.items():
        assert max(losses) - min(losses) <= 2 * tol["atol"] / tau + 2 * tol["rtol"] * max(map(abs, losses)), key
    return checked


def test_bench_loss_outputs_and_cross_check(tmp_path):
    providers = _load("providers")
    bench = _load("bench_loss")
    out = tmp_path / "bench"
    sizes = [40, 96]
    stdout = _run(["benchmarks/bench_loss.py", "--device", "cpu", "--dtype", "fp32", "--sizes", ",".join(map(str, sizes)),
                   "--dim", "100", "--skip-providers", "compile", "--repeats", "1", "--input-sets", "2", "--warmup", "1",
                   "--threads", "1", "--label", "CPU smoke", "--out", str(out)], env_drop=("TRITON_INTERPRET",))
    expected = _expected_providers(providers)
    assert {"naive", "simcse_orig", "torch"} <= set(expected)

    # table on stdout
    for name in expected:
        assert f"\n{name} " in stdout, f"{name} missing from the printed table"
    assert "== fp32 unsup fwdbwd  N=96" in stdout

    # CSV: columns and one row per (mode, pass, N, provider)
    with open(out / "bench_loss.csv") as f:
        reader = csv.DictReader(f)
        assert set(bench.COLUMNS) <= set(reader.fieldnames)
        assert "speedup_vs_naive" in reader.fieldnames and "tflops" in reader.fieldnames
        csv_rows = list(reader)
    keys = {(r["mode"], r["pass"], int(r["n"]), r["provider"]) for r in csv_rows}
    assert keys == {(m, p, n, name) for m in providers.MODES for p in providers.PASSES for n in sizes for name in expected}
    for r in csv_rows:
        prov = providers.PROVIDERS[r["provider"]]
        assert r["status"] == ("ok" if prov.supports(r["mode"]) else "n/a"), r
        if r["status"] == "ok":
            assert float(r["time_ms_median"]) > 0 and float(r["tflops"]) > 0
            assert float(r["time_ms_q25"]) <= float(r["time_ms_median"]) <= float(r["time_ms_q75"])
            assert r["peak_extra_mib"] != "", f"memory not measured: {r}"
        if r["provider"] == "naive" and r["status"] == "ok":
            assert float(r["speedup_vs_naive"]) == pytest.approx(1.0)

    # JSON: same rows plus meta (FLOP convention, why providers were not run)
    data = json.loads((out / "bench_loss.json").read_text())
    assert len(data["rows"]) == len(csv_rows)
    assert "gemm_equiv" in data["meta"]["flop_convention"]
    assert data["meta"]["providers_unavailable"]["compile"] == COMPILE_SKIP_REASON
    assert sorted(data["meta"]["providers"]) == sorted(expected)
    assert _check_losses(data["rows"], providers.TEMPERATURE) >= len(expected) * 2

    # markdown and plots
    assert "| N | provider |" in (out / "bench_loss.md").read_text()
    for stem in ("time_vs_n", "memory_vs_n"):
        for pass_ in providers.PASSES:
            png = out / f"{stem}_fp32_{pass_}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, png

    # re-plotting from the JSON works
    replot = tmp_path / "replot"
    _run(["benchmarks/plots.py", str(out / "bench_loss.json"), "--out", str(replot)])
    assert len(list(replot.glob("*.png"))) == 4


def test_triton_provider_in_interpreter(tmp_path):
    """The Triton backend as a provider, when the interpreter makes it available on CPU (CI sets it)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs on CPU only under TRITON_INTERPRET=1")
    providers = _load("providers")
    if providers.PROVIDERS["triton"].unavailable_reason(torch.device("cpu"), 100) is not None:
        pytest.skip("triton backend unavailable on CPU even in the interpreter")
    out = tmp_path / "triton"
    _run(["benchmarks/bench_loss.py", "--device", "cpu", "--dtype", "fp32", "--sizes", "40", "--dim", "100",
          "--providers", "naive,triton", "--repeats", "1", "--input-sets", "1", "--warmup", "1", "--no-memory",
          "--no-plots", "--threads", "1", "--out", str(out)])
    rows = json.loads((out / "bench_loss.json").read_text())["rows"]
    assert {r["provider"] for r in rows} == {"naive", "triton"}
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    assert _check_losses(rows, providers.TEMPERATURE) == 2 * len(providers.MODES) * len(providers.PASSES)


def test_max_batch_and_matmul_peak(tmp_path):
    out = tmp_path / "probe"
    stdout = _run(["benchmarks/max_batch.py", "--device", "cpu", "--dim", "32", "--n-start", "64", "--n-max", "512",
                   "--mem-cap-gb", "0.004", "--max-call-seconds", "2", "--time-budget", "30",
                   "--providers", "naive,simcse_orig,torch", "--threads", "1", "--out", str(out)])
    data = json.loads((out / "max_batch.json").read_text())
    rows = {r["provider"]: r for r in data["rows"]}
    assert set(rows) == {"naive", "simcse_orig", "torch"}
    for name, r in rows.items():
        assert r["max_n"] is not None and r["max_n"] >= 64, r
        assert f"{name} " in stdout
    # a 4 MiB cap stops the quadratic-memory broadcast form well before the chunked backend
    assert rows["simcse_orig"]["max_n"] < rows["torch"]["max_n"]
    assert (out / "max_batch.csv").exists()

    _run(["benchmarks/matmul_peak.py", "--device", "cpu", "--size", "128", "--seconds", "0.1", "--out", str(out)])
    peak = json.loads((out / "matmul_peak.json").read_text())
    assert peak["rows"][0]["tflops_median"] > 0


def test_bench_margin_smoke(tmp_path):
    """benchmarks/bench_margin.py at tiny sizes: one row per (C, provider), ours equal to naive
    (same seeded class matrix and inputs), PML equal too where installed, Cut Cross-Entropy (no
    margin: a lower loss) where installed, files written with the memory definition."""
    out = tmp_path / "margin"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, str(BENCH / "bench_margin.py"), "--n", "8", "--dim", "16", "--classes", "64",
                    "128", "--out", str(out)], check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)
    result = json.loads((out / "margin.json").read_text())
    rows = {(r["classes"], r["provider"]): r for r in result["rows"]}
    assert set(rows) == {(c, p) for c in (64, 128) for p in ("ours", "pml", "naive", "cce")}
    for c in (64, 128):
        ours, naive, pml, cce = (rows[(c, p)] for p in ("ours", "naive", "pml", "cce"))
        assert ours["seconds"] > 0 and "extra_peak_mb" in ours
        assert abs(ours["loss"] - naive["loss"]) <= 1e-4 * abs(naive["loss"])
        if "skipped" not in pml:
            assert abs(ours["loss"] - pml["loss"]) <= 1e-4 * abs(pml["loss"])
        if "skipped" not in cce:
            assert 0 < cce["loss"] < ours["loss"]
    md = (out / "margin.md").read_text()
    assert "load average" in md and "| 128 | ours" in md and "Definition: extra peak memory" in md
