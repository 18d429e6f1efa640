"""Margin softmax with a class-weight matrix (issue 21): CosFace fwd+bwd, time and extra peak memory.

    python benchmarks/bench_margin.py --out benchmarks/results/cpu/margin
    python benchmarks/bench_margin.py --n 8 --dim 16 --classes 64 128 --out /tmp/x   # smoke sizes

Providers (every one gets embeddings (N, D), class ids (N,) and its own class matrix of C x D):

* ``ours``: ``FusedCosFaceLoss`` (backend "torch": the class-head path, ``ops/chunked_class_head.py``).
* ``pml``: pytorch-metric-learning's ``CosFaceLoss``.
* ``naive``: ``FusedCosFaceLoss`` on the full-matrix oracle (backend "naive").
* ``cce``: Cut Cross-Entropy's ``linear_cross_entropy(F.normalize(x) / tau, F.normalize(W), labels,
  impl=...)``: ``"torch_compile"`` on CPU, its Triton kernels (``"cce"``) with ``--device cuda``;
  the same cosine logits, but without the margin (CCE has no margin option), so its loss differs.

Extra peak memory, the same for every provider: in a fresh process whose allocator returns freed
blocks to the OS (``MALLOC_MMAP_THRESHOLD_``, as ``benchmarks/measure.py``), after a warm-up on
a small C and with the inputs, the class matrix and its parameters created, the peak RSS
(``VmHWM``, reset through ``/proc/self/clear_refs``) during one forward+backward minus the RSS
before it, minus the gradients every provider must produce (the class matrix's C x D and the
embeddings' N x D, fp32): memory beyond the unavoidable outputs (``--device cuda``: the allocator's
peak, ``torch.cuda.max_memory_allocated``, minus the memory allocated before, minus the same
gradients; the time after a device sync). A provider whose estimated
memory exceeds ``--max-gib`` is skipped with the reason (the box is shared). Writes
``margin.json`` and ``margin.md`` (with the load average before and after) to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROVIDERS = ("ours", "pml", "naive", "cce")
LABELS = {
    "ours": "ours (FusedCosFaceLoss, torch)",
    "pml": "PML CosFaceLoss",
    "naive": "naive (full logit matrix)",
    "cce": "Cut Cross-Entropy (no margin)",
}
DEFINITION = ("extra peak memory = peak RSS during one forward+backward minus the RSS before it, minus the "
              "gradients every provider must produce (class matrix C x D and embeddings N x D, fp32); one fresh "
              "process per case, freed blocks returned to the OS (MALLOC_MMAP_THRESHOLD_=65536), peak reset "
              "through /proc/self/clear_refs after a warm-up on 4096 classes")
#: classes of the warm-up run (compilation, lazy initialization)
WARMUP_CLASSES = 4096
#: logit matrices (N x C fp32) that a full-matrix provider holds at its peak, for the skip estimate
#: (measured at C = 262144: PML 4.8, naive 3.5; CCE's compiled graph is taken as PML's)
FULL_MATRIX_COPIES = {"pml": 5, "naive": 4, "cce": 5}


def estimated_gib(provider: str, n: int, dim: int, classes: int) -> float:
    """A conservative estimate of a case's peak memory (inputs included), in GiB."""
    inputs = 3 * classes * dim * 4  # the class matrix, its gradient, a normalized copy
    logits = FULL_MATRIX_COPIES.get(provider, 0) * n * classes * 4
    return (inputs + logits) / 2**30


def _loss_fn(provider: str, classes: int, dim: int, margin: float, scale: float, device: str = "cpu"):
    """(module holding the class matrix, on ``device``; fn(x, labels) -> loss)."""
    import torch

    if provider == "pml":
        from pytorch_metric_learning.losses import CosFaceLoss

        mod = CosFaceLoss(classes, dim, margin=margin, scale=scale).to(device)
        return mod, mod
    if provider == "cce":
        import torch.nn.functional as F
        from cut_cross_entropy import linear_cross_entropy

        mod = torch.nn.Module()
        mod.W = torch.nn.Parameter(torch.randn(classes, dim, device=device))
        impl = "cce" if device == "cuda" else "torch_compile"

        def cce(x, labels):
            return linear_cross_entropy(F.normalize(x, dim=1) * scale, F.normalize(mod.W, dim=1), labels,
                                        impl=impl)

        return mod, cce
    from simcse_kernels.integrations.metric_learning import FusedCosFaceLoss

    mod = FusedCosFaceLoss(classes, dim, margin=margin, scale=scale,
                           backend="torch" if provider == "ours" else "naive").to(device)
    return mod, mod


