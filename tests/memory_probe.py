"""Peak extra host memory (max RSS) of one loss forward+backward, run in a fresh process.

    python tests/memory_probe.py --backend torch --n 16384 --dim 256

Prints one JSON line: backend, n, dim, extra_peak_mb (max RSS during the call minus max RSS
before it, inputs already allocated), seconds (forward+backward wall time).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from simcse_kernels import fused_info_nce


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    # warm up the code path on a tiny problem so lazy library loading is not counted
    tiny = torch.randn(8, args.dim, generator=g, requires_grad=True)
    fused_info_nce(tiny, tiny.detach() + 0.1, backend=args.backend).backward()
    a = torch.randn(args.n, args.dim, generator=g, requires_grad=True)
    p = torch.randn(args.n, args.dim, generator=g, requires_grad=True)
    before = max_rss_mb()
    start = time.perf_counter()
    loss = fused_info_nce(a, p, backend=args.backend)
    loss.backward()
    seconds = time.perf_counter() - start
    extra = max_rss_mb() - before
    print(json.dumps(dict(backend=args.backend, n=args.n, dim=args.dim, extra_peak_mb=round(extra, 1),
                          seconds=round(seconds, 3), loss=float(loss.detach()))))


if __name__ == "__main__":
    main()
