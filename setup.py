"""Build of the optional CUDA extension ``simcse_kernels._cuda_ext`` (metadata: pyproject.toml).

The ``.cu`` kernels in ``csrc/`` are pure CUDA (no torch headers: the CPU wheel of torch has no
CUDA headers or libraries, so ``torch.utils.cpp_extension.CUDAExtension`` cannot link against it).
They are compiled by nvcc into object files (with ninja when it is available, in parallel), then
linked with the pybind11 bindings ``csrc/api.cpp`` and the static CUDA runtime into one module
that depends on no CUDA shared library (the driver is loaded lazily at the first CUDA call).

Environment:
    SIMCSE_KERNELS_BUILD_CUDA   "0": never build (pure-Python install); "1": build and fail loudly
                                if nvcc is missing or the build fails; unset/"auto": build when nvcc
                                is found, warn and stay pure Python if that build fails.
    SIMCSE_KERNELS_CUDA_ARCHS   semicolon list of SM versions, default "80;90" (sm_80+ needed for
                                the bf16 tensor-core tiles; PTX of the last one is embedded too).
    CUDA_HOME / CUDA_PATH       the CUDA toolkit, else the one of ``nvcc`` on PATH, else /usr/local/cuda.
    MAX_JOBS                    parallel nvcc jobs under ninja (default: CPU count).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CU_SOURCES = ["csrc/block_forward.cu", "csrc/block_backward.cu", "csrc/block_dlogits.cu", "csrc/rowwise.cu",
              "csrc/runtime.cu"]
CU_HEADERS = ["csrc/common.cuh", "csrc/tile.cuh", "csrc/launchers.h"]
EXT_NAME = "simcse_kernels._cuda_ext"


def build_mode() -> str:
    """"off", "force" or "auto" from SIMCSE_KERNELS_BUILD_CUDA."""
    value = os.environ.get("SIMCSE_KERNELS_BUILD_CUDA", "auto").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    if value in ("1", "true", "yes", "on", "force"):
        return "force"
    if value in ("", "auto"):
        return "auto"
    raise ValueError(f"SIMCSE_KERNELS_BUILD_CUDA must be 0, 1 or auto, got {value!r}")


def cuda_archs() -> list[str]:
    """SM versions to compile for, e.g. ["80", "90"]."""
    raw = os.environ.get("SIMCSE_KERNELS_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    for arch in archs:
        if not arch.isdigit():
            raise ValueError(f"SIMCSE_KERNELS_CUDA_ARCHS entries must be SM numbers like 80 or 90, got {arch!r}")
    if not archs:
        raise ValueError("SIMCSE_KERNELS_CUDA_ARCHS is empty")
    return archs


def find_nvcc() -> str | None:
    """Path of nvcc: $CUDA_HOME/bin, then PATH, then /usr/local/cuda/bin."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(env)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def cudart_library_dir(nvcc: str) -> str:
    """The directory holding libcudart_static.a for this nvcc."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), str(Path(nvcc).resolve().parents[1])]
    # nvcc may be a wrapper script (exec /path/to/cuda/bin/nvcc): ask it where its toolkit lives.
    try:
        out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True, check=False)
        for line in (out.stdout + out.stderr).splitlines():
            if "TOP=" in line:
                homes.append(line.split("TOP=", 1)[1].strip().strip('"'))
    except OSError:
        pass
    homes.append("/usr/local/cuda")
    for home in filter(None, homes):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            if (Path(home) / sub / "libcudart_static.a").is_file():
                return str(Path(home) / sub)
    raise RuntimeError(f"libcudart_static.a not found for {nvcc}; set CUDA_HOME to the CUDA toolkit")


def nvcc_flags(archs: list[str]) -> list[str]:
    flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
             "--expt-relaxed-constexpr", "-lineinfo"]
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer GPUs
    return flags


def find_ninja() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # the PyPI package ships the binary

        path = Path(ninja.BIN_DIR) / "ninja"
        return str(path) if path.is_file() else None
    except ImportError:
        return None


class CudaBuildExt(build_ext):
    """build_ext that first compiles csrc/*.cu with nvcc and links the objects into the module."""

    def build_extension(self, ext):
        if ext.name != EXT_NAME:
            return super().build_extension(ext)
        try:
            self._compile_cuda(ext)
            super().build_extension(ext)
        except Exception as exc:
            if build_mode() == "force":
                raise
            print(f"\nWARNING: building the CUDA extension {EXT_NAME} failed ({exc}); installing without it. "
                  "Set SIMCSE_KERNELS_BUILD_CUDA=1 to make this an error.\n", file=sys.stderr)

    def _compile_cuda(self, ext):
        nvcc = ext.nvcc
        archs = cuda_archs()
        obj_dir = Path(self.build_temp).resolve() / "cuda_objects"
        obj_dir.mkdir(parents=True, exist_ok=True)
        flags = nvcc_flags(archs) + ["-I", str(ROOT / "csrc")]
        objects = [obj_dir / (Path(src).stem + ".o") for src in CU_SOURCES]
        ninja = find_ninja()
        if ninja:
            self._ninja_compile(ninja, nvcc, flags, objects, obj_dir)
        else:
            for src, obj in zip(CU_SOURCES, objects):
                cmd = [nvcc, *flags, "-c", str(ROOT / src), "-o", str(obj)]
                print(" ".join(shlex.quote(c) for c in cmd))
                subprocess.run(cmd, check=True)
        ext.extra_objects = [str(o) for o in objects]
        ext.library_dirs = [cudart_library_dir(nvcc)]
        ext.libraries = ["cudart_static", "dl", "rt", "pthread"]
        ext.define_macros = [("SIMCSE_CUDA_ARCHS", f'"{";".join(archs)}"')]

    def _ninja_compile(self, ninja, nvcc, flags, objects, obj_dir):
        depends = " ".join(str(ROOT / h) for h in CU_HEADERS)
        lines = [
            "ninja_required_version = 1.3",
            f"nvcc = {nvcc}",
            f"flags = {' '.join(shlex.quote(f) for f in flags)}",
            "rule nvcc",
            "  command = $nvcc $flags -c $in -o $out",
            "  description = nvcc $in",
        ]
        for src, obj in zip(CU_SOURCES, objects):
            lines.append(f"build {obj}: nvcc {ROOT / src} | {depends}")
        (obj_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([ninja, "-C", str(obj_dir), "-j", jobs, "-v"], check=True)


def extensions() -> list:
    mode = build_mode()
    if mode == "off":
        return []
    nvcc = find_nvcc()
    if nvcc is None:
        if mode == "force":
            raise RuntimeError("SIMCSE_KERNELS_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        print(f"note: nvcc not found; {EXT_NAME} is not built (pure-Python install)", file=sys.stderr)
        return []
    from pybind11.setup_helpers import Pybind11Extension  # a build requirement (pyproject.toml)

    ext = Pybind11Extension(EXT_NAME, ["csrc/api.cpp"], include_dirs=["csrc"], cxx_std=17)
    ext.nvcc = nvcc
    return [ext]


setup(ext_modules=extensions(), cmdclass={"build_ext": CudaBuildExt})
