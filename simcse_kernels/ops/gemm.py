"""The gradient GEMMs of the fused backends' default (row-chunked, deterministic) backward.

Both fused backends (``"triton"``, ``"cuda"``) write ``∂L/∂s`` of R anchor rows at a time, with the
inverse norms folded in, into an (R, M) buffer of a *storage dtype*, then form the gradients with
two torch GEMMs on the raw features (fp32 accumulation). This module holds the shared pieces:
the choice of that backward over the one-pass atomic one, the storage dtype rule and the GEMM with
fp32 (fp64) accumulation on CUDA and CPU.
"""

from __future__ import annotations

import os

import torch

__all__ = ["accumulate_gemm", "backward_mode_from_env", "ds_storage_dtype"]


def backward_mode_from_env(env_var: str) -> str:
    """``"chunked"`` (default: row chunks of ``∂L/∂s`` and two GEMMs, deterministic) or ``"atomic"``
    (the one-pass backward with fp32 atomics), from the environment variable ``env_var``."""
    mode = os.environ.get(env_var, "chunked")
    if mode not in ("chunked", "atomic"):
        raise ValueError(f"{env_var} must be 'chunked' or 'atomic', got {mode!r}")
    return mode


def ds_storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage (and GEMM operand) dtype of ``∂L/∂s`` for input features of ``dtype``.

    The input dtype, except fp32 for fp16 inputs: bf16 keeps bf16 (tensor-core GEMMs; only ``ds``
    and MixCSE's fp32 mixtures are rounded), fp32/fp64 keep their dtype, and fp16 uses fp32 because
    rounding ``ds`` to fp16 alone exceeded the fp16 gradient tolerance on plain random inputs (the
    fp16 features upcast to fp32 exactly).
    """
    return torch.float32 if dtype == torch.float16 else dtype


def accumulate_gemm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out = a @ b`` (``accumulate``: ``out += a @ b``) with fp32 (fp64) accumulation.

    Args:
        out: (m, n) fp32/fp64, contiguous rows (a row slice of a larger buffer is fine).
        a: (m, k), b: (k, n) in the GEMM dtype (strided views allowed).

    16-bit operands: ``torch.mm``/``torch.addmm`` with ``out_dtype=torch.float32`` on CUDA (cuBLAS
    accumulates in fp32 and writes fp32) and on the meta device (the same call, so a CPU test
    checks its argument forms, shapes and dtypes); on CPU (the interpreter and emulation tests)
    they are upcast to fp32 first (CPU has no ``out_dtype`` kernel). fp32 operands use tf32 only
    when ``torch.backends.cuda.matmul.allow_tf32`` is set (torch's rule).
    """
    if a.dtype in (torch.float16, torch.bfloat16):
        if a.device.type in ("cuda", "meta"):
            if accumulate:
                torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            else:
                torch.mm(a, b, out_dtype=torch.float32, out=out)
            return
        a, b = a.float(), b.float()
    if accumulate:
        torch.addmm(out, a, b, out=out)
    else:
        torch.mm(a, b, out=out)
