"""The machine's achievable matmul throughput: a large square ``torch.matmul`` per dtype.

This is the ceiling to read the loss benchmark's TFLOP/s against (``2 * n^3`` FLOP per matmul).

    python benchmarks/matmul_peak.py --device cuda --size 8192 --out DIR   # bf16, fp16, tf32, fp32
    python benchmarks/matmul_peak.py --device cpu --size 1024
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402


def matmul_tflops(n: int, dtype: torch.dtype, device: torch.device, seconds: float, tf32: bool = False) -> dict:
    """Median TFLOP/s of ``(n, n) @ (n, n)`` in ``dtype``.

    Args:
        n: matrix size; dtype: operand dtype; device: where; seconds: target timed seconds;
        tf32: allow TF32 tensor cores for fp32 (GPU).
    """
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        fn = lambda: torch.matmul(a, b)
        _, first = measure.timed_once(fn, device)
        _, once = measure.timed_once(fn, device)
        calls = int(max(3, min(200, seconds / max(once, 1e-6))))
        stats = measure.summarize(measure.time_calls(fn, device, calls))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    flop = 2.0 * n**3
    return dict(n=n, dtype=str(dtype).split(".")[-1] + ("(tf32)" if tf32 else ""), calls=stats["n_samples"],
                time_ms_median=stats["time_ms_median"], tflops_median=flop / stats["time_ms_median"] / 1e9,
                tflops_best=flop / stats["time_ms_min"] / 1e9)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=None, help="n (default 8192 GPU, 1024 CPU)")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per dtype")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="folder for matmul_peak.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n = args.size or (8192 if gpu else 1024)
    cases = ([(torch.bfloat16, False), (torch.float16, False), (torch.float32, True), (torch.float32, False)]
             if gpu else [(torch.float32, False)])
    label = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    rows = [matmul_tflops(n, dt, device, args.seconds, tf32) for dt, tf32 in cases]
    print(f"# matmul peak on {label}")
    for r in rows:
        print(f"{r['dtype']:<14} n={r['n']:<6} median {r['time_ms_median']:9.3f} ms  "
              f"{r['tflops_median']:9.3f} TFLOP/s (best {r['tflops_best']:.3f})")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "matmul_peak.json").write_text(json.dumps(dict(device=label, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