def run_case(provider: str, n: int, dim: int, classes: int, margin: float, scale: float,
             device: str = "cpu") -> dict:
    """One forward+backward in this process (see the module docstring); returns the result row."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import measure  # noqa: PLC0415  (benchmarks/ helpers: one CPU memory method)

    torch.manual_seed(0)
    dev = torch.device(device)
    mod, fn = _loss_fn(provider, WARMUP_CLASSES, dim, margin, scale, device)
    x = torch.randn(n, dim, device=dev, requires_grad=True)
    fn(x, torch.randint(0, WARMUP_CLASSES, (n,), device=dev)).backward()
    del mod, fn, x
    torch.manual_seed(1)
    mod, fn = _loss_fn(provider, classes, dim, margin, scale, device)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, dim, generator=g).to(dev).requires_grad_(True)
    labels = torch.randint(0, classes, (n,), generator=g).to(dev)
    measure.free_memory(dev, collect=True)
    if dev.type == "cuda":
        measure.sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        measure._malloc_trim()
        if not measure._reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
        base = measure._status_kib("VmRSS") * 1024
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    loss = fn(x, labels)
    loss.backward()
    measure.sync(dev)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else measure._status_kib("VmHWM") * 1024
    weight = next(p for p in mod.parameters())
    if weight.grad is None or x.grad is None:
        raise RuntimeError("a gradient is missing")
    produced = (weight.grad.numel() * weight.grad.element_size() + x.grad.numel() * x.grad.element_size())
    extra = peak - base - produced
    return dict(provider=provider, device=device, n=n, dim=dim, classes=classes, seconds=round(seconds, 3),
                extra_peak_mb=round(extra / 2**20, 1), loss=float(loss), loadavg_at_start=load)


def _unavailable(provider: str) -> str | None:
    module = {"pml": "pytorch_metric_learning", "cce": "cut_cross_entropy"}.get(provider)
    if module and importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    return None


def _subprocess_case(provider: str, classes: int, args) -> dict:
    skip = _unavailable(provider)
    if skip is None and estimated_gib(provider, args.n, args.dim, classes) > args.max_gib:
        skip = (f"estimated {estimated_gib(provider, args.n, args.dim, classes):.1f} GiB > --max-gib "
                f"{args.max_gib:g} (the box's 24 GiB are shared)")
    if skip:
        return dict(provider=provider, classes=classes, skipped=skip)
    cmd = [sys.executable, __file__, "--case", provider, "--n", str(args.n), "--dim", str(args.dim),
           "--classes", str(classes), "--margin", str(args.margin), "--scale", str(args.scale), "--device",
           args.device]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(provider=provider, classes=classes, skipped=f"timed out after {args.timeout:.0f} s")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return dict(provider=provider, classes=classes, skipped=f"failed: {last}"[:300])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _markdown(result: dict) -> str:
    lb, la = result["loadavg_before"], result["loadavg_after"]
    where = "CUDA" if result["device"] == "cuda" else f"CPU ({result['cpu_count']} cores, shared with other jobs)"
    lines = [f"CosFace fwd+bwd with a class-weight matrix, N = {result['n']}, D = {result['dim']}, margin "
             f"{result['margin']}, scale {result['scale']:g}, fp32, {where}; load average {lb[0]:.2f} before, "
             f"{la[0]:.2f} after the run.", "",
             f"Definition: {DEFINITION}" + (" (CUDA: the allocator's peak instead of the RSS)." if result["device"]
                                            == "cuda" else "."), "",
             "| C | provider | seconds | time / PML | extra peak MiB | PML's extra / this | loss | load at start |",
             "|---|---|---|---|---|---|---|---|"]
    for classes in result["classes"]:
        rows = [r for r in result["rows"] if r["classes"] == classes]
        pml = next((r for r in rows if r["provider"] == "pml" and "skipped" not in r), None)
        for r in rows:
            if "skipped" in r:
                lines.append(f"| {classes} | {LABELS[r['provider']]} | skipped: {r['skipped']} | | | | | |")
                continue
            t_ratio = f"{r['seconds'] / pml['seconds']:.2f}x" if pml else "n/a"
            m_ratio = f"{pml['extra_peak_mb'] / r['extra_peak_mb']:.1f}x" if pml and r["extra_peak_mb"] > 0 else "n/a"
            lines.append(f"| {classes} | {LABELS[r['provider']]} | {r['seconds']:.2f} | {t_ratio} | "
                         f"{r['extra_peak_mb']:.0f} | {m_ratio} | {r['loss']:.4f} | {r['loadavg_at_start']:.1f} |")
    impl = "its Triton kernels (impl='cce')" if result["device"] == "cuda" else (
        "impl='torch_compile' (its Triton kernels are GPU-only: --device cuda)")
    lines += ["", "Cut Cross-Entropy has no margin: its loss is the plain softmax cross-entropy over the same "
              f"cosine logits (lower than CosFace's); {impl}.",
              "The times are single runs on a shared 2-core machine: the load column says how busy it was."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--classes", type=int, nargs="+", default=[65536, 262144, 1048576])
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--margin", type=float, default=0.35)
    parser.add_argument("--scale", type=float, default=64.0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--max-gib", type=float, default=8.0, help="skip a case estimated above this")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--case", choices=PROVIDERS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.n, args.dim, args.classes[0], args.margin, args.scale,
                                  args.device)))
        return
    load_before = os.getloadavg()
    rows = []
    for classes in args.classes:
        for provider in args.providers:
            row = _subprocess_case(provider, classes, args)
            print(json.dumps(row), flush=True)
            rows.append(row)
            # written after every case: a run stopped by a time limit keeps what it measured
            result = dict(device=args.device, n=args.n, dim=args.dim, margin=args.margin, scale=args.scale,
                          classes=args.classes, rows=rows, definition=DEFINITION, loadavg_before=load_before,
                          loadavg_after=os.getloadavg(), cpu_count=os.cpu_count())
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "margin.json").write_text(json.dumps(result, indent=1) + "\n")
                (args.out / "margin.md").write_text(_markdown(result))


if __name__ == "__main__":
    main()
