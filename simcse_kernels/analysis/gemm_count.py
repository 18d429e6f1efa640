r"""Count the GEMM work of one forward+backward of the loss, in GEMM-equivalents, on CPU.

Unit: one similarity GEMM, ``2·N·M·D`` FLOPs, with M every logit column of a row
(``P + K`` candidates, ``+ N`` anchor negatives, ``+ 2N`` MixCSE mixed blocks).

* Backend ``"triton"`` (and ``"triton_atomic"``, the ``SIMCSE_TRITON_BWD=atomic`` backward): the
  kernels run in the Triton interpreter (``TRITON_INTERPRET=1`` must be set before triton is
  imported). Inside :func:`count_flops` the interpreter's ``tl.dot`` (``InterpreterBuilder.
  create_dot``) is wrapped to add ``2·m·n·k`` per call, and ``SIMCSE_TRITON_BLOCKS=cuda`` makes
  ``block_config`` return the block sizes a CUDA device would get, so the count is the one of a
  GPU launch (padding included: use N, M multiples of the blocks and D of ``BLOCK_K``; 16-bit
  inputs: N a multiple of 128, their forward's ``BLOCK_M``). MixCSE's mixed blocks are formed from
  raw input-dtype dots by linearity, so every dtype counts the same (one dot per logit tile).
  The torch matmuls the backend calls inside its custom ops (the default backward's gradient
  GEMMs) are counted by a :class:`~torch.utils.flop_counter.FlopCounterMode` entered inside the
  custom-op bodies (a dispatch mode around the call does not see into a custom op's kernel).
* Backends ``"torch"`` and ``"naive"``: a :class:`~torch.utils.flop_counter.FlopCounterMode`
  around the forward and backward.

Everything is patched inside a context manager and restored on exit. Example::

    count_gemm_equivalents("triton", "unsup", n=128, d=768)   # -> 3.0 + ...
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

#: modes of the GEMM-count table: fused_info_nce options; ``k="n"``: K = N hard negatives;
#: ``learnable_tau``: a temperature tensor that requires grad
MODES: dict[str, dict] = {
    "unsup": dict(),
    "sup_weight": dict(k="n", hard_negative_weight=0.5),
    "mixcse": dict(mix_lambda=0.2),
    "mixcse_sup": dict(k="n", mix_lambda=0.35, hard_negative_weight=0.4),
    "symmetric": dict(symmetric=True),
    "anchor_neg": dict(anchor_negatives=True),
    "learnable_tau": dict(k="n", learnable_tau=True),
    "everything": dict(k="n", symmetric=True, anchor_negatives=True, mix_lambda=0.5, hard_negative_weight=1.0,
                       learnable_tau=True),
    # margins / dot similarity (issue 21): the same tiles, the margins in their epilogues
    "margin_everything": dict(k="n", symmetric=True, anchor_negatives=True, mix_lambda=0.5,
                              hard_negative_weight=1.0, learnable_tau=True, margin=0.2, angular_margin=0.3),
    "dot_margin": dict(k="n", symmetric=True, anchor_negatives=True, hard_negative_weight=0.5,
                       learnable_tau=True, similarity="dot", margin=0.3),
}
#: margin softmax modes (issue 21): the torch backend adds no GEMM for them (the target entry's
#: own gradient is rank-1 per row)
MARGIN_MODES: dict[str, dict] = {
    "cosface": dict(margin=0.35),
    "arcface_sup": dict(k="n", angular_margin=0.5, margin=0.1, hard_negative_weight=0.3, learnable_tau=True),
    "arcface_symmetric": dict(symmetric=True, angular_margin=0.5, anchor_negatives=True),
    "dot_margin": dict(similarity="dot", margin=0.3, learnable_tau=True),
}
_GTE = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
#: sentence-transformers MNRL configurations (issue 22; torch and naive backends): the doc_to_query
#: terms are a column of the query-doc block (no GEMM of their own), doc_to_doc a (P, P + K) block
ST_MODES: dict[str, dict] = {
    "gte": dict(directions=_GTE),
    "gte_hardness": dict(k="n", directions=_GTE, hardness_mode="all_negatives", hardness_strength=5.0,
                         learnable_tau=True),
    "doc_to_query_joint": dict(directions=("query_to_doc", "doc_to_query"), learnable_tau=True),
    "doc_to_doc_hard": dict(k="n", directions=("query_to_doc", "doc_to_doc"), hardness_mode="hard_negatives",
                            hardness_strength=5.0),
    "in_batch_hardness": dict(k="n", hardness_mode="in_batch_negatives", hardness_strength=9.0,
                              similarity="dot"),
    "symmetric_hardness": dict(k="n", directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
                               hardness_mode="all_negatives", hardness_strength=5.0),
}
ISSUE12_MODES = tuple(MODES)
MODES.update(MARGIN_MODES)
MODES.update(ST_MODES)

BACKENDS = ("triton", "triton_atomic", "torch", "naive")


def gemm_bound(backend: str, symmetric: bool) -> float | None:
    """The issue-12 bound of ``backend`` in GEMM-equivalents (None: no bound, e.g. ``"naive"``).

    Fused (``"triton"``): 4, symmetric 5. ``"torch"`` with a scalar loss: 3, symmetric 4.
    """
    bounds = {"triton": (4.0, 5.0), "torch": (3.0, 4.0)}
    if backend not in bounds:
        return None
    return bounds[backend][1 if symmetric else 0]


def logit_columns(n: int, mode: str) -> int:
    """M of ``mode`` for N anchors (= N positives): every logit column of a row that a similarity GEMM
    computes (query-doc P + K, query-query N, MixCSE 2N, doc-doc P + K; the doc_to_query terms are
    columns of the query-doc block, not counted again)."""
    opts = MODES[mode]
    docs = n + (n if opts.get("k") == "n" else 0)
    dirs = opts.get("directions") or ()
    m = docs
    m += n if opts.get("anchor_negatives") or "query_to_query" in dirs else 0
    m += 2 * n if opts.get("mix_lambda") is not None else 0
    m += docs if "doc_to_doc" in dirs else 0
    return m


def flop_counter_mode() -> FlopCounterMode:
    """A quiet :class:`FlopCounterMode` that also counts the in-place ``addmm_``/``baddbmm_``
    (torch's registry only knows the out-of-place ops)."""
    def addmm_(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(a_shape) * b_shape[-1]  # (batch ·) m·k · n

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={aten.addmm_: addmm_, aten.baddbmm_: addmm_})


class _Counter:
    def __init__(self) -> None:
        self.dot_flops = 0
        self.torch_flops = 0


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def _count_triton(counter: _Counter, atomic: bool) -> Iterator[None]:
    """Wrap the interpreter's dot and the Triton custom-op bodies; CUDA block sizes."""
    from triton.runtime import interpreter

    from ..ops import triton_loss

    if not triton_loss._INTERPRETED_AT_IMPORT:
        raise RuntimeError("counting the Triton backend's dots needs TRITON_INTERPRET=1 set before triton is "
                           "imported (the kernels run in the interpreter)")
    builder = interpreter.interpreter_builder
    original_dot = builder.create_dot  # bound method of the shared builder instance

    def counting_dot(a, b, d, *args, **kwargs):
        shape_a, shape_b = a.data.shape, b.data.shape
        batch = math.prod(shape_a[:-2])
        counter.dot_flops += 2 * batch * shape_a[-2] * shape_a[-1] * shape_b[-1]
        return original_dot(a, b, d, *args, **kwargs)

    def in_flop_mode(fn):
        def wrapper(*args, **kwargs):
            with flop_counter_mode() as inner:
                out = fn(*args, **kwargs)
            counter.torch_flops += inner.get_total_flops()
            return out
        return wrapper

    fwd, bwd = triton_loss._forward_impl, triton_loss._backward_impl
    builder.create_dot = counting_dot
    triton_loss._forward_impl, triton_loss._backward_impl = in_flop_mode(fwd), in_flop_mode(bwd)
    try:
        with _env("SIMCSE_TRITON_BLOCKS", "cuda"), _env("SIMCSE_TRITON_BWD", "atomic" if atomic else None):
            yield
    finally:
        triton_loss._forward_impl, triton_loss._backward_impl = fwd, bwd
        del builder.create_dot  # back to the class method


@contextlib.contextmanager
def _meta_row_plan(device_type: str | None) -> Iterator[None]:
    """While active, the ``torch`` backend plans its row chunks on ``meta`` as on ``device_type``."""
    if device_type is None:
        yield
        return
    from ..ops import chunked

    saved = dict(chunked.MAX_ROWS)
    chunked.MAX_ROWS.pop("meta", None)
    if device_type in saved:
        chunked.MAX_ROWS["meta"] = saved[device_type]
    try:
        yield
    finally:
        chunked.MAX_ROWS.clear()
        chunked.MAX_ROWS.update(saved)


def count_flops(backend: str, mode: str, n: int, d: int, dtype: torch.dtype = torch.float32,
                reduction: str = "mean", chunk_budget_mib: float | None = None, seed: int = 0,
                meta_plan_of: str | None = None) -> dict:
    """FLOPs of one forward+backward of ``fused_info_nce`` on CPU (every input requires grad).

    Args:
        backend: "triton", "triton_atomic", "torch" or "naive".
        mode: a key of :data:`MODES`.
        n, d: anchors (= positives, = hard negatives when the mode has them) and dimension.
        dtype: input dtype. reduction: "mean", "sum" or "none" (backward of ``loss.sum()``).
        chunk_budget_mib: the ``chunk_budget_mib`` option (row chunks of the gradient paths).
        meta_plan_of: run on the ``meta`` device (no data, so any N counts instantly; "torch"
            and "naive" only, inputs unchecked) with the row-chunk plan of this device type
            (e.g. "cpu": its row cap), i.e. the work of that device's call at this N.

    Returns:
        ``{"dot_flops", "torch_flops", "total_flops", "unit_flops", "gemm_equiv"}``; ``unit_flops``
        = 2·N·M·D and ``gemm_equiv`` = total / unit.
    """
    from .. import fused_info_nce

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    opts = dict(MODES[mode])
    k = n if opts.pop("k", 0) == "n" else 0
    learnable = opts.pop("learnable_tau", False)
    if meta_plan_of is not None:
        if backend.startswith("triton"):
            raise ValueError("meta_plan_of counts the torch and naive backends only")
        leaves = [torch.empty(rows, d, device="meta", dtype=dtype, requires_grad=True) if rows else None
                  for rows in (n, n, k)]
        tau = torch.tensor(0.05, device="meta", requires_grad=True) if learnable else 0.05
    else:
        gen = torch.Generator().manual_seed(seed)
        a = torch.randn(n, d, generator=gen)
        p = a + 0.5 * torch.randn(n, d, generator=gen)
        neg = torch.randn(k, d, generator=gen) if k else None
        leaves = [t.to(dtype).requires_grad_(True) if t is not None else None for t in (a, p, neg)]
        tau = torch.tensor(0.05, requires_grad=True) if learnable else 0.05
    counter = _Counter()
    ctx = _count_triton(counter, backend == "triton_atomic") if backend.startswith("triton") \
        else _meta_row_plan(meta_plan_of)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threads only add contention (the count does not depend on it)
    try:
        with ctx, flop_counter_mode() as outer:
            loss = fused_info_nce(*leaves, temperature=tau, reduction=reduction,
                                  backend="triton" if backend.startswith("triton") else backend,
                                  chunk_budget_mib=chunk_budget_mib, check_inputs=meta_plan_of is None, **opts)
            loss.sum().backward()
    finally:
        torch.set_num_threads(threads)
    counter.torch_flops += outer.get_total_flops()
    unit = 2 * n * logit_columns(n, mode) * d
    total = counter.dot_flops + counter.torch_flops
    return dict(dot_flops=counter.dot_flops, torch_flops=counter.torch_flops, total_flops=total,
                unit_flops=unit, gemm_equiv=total / unit)


def count_gemm_equivalents(backend: str, mode: str, n: int, d: int, dtype: torch.dtype = torch.float32,
                           **kwargs) -> float:
    """GEMM-equivalents of one forward+backward (see :func:`count_flops` for the arguments)."""
    return count_flops(backend, mode, n, d, dtype, **kwargs)["gemm_equiv"]


def gemm_table(backends=("triton", "torch", "naive"), modes=ISSUE12_MODES, dims=(128, 384, 768, 1024), n: int = 64,
               reduction: str = "mean", dtype: torch.dtype = torch.float32) -> list[dict]:
    """One row per (backend, mode, D): :func:`count_flops` plus the keys backend, mode, n, d, dtype and bound.

    Triton backends are skipped (with ``"skipped"`` set) when the kernels are not interpreted.
    For the benchmark JSON; N = 64 is a multiple of every CUDA block of fp32 inputs.
    """
    rows = []
    for backend in backends:
        for mode in modes:
            for d in dims:
                row = dict(backend=backend, mode=mode, n=n, d=d, reduction=reduction, dtype=str(dtype),
                           bound=gemm_bound(backend, bool(MODES[mode].get("symmetric"))))
                try:
                    row.update(count_flops(backend, mode, n, d, dtype, reduction=reduction))
                except RuntimeError as exc:  # Triton without the interpreter
                    row["skipped"] = str(exc)
                rows.append(row)
    return rows


def _main(argv=None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="GEMM-equivalents of one fwd+bwd per backend, mode and D "
                                     "(run with TRITON_INTERPRET=1 for the Triton backend)")
    parser.add_argument("--backends", nargs="+", default=["triton", "torch", "naive"], choices=BACKENDS)
    parser.add_argument("--modes", nargs="+", default=list(ISSUE12_MODES), choices=list(MODES))
    parser.add_argument("--d", nargs="+", type=int, default=[128, 384, 768, 1024])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--reduction", default="mean", choices=["mean", "sum", "none"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"],
                        help="input dtype (16-bit: use --n 128, a multiple of their CUDA blocks)")
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = gemm_table(args.backends, args.modes, args.d, args.n, args.reduction, getattr(torch, args.dtype))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    header = "| backend | mode | " + " | ".join(f"D = {d}" for d in args.d) + " |"
    print(header)
    print("|" + "---|" * (2 + len(args.d)))
    for backend in args.backends:
        for mode in args.modes:
            cells = [f"{r['gemm_equiv']:.2f}" if "gemm_equiv" in r else "n/a" for r in rows
                     if r["backend"] == backend and r["mode"] == mode]
            print(f"| {backend} | {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    _main()
