"""One-line and structured descriptions of the environment (versions, the CUDA extension, the GPU).

A leaf module: it imports nothing else of the package beyond its version, so the self-check's error
messages and the diagnostics can both use it without an import cycle.
"""

from __future__ import annotations

import sys

import torch

from . import __version__


def cuda_ext_info() -> dict:
    """Whether ``simcse_kernels._cuda_ext`` is built, for which archs and CUDA version."""
    try:
        import simcse_kernels._cuda_ext as ext
    except ImportError as exc:
        return dict(built=False, error=f"{type(exc).__name__}: {exc}")
    version = int(ext.cuda_version())
    status = ext.runtime_status()
    return dict(built=True, archs=ext.CUDA_ARCHS, cuda_version=f"{version // 1000}.{version % 1000 // 10}",
                runtime_status=status or "ok: the extension's CUDA runtime sees a usable GPU")


def short_environment(device: torch.device | str) -> str:
    """One line of versions and the GPU of ``device`` (for warnings and errors)."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    parts = [f"torch {torch.__version__} (CUDA {torch.version.cuda})", f"triton {triton_version}",
             f"python {sys.version.split()[0]}", f"simcse_kernels {__version__}"]
    ext = cuda_ext_info()
    parts.append(f"_cuda_ext CUDA {ext['cuda_version']} sm {ext['archs']}" if ext["built"] else "_cuda_ext not built")
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        parts.append(f"GPU {torch.cuda.get_device_name(index)} (sm_{major}{minor})")
    else:
        parts.append(f"device {device}")
    return ", ".join(parts)
