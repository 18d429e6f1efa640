"""Compile recorded Triton launch specs for sm_80 / sm_90 with whatever Triton runs this script.

No torch import and no GPU: the specs come from ``capture_launches.py`` (JSON), the kernels from
the package's source files, loaded without running ``simcse_kernels/__init__.py`` (which imports
torch). So this script runs in a bare venv holding only ``triton`` (e.g. Triton 3.6, the version
torch 2.11 pins) as well as in the main one::

    python tests/compile_targets/compile_specs.py specs.json --arch 80 90 --jobs 2 --out report.json

For each (spec, arch) it calls ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", arch, 32), options={num_warps, num_stages})`` and reports:

* ``regs``, ``spill_stores``, ``spill_loads``, ``stack``: from the ``ptxas -v`` log of that very
  compilation (Triton prints it with ``TRITON_DUMP_PTXAS_LOG=1``; the cache is bypassed with
  ``TRITON_ALWAYS_COMPILE=1`` and a private ``TRITON_CACHE_DIR``);
* ``shared``: bytes of shared memory per block (``kernel.metadata.shared``);
* ``hgmma``, ``hmma``, ``instructions``: counts in the SASS (``cuobjdump -sass`` of the cubin,
  Triton's own cuobjdump): HGMMA is the sm_90 warpgroup tensor-core MMA (wgmma), HMMA the
  warp-level tensor-core MMA of sm_80 (also used on sm_90 when wgmma does not apply);
* ``seconds``: wall time of the compilation; ``error``: the exception text if it failed.

Output JSON: ``{"triton": version, "results": [{"spec": index, "kernel", "arch", ...}, ...]}``;
a table is printed to stdout.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_CACHE = os.environ.get("SIMCSE_COMPILE_SPECS_CACHE")
if _CACHE is None:  # this process owns the cache: removed at exit (workers inherit the variable)
    _CACHE = os.environ["SIMCSE_COMPILE_SPECS_CACHE"] = tempfile.mkdtemp(prefix="simcse_compile_specs_")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["TRITON_CACHE_DIR"] = _CACHE  # private cache: every compile runs ptxas (and logs)
os.environ["TRITON_ALWAYS_COMPILE"] = "1"
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

#: shared memory per block that a kernel may use (opt-in maximum), bytes
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _import_kernel_module(module: str):
    """Import ``simcse_kernels.ops.<x>`` from the source tree without running the package __init__."""
    for pkg, path in (("simcse_kernels", REPO / "simcse_kernels"),
                      ("simcse_kernels.ops", REPO / "simcse_kernels" / "ops")):
        if pkg not in sys.modules:
            stub = types.ModuleType(pkg)
            stub.__path__ = [str(path)]
            sys.modules[pkg] = stub
    return importlib.import_module(module)


def _kernel(qualified: str):
    module, name = qualified.split(":")
    return getattr(_import_kernel_module(module), name)


def _constexpr(value):
    if isinstance(value, dict) and set(value) == {"tl_dtype"}:
        return tl.dtype(value["tl_dtype"])
    return value


def _sass_counts(cubin: bytes) -> dict:
    """HGMMA / HMMA / all-instruction counts of a cubin's SASS (cuobjdump -sass)."""
    from triton.backends.nvidia import __file__ as nv_init

    cuobjdump = Path(nv_init).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", dir=_CACHE, delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run([str(cuobjdump), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)
    instr = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/\s", line)]
    return dict(hgmma=sum("HGMMA" in line for line in instr), hmma=sum("HMMA" in line for line in instr),
                instructions=len(instr))


