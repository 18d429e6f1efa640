"""Margin softmax with a class-weight matrix (issue 21): CosFace fwd+bwd, time and extra peak memory.

    python benchmarks/bench_margin.py --out benchmarks/results/cpu/margin
    python benchmarks/bench_margin.py --n 8 --dim 16 --classes 64 128 --out /tmp/x   # smoke sizes

Providers: ``ours`` (``FusedCosFaceLoss``, backend "torch"), ``naive`` (the same module on the
full-matrix oracle) and ``pml`` (pytorch-metric-learning's ``CosFaceLoss``, skipped with the reason
when not installed). Cut Cross-Entropy is not a provider yet (noted in the results).
Each (provider, C) runs in a fresh process (max RSS is per process): inputs, the class matrix and
its preallocated gradients are created first, then ``extra_peak_mb`` = max RSS after one
forward+backward minus max RSS before it, after a warm-up on 16 classes. Writes ``margin.json``
and ``margin.md`` (with the load average before and after) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

PROVIDERS = ("ours", "pml", "naive")
NOT_RUN = "Cut Cross-Entropy: not run (not installed here; its provider is not written yet)"


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _make_loss(provider: str, classes: int, dim: int, margin: float, scale: float):
    if provider == "pml":
        from pytorch_metric_learning.losses import CosFaceLoss

        return CosFaceLoss(classes, dim, margin=margin, scale=scale)
    from simcse_kernels.integrations.metric_learning import FusedCosFaceLoss

    return FusedCosFaceLoss(classes, dim, margin=margin, scale=scale, backend="torch" if provider == "ours" else "naive")


def run_case(provider: str, n: int, dim: int, classes: int, margin: float, scale: float) -> dict:
    """One forward+backward in this process; returns the result row."""
    import torch

    torch.manual_seed(0)
    warm = _make_loss(provider, 16, dim, margin, scale)
    warm(torch.randn(8, dim, requires_grad=True), torch.arange(8)).backward()
    torch.manual_seed(1)
    loss_fn = _make_loss(provider, classes, dim, margin, scale)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, dim, generator=g, requires_grad=True)
    labels = torch.randint(0, classes, (n,), generator=g)
    loss_fn.W.grad = torch.zeros_like(loss_fn.W)  # gradients preallocated: not counted as extra
    x.grad = torch.zeros_like(x)
    before = _max_rss_mb()
    t0 = time.perf_counter()
    loss = loss_fn(x, labels)
    loss.backward()
    seconds = time.perf_counter() - t0
    return dict(provider=provider, n=n, dim=dim, classes=classes, seconds=round(seconds, 4),
                extra_peak_mb=round(_max_rss_mb() - before, 1), loss=float(loss))


def _subprocess_case(provider: str, args) -> dict:
    cmd = [sys.executable, __file__, "--case", provider, "--n", str(args.n), "--dim", str(args.dim),
           "--classes", str(args.case_classes), "--margin", str(args.margin), "--scale", str(args.scale)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return dict(provider=provider, classes=args.case_classes, skipped=last)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--classes", type=int, nargs="+", default=[65536, 262144, 1048576])
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--margin", type=float, default=0.35)
    parser.add_argument("--scale", type=float, default=64.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--case", choices=PROVIDERS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.n, args.dim, args.classes[0], args.margin, args.scale)))
        return
    load_before = os.getloadavg()
    rows = []
    for classes in args.classes:
        for provider in args.providers:
            args.case_classes = classes
            row = _subprocess_case(provider, args)
            print(json.dumps(row), flush=True)
            rows.append(row)
    load_after = os.getloadavg()
    result = dict(n=args.n, dim=args.dim, margin=args.margin, scale=args.scale, rows=rows, not_run=NOT_RUN,
                  loadavg_before=load_before, loadavg_after=load_after, cpu_count=os.cpu_count())
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "margin.json").write_text(json.dumps(result, indent=1) + "\n")
        lines = [f"CosFace fwd+bwd, N = {args.n}, D = {args.dim}, fp32, CPU ({os.cpu_count()} cores); load "
                 f"average {load_before[0]:.2f} before, {load_after[0]:.2f} after", "",
                 "| C | provider | seconds | extra peak MiB |", "|---|---|---|---|"]
        for row in rows:
            if "skipped" in row:
                lines.append(f"| {row['classes']} | {row['provider']} | skipped: {row['skipped']} | |")
            else:
                lines.append(f"| {row['classes']} | {row['provider']} | {row['seconds']:.3f} | "
                             f"{row['extra_peak_mb']:.0f} |")
        lines += ["", NOT_RUN]
        (args.out / "margin.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
