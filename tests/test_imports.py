"""Every module of the package imports on its own, in a fresh interpreter (no import cycle).

A cycle such as functional -> selfcheck -> diagnostics -> functional only fails when the first
import enters it in the middle, so each module is imported first, with no module of the package loaded.
"""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import simcse_kernels

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(simcse_kernels.__path__, "simcse_kernels.")
                 if not m.name.startswith("simcse_kernels._cuda_ext"))


#: run in one fresh interpreter: for each module, forget every simcse_kernels module, then import it first
#: (torch and the other third-party modules stay loaded, so each import costs only the package's own code)
IMPORT_EACH_FIRST = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "simcse_kernels" or m.startswith("simcse_kernels.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_first_with_the_package_unloaded():
    assert "simcse_kernels.environment" in MODULES and "simcse_kernels.selfcheck" in MODULES
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", IMPORT_EACH_FIRST, *MODULES], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_environment_module_is_a_leaf():
    """simcse_kernels.environment imports nothing of the package but its version (checked in a fresh process)."""
    code = ("import sys, simcse_kernels.environment as e; "
            "print(sorted(m for m in sys.modules if m.startswith('simcse_kernels.')))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "simcse_kernels.environment" in out
    src = (ROOT / "simcse_kernels" / "environment.py").read_text()
    assert [line for line in src.splitlines() if line.startswith("from .")] == ["from . import __version__"]