def _parse_ptxas(log: str, name: str) -> dict:
    """Registers, spills and stack frame of kernel ``name`` from a ``ptxas -v`` log."""
    out = dict(regs=None, spill_stores=None, spill_loads=None, stack=None)
    m = re.search(r"Function properties for " + re.escape(name) + r"\s*\n\s*(\d+) bytes stack frame, "
                  r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        out.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
    m = re.search(r"Compiling entry function '" + re.escape(name) + r"'.*?Used (\d+) registers", log, re.S)
    if m is None:
        m = re.search(r"Used (\d+) registers", log)
    if m:
        out["regs"] = int(m.group(1))
    return out


def compile_one(spec: dict, arch: int) -> dict:
    """Compile one spec for ``sm_<arch>``; returns its metrics (see the module docstring)."""
    start = time.perf_counter()
    log = io.StringIO()
    try:  # (a spec that no longer matches the kernel's arguments is reported as an error too)
        fn = _kernel(spec["kernel"])
        constexprs = {k: _constexpr(v) for k, v in spec["constexprs"].items()}
        attrs = {(fn.arg_names.index(k),): [tuple(a) for a in v] for k, v in spec["attrs"].items()}
        src = ASTSource(fn, dict(spec["signature"]), constexprs, attrs)
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec["options"]))
    except Exception as exc:  # reported, not raised: the caller asserts on it
        return dict(error=f"{type(exc).__name__}: {exc}"[-3000:], seconds=time.perf_counter() - start)
    result = dict(_parse_ptxas(log.getvalue(), kernel.name), shared=int(kernel.metadata.shared),
                  seconds=time.perf_counter() - start, error=None)
    result.update(_sass_counts(kernel.asm["cubin"]))
    return result


def _task(args):
    index, spec, arch = args
    result = compile_one(spec, arch)
    return dict(spec=index, kernel=spec["kernel"].split(":")[1], arch=arch, **result)


def _cost(spec: dict) -> int:
    """Rough compile-cost order (big dot kernels first, for load balance)."""
    name = spec["kernel"]
    return 0 if "norm" in name else 1 + sum(bool(v) for v in spec["constexprs"].values() if v is True)


def compile_specs(specs: list[dict], archs, jobs: int = 2) -> list[dict]:
    """Compile every spec for every arch (``jobs`` processes); results in (spec, arch) order."""
    tasks = sorted(((i, s, a) for i, s in enumerate(specs) for a in archs), key=lambda t: -_cost(t[1]))
    if jobs <= 1:
        results = [_task(t) for t in tasks]
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(_task, tasks))
    return sorted(results, key=lambda r: (r["spec"], r["arch"]))


def format_table(specs: list[dict], results: list[dict]) -> str:
    """A markdown table: one row per (spec, arch)."""
    lines = ["| # | kernel | flags | warps/stages | arch | regs | spill st/ld (B) | smem (KiB) | HGMMA | HMMA "
             "| instr | s |", "|" + "---|" * 12]
    for r in results:
        spec = specs[r["spec"]]
        flags = ",".join(k for k, v in spec["constexprs"].items() if v is True)
        blocks = "x".join(str(spec["constexprs"][k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_DO")
                          if k in spec["constexprs"])
        dtypes = sorted({v for v in spec["signature"].values() if v.startswith("*")})
        opts = spec["options"]
        if r["error"]:
            lines.append(f"| {r['spec']} | {r['kernel']} | {flags} | | sm_{r['arch']} | ERROR: "
                         f"{r['error'].splitlines()[0][:80]} |||||||")
            continue
        lines.append(f"| {r['spec']} | {r['kernel']} {blocks} {'/'.join(d[1:] for d in dtypes)} | {flags} | "
                     f"{opts['num_warps']}/{opts['num_stages']} | sm_{r['arch']} | {r['regs']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['shared'] / 1024:.1f} | {r['hgmma']} | "
                     f"{r['hmma']} | {r['instructions']} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("specs", help="JSON written by capture_launches.py")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default=None, help="regex on kernel names: compile only those")
    parser.add_argument("--dtypes", default=None,
                        help="comma list of input dtypes (bf16,fp16,fp32): only specs launched by those cases")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    specs = json.loads(Path(args.specs).read_text())["launches"]
    selected = [s for s in specs if args.only is None or re.search(args.only, s["kernel"])]
    if args.dtypes:
        wanted = set(args.dtypes.split(","))
        selected = [s for s in selected if any(c.split("/")[0] in wanted for c in s.get("cases", []))]
    start = time.perf_counter()
    results = compile_specs(selected, args.arch, args.jobs)
    report = dict(triton=triton.__version__, seconds=time.perf_counter() - start, specs=selected,
                  results=results)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(format_table(selected, results))
    print(f"triton {triton.__version__}: {len(results)} compilations in {report['seconds']:.1f} s "
          f"({args.jobs} jobs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
