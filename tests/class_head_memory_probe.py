"""Peak extra host memory of one class-head forward+backward (issue 21), run in a fresh process.

    python tests/class_head_memory_probe.py --n 512 --classes 1048576 --dim 16 --budget-mib 8

Prints one JSON line: plan (mode, rows, cols), extra_peak_bytes (peak RSS during the call minus
RSS before it, minus the gradients the call must produce: the (C, D) class-weight gradient and the
(N, D) embedding gradient), seconds. The peak is ``VmHWM`` after resetting it through
``/proc/self/clear_refs`` (as ``benchmarks/measure.py``); with ``MALLOC_MMAP_THRESHOLD_`` set by
the caller every large block is its own mapping, so freed memory leaves the RSS.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time

import torch

from simcse_kernels import fused_info_nce
from simcse_kernels.ops.chunked_class_head import class_head_budget_bytes, class_head_plan


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--classes", type=int, default=1 << 20)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--budget-mib", type=float, default=8.0)
    parser.add_argument("--margin", type=float, default=0.35)
    parser.add_argument("--angular-margin", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a fixed BLAS workspace; the test bounds memory, not speed
    g = torch.Generator().manual_seed(0)
    kwargs = dict(margin=args.margin, angular_margin=args.angular_margin, temperature=1 / 64, backend="torch",
                  chunk_budget_mib=args.budget_mib)
    # warm-up on a small problem: the same plan kind, lazy initialization not counted
    w0 = torch.randn(args.classes // 64, args.dim, generator=g, requires_grad=True)
    x0 = torch.randn(args.n, args.dim, generator=g, requires_grad=True)
    fused_info_nce(x0, w0, labels=torch.randint(0, w0.shape[0], (args.n,), generator=g), **kwargs).backward()
    del w0, x0
    weights = torch.randn(args.classes, args.dim, generator=g).requires_grad_(True)
    x = torch.randn(args.n, args.dim, generator=g).requires_grad_(True)
    labels = torch.randint(0, args.classes, (args.n,), generator=g)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_kib("VmRSS")
    start = time.perf_counter()
    loss = fused_info_nce(x, weights, labels=labels, **kwargs)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")
    produced = (weights.numel() + x.numel()) * 4
    assert weights.grad is not None and x.grad is not None
    plan = class_head_plan(args.n, args.classes, 4, class_head_budget_bytes(args.budget_mib))
    print(json.dumps(dict(plan=plan._asdict(), extra_peak_bytes=(peak - base) * 1024 - produced,
                          seconds=round(seconds, 3), loss=float(loss.detach()))))


if __name__ == "__main__":
    main()
