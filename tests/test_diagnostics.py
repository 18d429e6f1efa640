"""``python -m simcse_kernels`` (simcse_kernels/diagnostics.py): versions, backends, parity, timing, exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from simcse_kernels import diagnostics

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# fp16 is left out of the command-line run (time); the Triton and torch backends' fp16 rows are checked below.
CLI_DTYPES = ["fp64", "fp32", "bf16"]


def test_command_line_report_passes_and_writes_json(tmp_path):
    out = tmp_path / "report.json"
    dtype_args = [arg for dtype in CLI_DTYPES for arg in ("--dtype", dtype)]
    proc = subprocess.run([sys.executable, "-m", "simcse_kernels", "--json", str(out), *dtype_args],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== parity vs float64 naive" in proc.stdout and "OK: every checked backend" in proc.stdout
    report = json.loads(out.read_text())
    assert report["ok"] is True
    versions = report["versions"]
    assert versions["torch"] == torch.__version__
    assert versions["python"] == sys.version.split()[0]
    assert {"triton", "cuda_available", "gpus", "cuda_extension", "environment"} <= set(versions)
    table = {row["backend"]: row for row in report["backends"]}
    assert set(table) == {"naive", "torch", "triton", "cuda"}
    assert table["torch"]["available"] and table["naive"]["available"]
    for row in table.values():
        assert row["available"] == (row["reason"] is None)
    if not torch.cuda.is_available():
        assert not table["cuda"]["available"] and "CUDA" in table["cuda"]["reason"]
    assert table["triton"]["available"] == (INTERPRET or torch.cuda.is_available())

    rows = report["parity"]
    checked = sorted(b for b, row in table.items() if row["available"] and b != "naive")
    assert sorted({r["backend"] for r in rows}) == checked
    assert all(r["status"] in ("PASS", "SKIP") for r in rows)
    for backend in checked:  # every mode ran in at least one dtype, fp32 always
        for mode in diagnostics.MODES:
            statuses = {r["dtype"]: r["status"] for r in rows if r["backend"] == backend and r["mode"] == mode}
            assert statuses["fp32"] == "PASS"
            assert set(statuses) == set(CLI_DTYPES)
    for r in rows:
        if r["status"] == "PASS":
            assert r["worst"]["ratio"] <= 1.0 and r["tensors"][0]["tensor"] == "loss"
        else:
            assert r["reason"]
    learnable = next(r for r in rows if r["mode"] == "learnable_tau" and r["status"] == "PASS")
    assert "grad temperature" in {t["tensor"] for t in learnable["tensors"]}

    timing = {r["backend"]: r for r in report["timing"]["rows"]}
    assert timing["naive"]["speedup_vs_naive"] == pytest.approx(1.0)
    assert timing["torch"]["ms"] > 0 and timing["torch"]["speedup_vs_naive"] > 0


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        diagnostics.main(["--help"])
    assert exc.value.code == 0
    assert "--json" in capsys.readouterr().out


def _main_json(tmp_path, *args):
    path = tmp_path / "r.json"
    status = diagnostics.main(["--no-timing", "--json", str(path), *args])
    return status, json.loads(path.read_text())


def test_corrupted_torch_backend_exits_1(tmp_path, monkeypatch):
    """A backend whose loss (and so its gradients) is off makes the report fail and the command exit 1."""
    real = diagnostics.fused_info_nce

    def corrupted(*args, backend="auto", **kwargs):
        loss = real(*args, backend=backend, **kwargs)
        return loss * 1.001 if backend == "torch" else loss

    monkeypatch.setattr(diagnostics, "fused_info_nce", corrupted)
    status, report = _main_json(tmp_path, "--backend", "torch", "--mode", "unsup", "--mode", "learnable_tau",
                                "--dtype", "fp32", "--dtype", "fp64")
    assert status == 1 and report["ok"] is False
    assert [r["status"] for r in report["parity"]] == ["FAIL"] * 4
    failed = {t["tensor"] for r in report["parity"] for t in r["tensors"] if not t["ok"]}
    assert {"loss", "grad anchors", "grad temperature"} <= failed


def test_backend_that_raises_is_an_error_row(tmp_path, monkeypatch):
    real = diagnostics.fused_info_nce

    def broken(*args, backend="auto", **kwargs):
        if backend == "torch":
            raise RuntimeError("kernel launch failed")
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(diagnostics, "fused_info_nce", broken)
    status, report = _main_json(tmp_path, "--backend", "torch", "--mode", "unsup", "--dtype", "fp32")
    assert status == 1
    assert report["parity"][0]["status"] == "ERROR" and "kernel launch failed" in report["parity"][0]["reason"]


@pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernels in the interpreter (TRITON_INTERPRET=1)")
def test_corrupted_triton_kernel_exits_1_and_intact_passes(tmp_path, monkeypatch):
    triton_loss = pytest.importorskip("simcse_kernels.ops.triton_loss")
    args = ("--backend", "triton", "--mode", "symmetric", "--dtype", "fp32")
    status, report = _main_json(tmp_path, *args)
    assert status == 0 and [r["status"] for r in report["parity"]] == ["PASS"]
    backward = triton_loss._backward_impl

    def bad_backward(*a):
        d_anc, d_pos, d_neg, d_tau = backward(*a)
        return d_anc, d_pos * 1.05, d_neg, d_tau

    monkeypatch.setattr(triton_loss, "_backward_impl", bad_backward)
    status, report = _main_json(tmp_path, *args)
    assert status == 1
    row = report["parity"][0]
    assert row["status"] == "FAIL" and row["worst"]["tensor"] == "grad positives"
    assert [t["tensor"] for t in row["tensors"] if not t["ok"]] == ["grad positives"]


def test_torch_fp16_parity():
    rows = diagnostics.parity_rows(torch.device("cpu"), ["torch"], ["fp16"], list(diagnostics.MODES))
    assert [r["status"] for r in rows] == ["PASS"] * len(diagnostics.MODES)


@pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernels in the interpreter (TRITON_INTERPRET=1)")
def test_triton_fp16_parity():
    rows = diagnostics.parity_rows(torch.device("cpu"), ["triton"], ["fp16"], list(diagnostics.MODES))
    bad = [(r["mode"], r["worst"]["tensor"], round(r["worst"]["ratio"], 3)) for r in rows if r["status"] != "PASS"]
    assert not bad, f"fp16 rows over the tolerance (mode, tensor, error/allowed): {bad}"


def test_json_path_that_cannot_be_written_is_one_line_exit_2_before_the_check(tmp_path):
    for bad in (tmp_path / "missing" / "report.json", tmp_path, tmp_path / "file.txt" / "report.json"):
        (tmp_path / "file.txt").write_text("x")
        proc = subprocess.run([sys.executable, "-m", "simcse_kernels", "--json", str(bad)], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == ""  # nothing ran: the check never started
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("python -m simcse_kernels: error: --json "), proc.stderr


def test_json_write_failure_after_the_check_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """A path that passes the early check but fails at the write (injected): one line, exit 2."""
    monkeypatch.setattr(diagnostics, "json_path_problem", lambda path: None)
    status = diagnostics.main(["--no-timing", "--backend", "torch", "--mode", "unsup", "--dtype", "fp32",
                               "--json", str(tmp_path / "gone" / "r.json")])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write the report" in err[0]
