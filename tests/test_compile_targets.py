"""Compile checks for sm_80 / sm_90 without a GPU: spills, shared memory, tensor cores.

No GPU has run these kernels, so their GPU properties are checked on the compiler's output:

1. ``compile_targets/capture_launches.py`` (a subprocess without ``TRITON_INTERPRET``) runs the
   real launchers on CPU tensors of real shapes (N = 16384) for the matrix dtype (bf16, fp16,
   fp32) x options (unsup, sup with weight, MixCSE, symmetric, anchor negatives, learnable tau,
   everything at once) x D (384, 768, 1024) x backward path (default, atomic), with
   ``JITFunction.run`` replaced by a recorder that computes the signature, constexprs and
   divisibility attributes a CUDA launch would get (Triton's own specialization code). Identical
   launches are recorded once.
2. ``compile_targets/compile_specs.py`` (no torch) compiles every recorded launch for sm_80 and
   sm_90 and reads registers/spills from ptxas, shared memory from the kernel metadata and the
   tensor-core instructions from the SASS.
3. The tests assert: every compilation succeeds, zero spill bytes, shared memory within the
   arch's per-block limit (sm_80: 163 KiB, sm_90: 227 KiB), and tensor-core MMAs (HGMMA on
   sm_90, HMMA on sm_80) in every kernel with 16-bit dots.

Every spec is compiled by Triton 3.6 too (the version torch 2.11 pins) when ``.venv-triton36``
exists (``.ci/run`` creates it: ``python -m venv .venv-triton36 && .venv-triton36/bin/pip install
'triton==3.6.*'``), and the CUDA extension's ``.cu`` files are compiled with
``nvcc --resource-usage`` for both archs when nvcc is installed (zero spills).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = Path(__file__).resolve().parent / "compile_targets"
ARCHS = (80, 90)
#: maximum shared memory per block (opt-in), bytes
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
#: kernels without tl.dot (memory-bound row kernels)
NO_DOT_KERNELS = {"_inv_norm_kernel", "_norm_bwd_kernel"}
TRITON36_PYTHON = REPO / ".venv-triton36" / "bin" / "python"


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton_cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run(cmd, tmp: Path, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], env=_env(tmp), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    assert proc.returncode == 0, f"{cmd[1]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="session")
def launch_specs(tmp_path_factory) -> Path:
    """JSON of every distinct CUDA launch of the matrix (capture_launches.py)."""
    pytest.importorskip("triton.backends.nvidia", reason="triton's NVIDIA backend is not installed")
    tmp = tmp_path_factory.mktemp("compile_targets")
    out = tmp / "specs.json"
    _run([sys.executable, TOOLS / "capture_launches.py", "--out", out], tmp, timeout=900)
    return out


def _compile_report(python, specs: Path, tmp: Path, extra=()) -> dict:
    out = tmp / "report.json"
    proc = _run([python, TOOLS / "compile_specs.py", specs, "--arch", *ARCHS, "--jobs", "2", "--out", out, *extra],
                tmp, timeout=1500)
    print(proc.stdout)  # the table (pytest -s shows it)
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def report_installed(launch_specs, tmp_path_factory) -> dict:
    """Compile report of the installed Triton (the one the package runs with)."""
    return _compile_report(sys.executable, launch_specs, tmp_path_factory.mktemp("compile_installed"))


@pytest.fixture(scope="session")
def report_triton36(launch_specs, tmp_path_factory) -> dict:
    """Compile report of Triton 3.6 from its own venv (skipped when that venv is absent)."""
    if not TRITON36_PYTHON.exists():
        pytest.skip(f"{TRITON36_PYTHON} does not exist (.ci/run creates it: python -m venv .venv-triton36 "
                    "&& .venv-triton36/bin/pip install 'triton==3.6.*')")
    return _compile_report(TRITON36_PYTHON, launch_specs, tmp_path_factory.mktemp("compile_triton36"))


def _kernel_names_in_source() -> set[str]:
    """Every ``@triton.jit`` function named ``*_kernel`` in the package's Triton modules."""
    names = set()
    for path in (REPO / "simcse_kernels" / "ops").glob("triton_*.py"):
        names |= set(re.findall(r"@triton\.jit[^\n]*\ndef (\w+_kernel)\(", path.read_text()))
    return names


def _problems(report: dict, arch: int) -> list[str]:
    """Human-readable failures of one arch in a compile report (empty: all good)."""
    problems = []
    specs = report["specs"]
    for r in report["results"]:
        if r["arch"] != arch:
            continue
        spec = specs[r["spec"]]
        flags = {k: v for k, v in spec["constexprs"].items() if not k.startswith("BLOCK")}
        what = f"{r['kernel']} {flags} {spec['options']} (e.g. {spec['cases'][0]})"
        if r["error"]:
            problems.append(f"{what}: compile error {r['error'][-500:]}")
            continue
        if r["spill_stores"] is None or r["regs"] is None:
            problems.append(f"{what}: no ptxas -v report for this kernel")
            continue
        if r["spill_stores"] or r["spill_loads"]:
            problems.append(f"{what}: {r['regs']} registers, spills {r['spill_stores']} B stores / "
                            f"{r['spill_loads']} B loads")
        if r["shared"] > SMEM_LIMIT[arch]:
            problems.append(f"{what}: {r['shared']} B shared memory > {SMEM_LIMIT[arch]} B")
        sixteen_bit = any(t in ("*bf16", "*fp16") for t in spec["signature"].values())
        if sixteen_bit and r["kernel"] not in NO_DOT_KERNELS:
            mma = r["hgmma"] if arch == 90 else r["hmma"]
            if mma == 0:
                problems.append(f"{what}: no {'HGMMA' if arch == 90 else 'HMMA'} instruction in the SASS "
                                f"(HGMMA {r['hgmma']}, HMMA {r['hmma']})")
    return problems


