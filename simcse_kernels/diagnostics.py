"""``python -m simcse_kernels``: what this machine runs, and whether it runs it right.

In the spirit of ``python -m torch.utils.collect_env``, :func:`main` prints

1. versions: Python, torch (and the CUDA/HIP it was built with), triton, the CUDA driver, each GPU's
   name and compute capability, whether the CUDA extension ``simcse_kernels._cuda_ext`` is built, for
   which archs and CUDA version, and the ``SIMCSE_*`` / ``TRITON_INTERPRET`` environment;
2. every backend, and why it is unavailable where it is;
3. a parity table: every available backend against the float64 ``naive`` oracle for each mode
   (unsup, sup with a hard-negative weight, symmetric, anchor negatives, MixCSE, learnable tau) and
   each dtype the backend supports on the device — the worst error of the loss and of every
   gradient against the test suite's tolerance (:mod:`simcse_kernels.tolerances`), PASS/FAIL;
4. a short timing table (forward + backward, unsup, speed-up vs naive): N = 4096, D = 768 in bf16
   on a GPU; N = 1024, D = 256 in fp32 on a CPU (the Triton interpreter is left out of it: it is a
   test tool, not a speed).

The exit status is 1 when any parity row fails (or errors), else 0; ``--json PATH`` writes the whole
report. The first-use self-check (:mod:`simcse_kernels.selfcheck`) is suspended while this runs so
that the raw backends are measured.

On a CPU with ``TRITON_INTERPRET=1`` the Triton backend is checked on the small parity shapes in
every dtype but bf16 (the interpreter's ``tl.dot`` multiplies the uint16 bits of bf16 operands).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import torch

from . import __version__
from .backends import unavailable_reason
from .environment import cuda_ext_info, short_environment  # noqa: F401 - short_environment re-exported
from .functional import fused_info_nce
from .options import InfoNCEOptions
from .tolerances import compare_loss_and_grads, temperature_grad_floor, weighted_backward

BACKENDS = ("naive", "torch", "triton", "cuda")
#: the parity modes: loss options; "k": "n" adds N hard negatives, "learnable": a tau tensor with grad
MODES = {
    "unsup": dict(),
    "sup_weighted": dict(k="n", hard_negative_weight=0.5),
    "symmetric": dict(symmetric=True),
    "anchor_negatives": dict(anchor_negatives=True),
    "mixcse": dict(mix_lambda=0.2),
    "learnable_tau": dict(k="n", learnable=True),
}
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: (N, D) of the parity inputs: not multiples of the tile sizes, so the masked edges run too
PARITY_SHAPE = {"cuda": (509, 768), "cpu": (45, 80)}
TIMING_SHAPE = {"cuda": (4096, 768, "bf16"), "cpu": (1024, 256, "fp32")}
TEMPERATURE = 0.05


# ----------------------------------------------------------------------------------------------
# versions

def _driver_versions() -> dict:
    out = {}
    get = getattr(torch._C, "_cuda_getDriverVersion", None)
    if get is not None and torch.cuda.is_available():
        try:
            v = int(get())
            out["cuda_driver_api"] = f"{v // 1000}.{v % 1000 // 10}"
        except Exception as exc:  # noqa: BLE001 - report, do not fail
            out["cuda_driver_api"] = f"unknown ({exc})"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            proc = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=20)
            out["nvidia_driver"] = proc.stdout.strip().splitlines()[0] if proc.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError) as exc:
            out["nvidia_driver"] = f"unknown ({exc})"
    return out


def collect_versions() -> dict:
    """Versions of Python, torch, triton, CUDA (runtime, driver, extension) and the GPUs."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError as exc:
        triton_version = f"not installed ({exc})"
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(dict(index=i, name=props.name, capability=f"{props.major}.{props.minor}",
                             memory_gib=round(props.total_memory / 2**30, 1),
                             multiprocessors=props.multi_processor_count))
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("SIMCSE_") or k == "TRITON_INTERPRET"}
    return dict(
        simcse_kernels=__version__, python=sys.version.split()[0], platform=platform.platform(),
        torch=torch.__version__, torch_cuda=torch.version.cuda, torch_hip=getattr(torch.version, "hip", None),
        triton=triton_version, cuda_available=torch.cuda.is_available(), gpus=gpus, **_driver_versions(),
        cuda_extension=cuda_ext_info(), environment=env)


