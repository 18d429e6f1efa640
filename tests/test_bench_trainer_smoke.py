"""Smoke test of the trainer throughput benchmark at a tiny size (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_trainer.py"


def test_bench_trainer_tiny_cpu(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--batch", "8", "--steps", "1",
                    "--warmup", "1", "--search_max", "32", "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True, timeout=600)
    result = json.loads((tmp_path / "bench_trainer_cpu_tiny.json").read_text())
    rows = {r["mode"]: r for r in result["rows"]}
    assert set(rows) == {"no_cache", "grad_cache"}
    for row in rows.values():
        assert row["largest_batch"] >= 8
        assert any(k.startswith("sent") and row[k] > 0 for k in row), row
    assert (tmp_path / "bench_trainer_cpu_tiny.csv").read_text().count("\n") == 3