# ----------------------------------------------------------------------------------------------
# the capture itself

def test_capture_records_every_kernel_with_cuda_specialization(launch_specs):
    doc = json.loads(launch_specs.read_text())
    launched = {s["kernel"].split(":")[1] for s in doc["launches"]}
    assert launched == _kernel_names_in_source(), "a kernel of the package is never launched by the matrix"
    # what a CUDA launch specializes on: 16-byte aligned pointers and multiple-of-16 ints carry
    # tt.divisibility; the CUDA block configs are used (not the interpreter's 32 x 32 x 128)
    fwd = [s for s in doc["launches"] if s["kernel"].endswith(":_fwd_row_kernel")
           and "bf16/unsup/D768/default" in s["cases"]]
    assert len(fwd) == 1
    spec = fwd[0]
    assert spec["signature"]["a_ptr"] == "*bf16" and spec["signature"]["labels_ptr"] == "*i64"
    assert spec["signature"]["N"] == "i32" and spec["attrs"]["N"] == [["tt.divisibility", 16]]
    assert spec["attrs"]["a_ptr"] == [["tt.divisibility", 16]]
    assert spec["constexprs"]["BLOCK_M"] == 128 and spec["options"]["num_warps"] == 8
    cases = {c for s in doc["launches"] for c in s["cases"]}
    assert len(cases) == 3 * 9 * 3 * 2  # every case of the matrix (dtype x option set x D x path) launched


# ----------------------------------------------------------------------------------------------
# Triton kernels, installed Triton and Triton 3.6

@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_triton_kernels_compile_without_spills(report_installed, arch):
    problems = _problems(report_installed, arch)
    assert not problems, f"triton {report_installed['triton']}, sm_{arch}:\n" + "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_triton36_kernels_compile_without_spills(report_triton36, arch):
    assert report_triton36["triton"].startswith("3.6")
    problems = _problems(report_triton36, arch)
    assert not problems, f"triton {report_triton36['triton']}, sm_{arch}:\n" + "\n".join(problems)


# ----------------------------------------------------------------------------------------------
# CUDA extension (nvcc --resource-usage)

def _setup_helpers() -> dict:
    """``find_nvcc``, ``nvcc_flags`` and ``CU_SOURCES`` of setup.py, without running its ``setup()``."""
    import ast

    source = (REPO / "setup.py").read_text()
    tree = ast.parse(source)
    keep = [node for node in tree.body
            if isinstance(node, (ast.Import, ast.ImportFrom))
            or (isinstance(node, ast.FunctionDef) and node.name in ("find_nvcc", "nvcc_flags"))
            or (isinstance(node, ast.Assign) and any(getattr(t, "id", "") in ("CU_SOURCES", "ROOT")
                                                     for t in node.targets))]
    namespace = {"__file__": str(REPO / "setup.py")}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(REPO / "setup.py"), "exec"), namespace)
    return namespace


def _ptxas_functions(log: str) -> dict[str, dict]:
    """{function: {stack, spill_stores, spill_loads}} from ptxas -v / --resource-usage output."""
    out = {}
    for m in re.finditer(r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads", log):
        out[m.group(1)] = dict(stack=int(m.group(2)), spill_stores=int(m.group(3)), spill_loads=int(m.group(4)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_extension_kernels_compile_without_spills(arch, tmp_path):
    helpers = _setup_helpers()
    nvcc = helpers["find_nvcc"]()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME, PATH, /usr/local/cuda): the CUDA extension is not built here")
    CU_SOURCES, nvcc_flags = helpers["CU_SOURCES"], helpers["nvcc_flags"]
    # the build's flags, one real arch and a cubin only (no host compilation)
    flags = [f for f in nvcc_flags([str(arch)]) if not f.startswith(("arch=", "-gencode"))]
    flags = [f for f in flags if f not in ("-Xcompiler", "-fPIC", "-fvisibility=hidden")]
    problems, functions = [], {}
    for src in CU_SOURCES:
        cmd = [nvcc, *flags, "-I", str(REPO / "csrc"), "-cubin", f"-arch=sm_{arch}", "--resource-usage",
               str(REPO / src), "-o", str(tmp_path / (Path(src).stem + ".cubin"))]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
        found = _ptxas_functions(proc.stdout + proc.stderr)
        functions.update(found)
        problems += [f"{src}: {name}: {v}" for name, v in found.items() if v["spill_stores"] or v["spill_loads"]]
    assert functions, "no kernel found in nvcc's resource usage output"
    assert not problems, f"sm_{arch} spills:\n" + "\n".join(problems)