def backend_table(device: torch.device) -> list[dict]:
    """``[{backend, available, reason}]`` for every backend on ``device``."""
    rows = []
    for backend in BACKENDS:
        reason = unavailable_reason(backend, device)
        rows.append(dict(backend=backend, available=reason is None, reason=reason))
    return rows


# ----------------------------------------------------------------------------------------------
# parity

def make_inputs(n: int, d: int, k: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Random anchors (n, d), positives (n, d) correlated with them, negatives (k, d) or None.

    The correlation is weak (cos(a_i, p_i) ~ 0.3, logit ~ 6 at tau = 0.05 against in-batch logits of
    spread ~ 20/sqrt(D)), so the softmax is not saturated: the loss is O(1) and the gradients are above
    the tolerances' round-off floors, and a wrong gradient cannot hide below them.
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    p = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.3 * a
    neg = torch.randn(k, d, generator=g, dtype=torch.float64) if k else None
    return tuple(None if t is None else t.to(device=device, dtype=dtype) for t in (a, p, neg))


def _loss_and_grads(backend: str, tensors, tau, options: dict):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fused_info_nce(*leaves, temperature=tau, backend=backend, **options)
    weighted_backward(loss)
    grads = [None if leaf is None else leaf.grad for leaf in leaves]
    grads.append(tau.grad if isinstance(tau, torch.Tensor) else None)
    return loss.detach(), grads


def _skip_reason(backend: str, dtype: torch.dtype, device: torch.device) -> str | None:
    if backend == "cuda" and dtype == torch.float64:
        return "the CUDA extension's kernels support fp32, fp16 and bf16 (fp64 runs on the torch backend)"
    if backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
        return "the Triton interpreter multiplies the uint16 bits of bf16 operands in tl.dot (checked on GPUs)"
    return None


def parity_rows(device: torch.device, backends: list[str], dtypes: list[str], modes: list[str],
                shape: tuple[int, int] | None = None) -> list[dict]:
    """Each backend x mode x dtype against the float64 naive oracle on the same inputs.

    Args:
        device: where to run.
        backends: available backends to check (``naive`` is the reference and is not listed).
        dtypes: keys of :data:`DTYPES`; modes: keys of :data:`MODES`.
        shape: (N, D); default :data:`PARITY_SHAPE` of the device type.

    Returns:
        Rows ``dict(backend, mode, dtype, status, worst, tensors, reason)``; status PASS, FAIL,
        ERROR (the backend raised) or SKIP (combination not supported, with the reason).
    """
    n, d = shape or PARITY_SHAPE["cuda" if device.type == "cuda" else "cpu"]
    rows = []
    for mode in modes:
        opts = dict(MODES[mode])
        k = n if opts.pop("k", 0) == "n" else 0
        learnable = opts.pop("learnable", False)
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            tensors = make_inputs(n, d, k, dtype, device, seed=len(rows) + 1)
            cdt = torch.float64 if dtype == torch.float64 else torch.float32
            tau64 = (torch.tensor(TEMPERATURE, dtype=torch.float64, device=device, requires_grad=True)
                     if learnable else TEMPERATURE)
            to64 = [None if t is None else t.double() for t in tensors]
            expected = _loss_and_grads("naive", to64, tau64, opts)
            tau_floor_value = (temperature_grad_floor(*to64, None, InfoNCEOptions(temperature=TEMPERATURE, **opts))
                        if learnable else None)
            for backend in backends:
                row = dict(backend=backend, mode=mode, dtype=dtype_name, n=n, d=d, k=k)
                reason = _skip_reason(backend, dtype, device)
                if reason:
                    rows.append(dict(row, status="SKIP", reason=reason))
                    continue
                tau = (torch.tensor(TEMPERATURE, dtype=cdt, device=device, requires_grad=True)
                       if learnable else TEMPERATURE)
                try:
                    actual = _loss_and_grads(backend, tensors, tau, opts)
                except Exception as exc:  # noqa: BLE001 - a broken backend is a report row
                    rows.append(dict(row, status="ERROR", reason=f"{type(exc).__name__}: {exc}"))
                    continue
                tensor_rows = compare_loss_and_grads(actual, expected, tensors, dtype, TEMPERATURE,
                                                     opts.get("reduction", "mean"), tau_floor=tau_floor_value)
                worst = max(tensor_rows, key=lambda r: r["ratio"])
                rows.append(dict(row, status="PASS" if all(r["ok"] for r in tensor_rows) else "FAIL",
                                 worst=worst, tensors=tensor_rows))
    return rows


# ----------------------------------------------------------------------------------------------
# timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timing_rows(device: torch.device, backends: list[str], reps: int | None = None) -> dict:
    """Forward + backward time of the unsup loss per backend, and the speed-up vs ``naive``.

    Args:
        device: where to run; the shape and dtype are :data:`TIMING_SHAPE` of its type.
        backends: available backends (``naive`` first is added if missing).
        reps: timed repetitions after one warm-up (median reported); default 10 on CUDA, 3 on CPU.

    Returns:
        ``dict(n, d, dtype, device, rows=[dict(backend, ms, speedup_vs_naive) or dict(backend, skipped)])``.
    """
    kind = "cuda" if device.type == "cuda" else "cpu"
    n, d, dtype_name = TIMING_SHAPE[kind]
    reps = reps or (10 if kind == "cuda" else 3)
    a, p, _ = make_inputs(n, d, 0, DTYPES[dtype_name], device, seed=123)
    order = ["naive"] + [b for b in backends if b != "naive"]
    rows = []
    for backend in order:
        if backend == "triton" and device.type == "cpu":
            rows.append(dict(backend=backend, skipped="TRITON_INTERPRET=1 runs the kernels as interpreted Python (a test tool, not a speed)"))
            continue
        times = []
        try:
            for i in range(reps + 1):
                a_ = a.detach().requires_grad_(True)
                p_ = p.detach().requires_grad_(True)
                _sync(device)
                start = time.perf_counter()
                fused_info_nce(a_, p_, temperature=TEMPERATURE, backend=backend, check_inputs=False).backward()
                _sync(device)
                if i:
                    times.append(time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(backend=backend, skipped=f"{type(exc).__name__}: {exc}"))
            continue
        rows.append(dict(backend=backend, ms=1e3 * statistics.median(times)))
    base = next((r["ms"] for r in rows if r["backend"] == "naive" and "ms" in r), None)
    for r in rows:
        if "ms" in r and base:
            r["speedup_vs_naive"] = base / r["ms"]
    return dict(n=n, d=d, dtype=dtype_name, device=str(device), reps=reps, rows=rows)


# ----------------------------------------------------------------------------------------------
# report

def build_report(device: torch.device | str | None = None, *, backends: list[str] | None = None,
                 dtypes: list[str] | None = None, modes: list[str] | None = None, timing: bool = True) -> dict:
    """The whole report as a dict (see the module docstring); ``report["ok"]`` is False on a mismatch.

    Args:
        device: default "cuda" if a GPU is available, else "cpu".
        backends: restrict the parity/timing runs to these (available ones only).
        dtypes: restrict the parity dtypes (keys of :data:`DTYPES`); modes: the parity modes.
        timing: run the timing table.
    """
    from .selfcheck import mode as selfcheck_mode
    from .selfcheck import suspended

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    table = backend_table(device)
    available = [r["backend"] for r in table if r["available"]]
    chosen = [b for b in available if b != "naive" and (backends is None or b in backends)]
    report = dict(device=str(device), versions=collect_versions(), backends=table,
                  selfcheck_mode=selfcheck_mode())
    start = time.perf_counter()
    with suspended():
        report["parity"] = parity_rows(device, chosen, dtypes or list(DTYPES), modes or list(MODES))
        report["parity_seconds"] = time.perf_counter() - start
        if timing:
            report["timing"] = timing_rows(device, [b for b in available if backends is None or b in backends])
        else:
            report["timing"] = dict(skipped="--no-timing")
    report["ok"] = all(r["status"] in ("PASS", "SKIP") for r in report["parity"])
    return report


def _fmt(x: float) -> str:
    return "inf" if x == float("inf") else f"{x:.2e}"


def format_report(report: dict) -> str:
    """The report as text tables."""
    v = report["versions"]
    lines = [f"simcse_kernels {v['simcse_kernels']} diagnostics on {report['device']}", "", "== versions"]
    lines.append(f"python {v['python']} ({v['platform']})")
    lines.append(f"torch {v['torch']} (CUDA {v['torch_cuda']}, HIP {v['torch_hip']}); triton {v['triton']}")
    lines.append(f"CUDA available: {v['cuda_available']}; driver: CUDA API {v.get('cuda_driver_api', 'n/a')}, "
                 f"nvidia-smi {v.get('nvidia_driver', 'n/a')}")
    for gpu in v["gpus"]:
        lines.append(f"GPU {gpu['index']}: {gpu['name']}, compute capability {gpu['capability']}, "
                     f"{gpu['memory_gib']} GiB, {gpu['multiprocessors']} SMs")
    ext = v["cuda_extension"]
    if ext["built"]:
        lines.append(f"_cuda_ext: built for sm {ext['archs']} with CUDA {ext['cuda_version']}; runtime: "
                     f"{ext['runtime_status']}")
    else:
        lines.append(f"_cuda_ext: not built ({ext['error']})")
    lines.append(f"environment: {v['environment'] or '(no SIMCSE_* / TRITON_INTERPRET set)'}; "
                 f"first-use self-check: {report['selfcheck_mode']}")
    lines += ["", "== backends"]
    for row in report["backends"]:
        lines.append(f"{row['backend']:<7} {'available' if row['available'] else 'unavailable: ' + row['reason']}")
    lines += ["", "== parity vs float64 naive (worst element: tensor: |error|, allowed error, error/allowed)"]
    lines.append(f"{'backend':<8}{'mode':<18}{'dtype':<6}{'N':>5}{'D':>5}  {'status':<6} worst")
    for r in report["parity"]:
        head = f"{r['backend']:<8}{r['mode']:<18}{r['dtype']:<6}{r['n']:>5}{r['d']:>5}  {r['status']:<6} "
        if "worst" in r:
            w = r["worst"]
            tail = f"{w['tensor']}: {_fmt(w['err'])}, {_fmt(w['allowed'])}, {w['ratio']:.3g}"
            if w.get("note"):
                tail += f" [{w['note']}]"
        else:
            tail = r.get("reason", "")
        lines.append(head + tail)
    timing = report["timing"]
    lines.append("")
    if "rows" in timing:
        lines.append(f"== timing: unsup forward+backward, N={timing['n']}, D={timing['d']}, {timing['dtype']}, "
                     f"{timing['device']}, median of {timing['reps']}")
        for r in timing["rows"]:
            if "ms" in r:
                speed = f"{r['speedup_vs_naive']:.2f}x vs naive" if "speedup_vs_naive" in r else ""
                lines.append(f"{r['backend']:<8}{r['ms']:>10.2f} ms  {speed}")
            else:
                lines.append(f"{r['backend']:<8}skipped: {r['skipped']}")
    else:
        lines.append(f"== timing: skipped ({timing['skipped']})")
    n_bad = sum(r["status"] in ("FAIL", "ERROR") for r in report["parity"])
    lines += ["", "OK: every checked backend matches the float64 oracle" if report["ok"] else
              f"MISMATCH: {n_bad} parity row(s) failed; please report it with --json report.json attached"]
    return "\n".join(lines)


def json_path_problem(path: str) -> str | None:
    """Why the report cannot be written to ``path`` (checked before the run), or None."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "is a directory"
    if not os.path.isdir(parent):
        return f"the folder {parent} does not exist" if not os.path.exists(parent) else f"{parent} is not a folder"
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            return "the file is not writable"
    elif not os.access(parent, os.W_OK | os.X_OK):
        return f"the folder {parent} is not writable"
    return None


def main(argv: list[str] | None = None) -> int:
    """Command-line entry (``python -m simcse_kernels``); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m simcse_kernels",
        description="simcse_kernels diagnostics: versions, backends, parity of every backend against the "
                    "float64 oracle, and a short timing. Exit status 1 on any parity mismatch.")
    parser.add_argument("--json", metavar="PATH", help="also write the whole report as JSON to PATH")
    parser.add_argument("--device", help="device to check (default: cuda if available, else cpu)")
    parser.add_argument("--backend", action="append", choices=[b for b in BACKENDS if b != "naive"],
                        help="check only this backend (repeatable; default: every available one)")
    parser.add_argument("--dtype", action="append", choices=list(DTYPES), help="parity dtype (repeatable)")
    parser.add_argument("--mode", action="append", choices=list(MODES), help="parity mode (repeatable)")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing table")
    args = parser.parse_args(argv)
    if args.json:
        problem = json_path_problem(args.json)
        if problem:
            print(f"{parser.prog}: error: --json {args.json}: {problem}", file=sys.stderr)
            return 2  # before the check runs
    report = build_report(args.device, backends=args.backend, dtypes=args.dtype, modes=args.mode,
                          timing=not args.no_timing)
    print(format_report(report))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2, default=str)
        except OSError as exc:
            print(f"{parser.prog}: error: --json {args.json}: cannot write the report: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"report written to {args.json}")
    return 0 if report["ok"] else 1
