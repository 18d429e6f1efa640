"""Run every kernel of the CUDA extension once on small odd shapes (for compute-sanitizer).

Usage on a GPU machine (not collected by pytest), once per backward::

    compute-sanitizer --tool memcheck python tests/cuda_memcheck_case.py
    compute-sanitizer --tool racecheck python tests/cuda_memcheck_case.py
    SIMCSE_CUDA_BWD=atomic compute-sanitizer --tool memcheck python tests/cuda_memcheck_case.py
    SIMCSE_CUDA_BWD=atomic compute-sanitizer --tool racecheck python tests/cuda_memcheck_case.py

Covers, for float32, float16 and bfloat16: row_inv_norms, lse_partials with every pattern (none,
hard, self, mix3, mix4) and the transposed positives block (symmetric), target_cos,
normalize_backward, and the backward kernels: block_dlogits (default: row and column softmax,
target columns) or, with ``SIMCSE_CUDA_BWD=atomic``, block_backward and target_backward; shapes
not multiples of the 64-row tile or of 32 in D, with M > N. Exits non-zero if anything fails or
is not finite.
"""

from __future__ import annotations

import sys

import torch

from simcse_kernels import fused_info_nce
from simcse_kernels.ops.cuda_loss import unavailable_reason


def run_case(dtype: torch.dtype, n: int, d: int, k: int, n_pos: int) -> float:
    """Forward + backward with every option on; returns the loss."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, d, generator=g).to("cuda", dtype).requires_grad_(True)
    p = torch.randn(n_pos, d, generator=g).to("cuda", dtype).requires_grad_(True)
    neg = torch.randn(k, d, generator=g).to("cuda", dtype).requires_grad_(True)
    tau = torch.tensor(0.05, device="cuda", requires_grad=True)
    if n_pos == n:  # MixCSE needs P == N
        loss = fused_info_nce(a, p, neg, temperature=tau, hard_negative_weight=0.5, symmetric=True,
                              anchor_negatives=True, mix_lambda=0.3, backend="cuda")
    else:
        labels = torch.arange(n, device="cuda") * 2 % n_pos
        loss = fused_info_nce(a, p, neg, temperature=tau, hard_negative_weight=0.5, symmetric=True,
                              anchor_negatives=True, labels=labels, backend="cuda")
    loss.backward()
    torch.cuda.synchronize()
    for name, t in (("loss", loss), ("anchors", a.grad), ("positives", p.grad), ("negatives", neg.grad),
                    ("temperature", tau.grad)):
        if t is None or not torch.isfinite(t.float()).all():
            raise RuntimeError(f"{dtype} n={n} d={d}: {name} is missing or not finite")
    return float(loss)


def main() -> int:
    reason = unavailable_reason(torch.device("cuda"))
    if reason is not None:
        print(f"cannot run: {reason}")
        return 2
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n, d, k, n_pos in ((7, 100, 7, 7), (70, 33, 70, 70), (5, 40, 130, 90)):
            loss = run_case(dtype, n, d, k, n_pos)
            print(f"{str(dtype):15s} n={n:3d} d={d:3d} k={k:3d} p={n_pos:3d} loss={loss:.6f}")
    print("all kernels ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
