"""The chunked backend never builds the N x N matrix: peak host memory stays far below it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("memory_probe.py")


def run_probe(backend: str, n: int, dim: int) -> dict:
    out = subprocess.run([sys.executable, str(PROBE), "--backend", backend, "--n", str(n), "--dim", str(dim)],
                         check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_chunked_peak_memory_far_below_full_matrix():
    n, dim = 16384, 256
    full_matrix_mb = n * n * 4 / 2**20  # one fp32 N x N matrix: 1024 MiB
    result = run_probe("torch", n, dim)
    # inputs + grads + normalized copies are ~100 MiB; chunks are 16384 x 128 fp32 (8 MiB) each
    assert result["extra_peak_mb"] < 400, result
    assert result["extra_peak_mb"] < full_matrix_mb / 2.5, result
