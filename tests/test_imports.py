"""Every module of the package imports on its own, in a fresh interpreter (no import cycle).

A cycle such as functional -> selfcheck -> diagnostics -> functional only fails when the first
import enters it in the middle, so each module is imported first, alone, in its own process.
"""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import simcse_kernels

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(simcse_kernels.__path__, "simcse_kernels.")
                 if not m.name.startswith("simcse_kernels._cuda_ext"))


def _import_alone(name: str) -> tuple[str, int, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    return name, proc.returncode, proc.stderr[-2000:]


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_process():
    assert "simcse_kernels.environment" in MODULES and "simcse_kernels.selfcheck" in MODULES
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_import_alone, MODULES))
    failed = [f"{name}: {err}" for name, rc, err in results if rc != 0]
    assert not failed, "\n".join(failed)


def test_environment_module_is_a_leaf():
    """simcse_kernels.environment imports nothing of the package but its version (checked in a fresh process)."""
    code = ("import sys, simcse_kernels.environment as e; "
            "print(sorted(m for m in sys.modules if m.startswith('simcse_kernels.')))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "simcse_kernels.environment" in out
    src = (ROOT / "simcse_kernels" / "environment.py").read_text()
    assert [line for line in src.splitlines() if line.startswith("from .")] == ["from . import __version__"]
