"""Backend "cuda" (the CUDA C++ extension, csrc/): build, bindings, availability, fake ops, parity.

On CPU: the extension was built when nvcc is available, its pybind11 argument checks raise clear
errors, "cuda" reports why it cannot run, the custom ops' fake implementations give the right
shapes, and the kernels themselves — compiled as C++ against a host emulation of CUDA
(csrc/emulation/) — match the float64 oracle through the whole backend. With a GPU (@pytest.mark.cuda): loss and every gradient against the float64 oracle for
every option, dtype and odd shape, torch.compile, and a large bf16 batch.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import (
    MARGIN_OPTION_SETS,
    OPTION_SETS,
    assert_backend_matches_reference,
    loss_and_grads,
    make_inputs,
    make_margin_inputs,
    split_option_set,
)

import simcse_kernels.backends as backends
from simcse_kernels import BackendUnavailableError, fused_info_nce
from simcse_kernels.ops import cuda_loss

ROOT = Path(__file__).resolve().parents[1]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]



def _nvcc_available() -> bool:
    for env in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(env)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return True
    return shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").is_file()


def _extension_or_skip():
    ext, error = cuda_loss._load_extension()
    if ext is None:
        pytest.skip(f"simcse_kernels._cuda_ext is not built here ({error})")
    return ext


def _gpu_usable(ext) -> bool:
    return torch.cuda.is_available() and ext.runtime_status() == ""


# ---------------------------------------------------------------------------------------------
# CPU: build, bindings, availability, fake implementations
# ---------------------------------------------------------------------------------------------


def test_extension_built_when_nvcc_is_available():
    if os.environ.get("SIMCSE_KERNELS_BUILD_CUDA", "auto").strip().lower() in ("0", "false", "no", "off"):
        pytest.skip("SIMCSE_KERNELS_BUILD_CUDA=0: the extension is deliberately not built")
    if not _nvcc_available():
        pytest.skip("nvcc is not available, so the install is pure Python")
    ext = importlib.import_module("simcse_kernels._cuda_ext")  # fails (not skips) if the build was lost
    assert ext.cuda_version() >= 11000
    archs = [a for a in ext.CUDA_ARCHS.split(";") if a]
    assert archs and all(a.isdigit() for a in archs)
    assert (ext.DTYPE_FLOAT32, ext.DTYPE_FLOAT16, ext.DTYPE_BFLOAT16) == (0, 1, 2)
    assert cuda_loss.DTYPE_CODES == {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    assert cuda_loss.PATTERN == {"none": ext.PATTERN_NONE, "hard": ext.PATTERN_HARD, "self": ext.PATTERN_SELF,
                                 "mix3": ext.PATTERN_MIX3, "mix4": ext.PATTERN_MIX4}


def _valid_lse_args():
    """Arguments of lse_partials that pass every check (fake but aligned pointers)."""
    rows = (4096, 2, 7, 100, 8192)
    cols = (12288, 2, 9, 100, 16384)
    return dict(rows=rows, cols=cols, dim=100, tau=20480, weight=0.0, pattern=0, n_splits=1, out=24576, device=0,
                stream=0)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(rows=(4096, 5, 7, 100, 8192)), r"rows dtype code must be 0 \(float32\), 1 \(float16\) or 2"),
        (dict(dim=0), r"dim \(D\) must be >= 1, got 0"),
        (dict(rows=(0, 2, 7, 100, 8192)), r"rows\.data is a null pointer"),
        (dict(cols=(12288, 2, 9, 100, 0)), r"cols\.inv_norm is a null pointer"),
        (dict(rows=(4097, 2, 7, 100, 8192)), r"rows\.data pointer 0x1001 is not aligned to 2 bytes"),
        (dict(rows=(4096, 2, 7, 99, 8192)), r"rows row stride must be >= dim \(100\), got 99"),
        (dict(rows=(4096, 2, 0, 100, 8192)), r"rows rows must be in \[1, "),
        (dict(rows=(4096, 1, 7, 100, 8192)), r"rows and cols dtypes must match or one must be float32"),
        (dict(pattern=7), r"pattern must be 0 \(none\), 1 \(hard\), 2 \(self\), 3 \(mix3\) or 4 \(mix4\), got 7"),
        (dict(pattern=3), r"MixCSE patterns need as many rows as columns, got 7 and 9"),
        (dict(n_splits=0), r"n_splits must be in \[1, 65535\], got 0"),
        (dict(tau=0), r"tau is a null pointer"),
        (dict(out=24578), r"out pointer 0x6002 is not aligned to 4 bytes"),
        (dict(device=-1), r"device index must be >= 0, got -1"),
    ],
)
def test_lse_partials_argument_checks(change, match):
    ext = _extension_or_skip()
    args = _valid_lse_args()
    args.update(change)
    with pytest.raises(ValueError, match=r"simcse_kernels\._cuda_ext\.lse_partials: " + match):
        ext.lse_partials(**args)


def test_other_bindings_check_their_arguments():
    ext = _extension_or_skip()
    x = (4096, 0, 7, 100, 8192)
    with pytest.raises(ValueError, match=r"row_inv_norms: out is a null pointer"):
        ext.row_inv_norms(x, 100, 0, 0, 0)
    with pytest.raises(ValueError, match=r"block_backward: col_lse and col_weight must both be given or both be 0"):
        ext.block_backward(x, x, 100, 256, 0.0, 0, 512, 768, 1024, 0, 0, 0, 2048, 1, 0, 0)
    with pytest.raises(ValueError, match=r"block_backward: dtau_acc pointer 0x804 is not aligned to 8 bytes"):
        ext.block_backward(x, x, 100, 256, 0.0, 0, 512, 768, 0, 0, 0, 0, 2052, 1, 0, 0)
    half = (4096, 1, 7, 100, 8192)
    with pytest.raises(ValueError, match=r"target_cos: anchors, positives and negatives must share one dtype code"):
        ext.target_cos(x, half, (0, 0, 0, 100, 0), 100, 512, 768, 0, 0)
    with pytest.raises(ValueError, match=r"target_backward: grad_n is a null pointer"):
        ext.target_backward(x, x, x, 100, 512, 768, 1024, 2048, 0, 0, 0)
    with pytest.raises(ValueError, match=r"normalize_backward: dz is a null pointer"):
        ext.normalize_backward(x, 100, 0, 256, 512, 0, 0)
    with pytest.raises(TypeError):  # a negative pointer is not a uintptr_t
        ext.row_inv_norms(x, 100, -4, 0, 0)


def test_launch_without_gpu_raises_runtime_error_not_crash():
    ext = _extension_or_skip()
    if _gpu_usable(ext):
        pytest.skip("a GPU is usable here: a launch on the fake pointers of this test would touch bad memory")
    status = ext.runtime_status()
    assert "no usable GPU" in status or "found no GPU" in status
    with pytest.raises(RuntimeError, match=r"lse_partials: CUDA launch failed \(cuda"):
        ext.lse_partials(**_valid_lse_args())


def test_unavailable_on_cpu_with_a_clear_reason():
    reason = cuda_loss.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "runs on CUDA devices only" in reason
    a, p, _ = make_inputs(4, 16)
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is unavailable on cpu: .*CUDA devices only"):
        fused_info_nce(a, p, backend="cuda")


def test_unavailable_reason_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    reason = cuda_loss.unavailable_reason(torch.device("cuda"))
    assert reason is not None
    ext, _ = cuda_loss._load_extension()
    expected = "not built" if ext is None else "no CUDA GPU is available to torch"
    assert expected in reason


def test_arch_support_rule():
    assert cuda_loss._arch_supported(8, 0, "80;90")
    assert cuda_loss._arch_supported(8, 9, "80;90")  # sm_80 cubin runs on 8.x
    assert cuda_loss._arch_supported(9, 0, "80;90")
    assert cuda_loss._arch_supported(10, 0, "80;90")  # compute_90 PTX JIT
    assert not cuda_loss._arch_supported(7, 5, "80;90")


def test_split_count():
    assert cuda_loss.n_splits(1, 1, 132) == 1
    assert cuda_loss.n_splits(8192, 8192, 132) == 3  # 128 row tiles: ~2 CTAs per SM
    assert cuda_loss.n_splits(7, 10_000, 132) == 157  # one row tile: every column tile its own CTA
    assert cuda_loss.n_splits(7, 10_000_000, 132) == 264


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option_set", ["unsup", "hard_neg", "everything"])
def test_fake_ops_give_shapes_and_dtypes(dtype, option_set):
    """The custom ops' fake implementations on the meta device, through the autograd Function."""
    n, p_rows, d = 5, 9, 7
    k, opts = split_option_set(option_set, n)
    meta = dict(device="meta")
    a = torch.empty(n, d, dtype=dtype, requires_grad=True, **meta)
    p = torch.empty(p_rows, d, dtype=dtype, requires_grad=True, **meta)
    neg = torch.empty(k, d, dtype=dtype, requires_grad=True, **meta) if k else None
    tau = torch.empty((), requires_grad=True, **meta)
    labels = torch.empty(n, dtype=torch.int64, **meta)
    mixing = opts.get("mix_lambda") is not None
    mix3 = torch.empty(n, d, **meta) if mixing else None
    mix4 = torch.empty(n, d, **meta) if mixing else None
    symmetric = opts.get("symmetric", False)
    lse, col_lse, target_cos = torch.ops.simcse_kernels.cuda_info_nce_forward(
        a, p, neg, mix3, mix4, tau, labels, float(opts.get("hard_negative_weight", 0.0)),
        opts.get("anchor_negatives", False), symmetric)
    assert (lse.shape, col_lse.shape, target_cos.shape) == ((n,), (p_rows if symmetric else 0,), (n,))
    assert {lse.dtype, col_lse.dtype, target_cos.dtype} == {torch.float32}
    loss = cuda_loss.CudaInfoNCEFunction.apply(a, p, neg, mix3, mix4, tau, labels,
                                               float(opts.get("hard_negative_weight", 0.0)),
                                               opts.get("anchor_negatives", False), symmetric)
    assert loss.shape == (n,) and loss.dtype == torch.float32
    loss.sum().backward()
    for leaf in (a, p, neg):
        if leaf is not None:
            assert leaf.grad.shape == leaf.shape and leaf.grad.dtype == dtype
    assert tau.grad.shape == () and tau.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# CPU: the real kernels on a host emulation of CUDA (float32 FMA tiles; WMMA needs a GPU)
# ---------------------------------------------------------------------------------------------


def _cuda_include_dir() -> Path | None:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parents[1]))
    homes.append("/usr/local/cuda")
    for home in filter(None, homes):
        if (Path(home) / "include" / "cuda_fp16.h").is_file():
            return Path(home) / "include"
    return None


@pytest.fixture(scope="session")
def emulated_extension(tmp_path_factory):
    """csrc/*.cu compiled by g++ with csrc/emulation/emu.h: each CTA runs as 256 CPU threads."""
    import pybind11

    cxx = shutil.which(os.environ.get("CXX", "g++"))
    include = _cuda_include_dir()
    if cxx is None or include is None:
        pytest.skip("the kernel emulation needs a C++20 compiler and the CUDA headers (cuda_fp16.h)")
    out = tmp_path_factory.mktemp("emulated_cuda_ext")
    flags = ["-O1", "-fPIC", f"-I{include}", f"-I{ROOT / 'csrc'}", f"-I{pybind11.get_include()}",
             f"-I{sysconfig.get_paths()['include']}"]
    emu = ROOT / "csrc" / "emulation"
    sources = sorted((ROOT / "csrc").glob("*.cu"))  # every kernel file of the extension (setup.py's CU_SOURCES)
    jobs = [[cxx, "-std=c++20", *flags, "-x", "c++", "-include", str(emu / "emu.h"), "-c", str(src),
             "-o", str(out / (src.name + ".o"))] for src in sources]
    jobs.append([cxx, "-std=c++20", *flags, "-c", str(emu / "stubs.cpp"), "-o", str(out / "stubs.o")])
    jobs.append([cxx, "-std=c++17", *flags, "-fvisibility=hidden", '-DSIMCSE_CUDA_ARCHS="emulated"', "-c",
                 str(ROOT / "csrc" / "api.cpp"), "-o", str(out / "api.o")])
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True), jobs))
    for cmd, res in zip(jobs, results):
        if res.returncode != 0:
            if "barrier" in res.stderr and "No such file" in res.stderr:
                pytest.skip(f"{cxx} lacks C++20 <barrier>")
            raise AssertionError(f"emulated build failed: {' '.join(cmd)}\n{res.stderr[-4000:]}")
    target = out / ("_cuda_ext" + sysconfig.get_config_var("EXT_SUFFIX"))
    objects = sorted(str(p) for p in out.glob("*.o"))
    subprocess.run([cxx, "-shared", "-o", str(target), *objects, "-lpthread"], check=True)
    sys.path.insert(0, str(out))
    try:
        module = importlib.import_module("_cuda_ext")
    finally:
        sys.path.remove(str(out))
    assert module.CUDA_ARCHS == "emulated"
    return module


class _Stream:
    cuda_stream = 0


_EMULATION = {"active": False}


def _emulated_kernel(op):
    def run(*args):
        if not _EMULATION["active"]:
            raise RuntimeError("the CPU kernels of the CUDA custom ops exist only for the emulation tests")
        return op._init_fn(*args)

    return run


@pytest.fixture
def emulated_backend(emulated_extension, monkeypatch):
    """Route backend "cuda" on CPU tensors to the emulated kernels (host pointers, stream 0)."""
    for op in (cuda_loss.cuda_info_nce_forward, cuda_loss.cuda_info_nce_backward):
        if "cpu" not in op._backend_fns:
            op.register_kernel("cpu")(_emulated_kernel(op))
    monkeypatch.setitem(_EMULATION, "active", True)
    monkeypatch.setattr(cuda_loss, "extension", lambda: emulated_extension)
    monkeypatch.setattr(cuda_loss, "_sm_count", lambda index: 2)  # several splits per row tile
    monkeypatch.setattr(cuda_loss, "_check_cuda_inputs", lambda *args: None)
    monkeypatch.setattr(cuda_loss, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(backends, "_cuda_unavailable_reason", lambda device: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    return emulated_extension


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype,option_set,n,d",
    [
        (torch.float32, "everything", 7, 40),
        (torch.bfloat16, "everything", 70, 33),  # two row tiles, D not a multiple of 32
        (torch.float16, "mixcse_sup", 1, 20),
        (torch.float32, "sym_hard_neg", 65, 8),
        (torch.bfloat16, "none", 9, 100),
        (torch.float32, "sum", 3, 5),
    ],
)
def test_emulated_kernels_match_reference(emulated_backend, dtype, option_set, n, d):
    k, opts = split_option_set(option_set, n)
    a, p, neg = make_inputs(n, d, k, dtype=dtype, seed=n + d)
    assert_backend_matches_reference("cuda", a, p, neg, tau=torch.tensor(0.05), **opts)


@pytest.mark.slow
def test_emulated_kernels_more_candidates_and_labels(emulated_backend):
    """M > N over several column tiles and splits; a target among the negatives; anchors as negatives."""
    a, p, neg = make_inputs(12, 36, 130, n_pos=150, seed=4)
    labels = torch.randperm(150, generator=torch.Generator().manual_seed(1))[:12]
    labels[3] = 150 + 5
    assert_backend_matches_reference("cuda", a, p, neg, tau=0.05, labels=labels, hard_negative_weight=0.2,
                                     anchor_negatives=True)


@pytest.mark.slow
def test_emulated_kernels_symmetric_repeated_labels_and_zero_rows(emulated_backend):
    a, p, _ = make_inputs(10, 24, n_pos=75, seed=5)
    a[4] = 0
    p[9] = 0
    labels = torch.tensor([3, 1, 4, 74, 5, 9, 2, 6, 5, 3])
    assert_backend_matches_reference("cuda", a, p, None, tau=0.05, labels=labels, symmetric=True)


# ---------------------------------------------------------------------------------------------
# CPU emulation: the default backward (block_dlogits + GEMMs, row chunks) and the atomic one
# ---------------------------------------------------------------------------------------------

TINY_MIB = 1e-6  # below one row: R = one 64-row tile


class _ExtensionSpy:
    """The emulated extension, recording the row range of every block_dlogits launch and the
    backward kernels used."""

    def __init__(self, module):
        self.module = module
        self.dlogits = []  # (row_start, row_end, out_col0, ld_out)
        self.kernels = []

    def __getattr__(self, name):
        attr = getattr(self.module, name)
        if name not in ("block_dlogits", "block_backward", "target_backward"):
            return attr

        def record(*args, **kwargs):
            self.kernels.append(name)
            if name == "block_dlogits":
                self.dlogits.append((args[6], args[7], args[18], args[17]))
            return attr(*args, **kwargs)

        return record


@pytest.fixture
def backward_spy(emulated_backend, monkeypatch):
    """Emulated backend with a spy on the backward kernels and on rows_per_chunk; no budget in the env."""
    spy = _ExtensionSpy(emulated_backend)
    spy.chunks = []
    real = cuda_loss.rows_per_chunk

    def rows_spy(n_rows, n_cols, bytes_per_logit, budget_bytes, multiple=1):
        rows = real(n_rows, n_cols, bytes_per_logit, budget_bytes, multiple)
        spy.chunks.append(dict(n=n_rows, m=n_cols, elem=bytes_per_logit, budget=budget_bytes, multiple=multiple,
                               rows=rows))
        return rows

    monkeypatch.setattr(cuda_loss, "extension", lambda: spy)
    monkeypatch.setattr(cuda_loss, "rows_per_chunk", rows_spy)
    monkeypatch.delenv("SIMCSE_KERNELS_CHUNK_MIB", raising=False)
    monkeypatch.delenv("SIMCSE_CUDA_BWD", raising=False)
    return spy


def _m_total(n, n_pos, k, opts):
    """Columns of the ds chunk: P + K + N (anchor negatives) + 2N (MixCSE)."""
    return (n_pos + k + (n if opts.get("anchor_negatives") else 0)
            + (2 * n if opts.get("mix_lambda") is not None else 0))


def test_backward_mode_and_rows_per_chunk(monkeypatch):
    monkeypatch.delenv("SIMCSE_CUDA_BWD", raising=False)
    assert cuda_loss.backward_mode() == "chunked"
    monkeypatch.setenv("SIMCSE_CUDA_BWD", "atomic")
    assert cuda_loss.backward_mode() == "atomic"
    monkeypatch.setenv("SIMCSE_CUDA_BWD", "fast")
    with pytest.raises(ValueError, match=r"SIMCSE_CUDA_BWD must be 'chunked' or 'atomic', got 'fast'"):
        cuda_loss.backward_mode()
    monkeypatch.delenv("SIMCSE_KERNELS_CHUNK_MIB", raising=False)
    rows = cuda_loss.backward_rows_per_chunk
    assert cuda_loss.ds_storage_dtype(torch.bfloat16) == torch.bfloat16
    assert cuda_loss.ds_storage_dtype(torch.float16) == torch.float32
    assert cuda_loss.ds_storage_dtype(torch.float32) == torch.float32
    assert rows(150, 750, torch.bfloat16, TINY_MIB) == 64  # at least one tile
    assert rows(150, 750, torch.bfloat16, 128 * 750 * 2 / 2**20) == 128  # a multiple of 64
    assert rows(150, 750, torch.float32, 128 * 750 * 2 / 2**20) == 64  # fp32: 4 bytes per logit
    assert rows(150, 750, torch.bfloat16, None) == 150  # 256 MiB: every row
    assert rows(10**7, 1, torch.float32, 1024.0) == cuda_loss.MAX_CHUNK_ROWS == 65535 * 64  # grid.y limit
    monkeypatch.setenv("SIMCSE_KERNELS_CHUNK_MIB", repr(TINY_MIB))
    assert rows(150, 750, torch.bfloat16, None) == 64
    assert rows(150, 750, torch.bfloat16, 1.0) == 150  # the option overrides the environment


def _dlogits_args(**change):
    """Arguments of block_dlogits that pass every check (fake but aligned pointers)."""
    x = (4096, 0, 70, 100, 8192)
    args = dict(rows=x, cols=(12288, 0, 75, 100, 16384), dim=100, tau=256, weight=0.0, pattern=0, row_start=64,
                row_end=70, lse=512, row_weight=768, col_lse=0, col_weight=0, labels=1024, g=1280,
                target_col_offset=0, out=2048, out_dtype=2, ld_out=80, out_col0=5, dtau_part=3072,
                n_tiles_total=3, tile_col0=1, device=0, stream=0)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(row_start=-1), r"need 0 <= row_start < row_end <= rows \(70\), got row_start -1 and row_end 70"),
        (dict(row_end=64), r"need 0 <= row_start < row_end <= rows \(70\), got row_start 64 and row_end 64"),
        (dict(row_end=71), r"need 0 <= row_start < row_end <= rows \(70\), got row_start 64 and row_end 71"),
        (dict(col_lse=1536), r"col_lse and col_weight must both be given or both be 0"),
        (dict(target_col_offset=-2), r"target_col_offset must be >= 0, or -1 for a block without targets, got -2"),
        (dict(labels=1028), r"labels pointer 0x404 is not aligned to 8 bytes"),
        (dict(g=0), r"g is a null pointer"),
        (dict(out_dtype=1), r"out_dtype code must be 0 \(float32\) or 2 \(bfloat16\), got 1"),
        (dict(out=2050, out_dtype=0), r"out pointer 0x802 is not aligned to 4 bytes"),
        (dict(ld_out=79), r"need out_col0 >= 0 and ld_out >= out_col0 \+ cols \(75\), got out_col0 5 and ld_out 79"),
        (dict(out_col0=-1), r"need out_col0 >= 0 and ld_out >= out_col0 \+ cols \(75\)"),
        (dict(n_tiles_total=2), r"need tile_col0 >= 0 and n_tiles_total >= tile_col0 \+ ceil\(cols / 64\) \(2\), "
                                r"got tile_col0 1 and n_tiles_total 2"),
        (dict(pattern=3), r"MixCSE patterns need as many rows as columns, got 70 and 75"),
        (dict(tau=0), r"tau is a null pointer"),
        (dict(device=-1), r"device index must be >= 0, got -1"),
    ],
)
def test_block_dlogits_argument_checks(change, match):
    ext = _extension_or_skip()
    with pytest.raises(ValueError, match=r"simcse_kernels\._cuda_ext\.block_dlogits: " + match):
        ext.block_dlogits(**_dlogits_args(**change))


def test_block_dlogits_optional_pointers_pass_the_checks():
    """No targets (labels/g unused), no partials: the checks pass and only the launch fails without a GPU."""
    ext = _extension_or_skip()
    if _gpu_usable(ext):
        pytest.skip("a GPU is usable here: a launch on the fake pointers of this test would touch bad memory")
    with pytest.raises(RuntimeError, match=r"block_dlogits: CUDA launch failed \(cuda"):
        ext.block_dlogits(**_dlogits_args(target_col_offset=-1, labels=0, g=0, dtau_part=0, n_tiles_total=0))


@pytest.mark.slow
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern,symmetric", [("hard", False), ("none", True), ("mix3", False)])
def test_emulated_block_dlogits_kernel(emulated_extension, out_dtype, pattern, symmetric):
    """One block, rows [64, 77) of N = 77 (a chunk not starting at 0), written at column 3 of a wider
    buffer: dS·r_i·r_j and the per-tile dS·cos partials against a float64 computation; every element
    outside the block's columns and chunk rows is left alone."""
    ext = emulated_extension
    n, m, d, tau, w = 77, 70 if pattern != "mix3" else 77, 36, 0.07, 0.4
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(n, d, generator=gen)
    y = torch.randn(m, d, generator=gen)
    x[70] = 0  # a zero row: r = 1e12
    r_x = 1 / x.double().norm(dim=1).clamp_min(1e-12)
    r_y = 1 / y.double().norm(dim=1).clamp_min(1e-12)
    cos = (x.double() @ y.double().T) * r_x[:, None] * r_y[None, :]
    logits = cos / tau
    rows_i, diag = torch.arange(n), torch.arange(min(n, m))
    const = torch.zeros(n, m, dtype=torch.bool)
    if pattern == "hard":
        logits[diag, diag] += w
    if pattern == "mix3":
        const[rows_i, (rows_i - 1) % n] = True
        logits[const] = 0.0
        logits[diag, diag] += w
    lse = (torch.logsumexp(logits, 1) + torch.rand(n, generator=gen, dtype=torch.float64)).float()
    row_weight = torch.rand(n, generator=gen) + 0.5
    g = torch.rand(n, generator=gen) + 0.5
    labels = torch.randint(0, m + 7, (n,), generator=gen)  # target_col_offset 7: labels < 7 miss the block
    col_lse = (torch.logsumexp(logits, 0) + 0.3).float() if symmetric else None
    col_weight = torch.rand(m, generator=gen) if symmetric else None
    row_start, row_end, col0, ld, tile0, n_tiles = 64, 77, 3, m + 5, 1, 4
    out = torch.full((row_end - row_start, ld), float("nan"), dtype=out_dtype)
    part = torch.full((row_end - row_start, n_tiles), float("nan"))
    rx, ry = r_x.float(), r_y.float()
    tau_t = torch.tensor([tau], dtype=torch.float32)
    ptr = lambda t: 0 if t is None else t.data_ptr()
    ext.block_dlogits((x.data_ptr(), 0, n, d, rx.data_ptr()), (y.data_ptr(), 0, m, d, ry.data_ptr()), d,
                      tau_t.data_ptr(), w, cuda_loss.PATTERN[pattern], row_start, row_end, lse.data_ptr(),
                      row_weight.data_ptr(), ptr(col_lse), ptr(col_weight), labels.data_ptr(), g.data_ptr(), 7,
                      out.data_ptr(), cuda_loss.DTYPE_CODES[out_dtype], ld, col0, part.data_ptr(), n_tiles, tile0,
                      0, 0)
    ds = row_weight.double()[:, None] * torch.exp(logits - lse.double()[:, None])
    if symmetric:
        ds = ds + col_weight.double()[None, :] * torch.exp(logits - col_lse.double()[None, :])
    ds[const] = 0.0
    tau_terms = (ds * cos)[row_start:row_end]
    target = torch.zeros(n, m, dtype=torch.float64)
    hit = labels >= 7
    assert 0 < hit.sum() < n
    target[rows_i[hit], (labels - 7)[hit]] = g.double()[hit]
    expected = ((ds - target) * r_x[:, None] * r_y[None, :])[row_start:row_end]
    block = out[:, col0:col0 + m].double()
    assert torch.isnan(out[:, :col0].float()).all() and torch.isnan(out[:, col0 + m:].float()).all()
    # fp32 logits |s| <= 1/tau carry ~|s|·2^-22 absolute error, i.e. ~4e-6 relative in exp(s - lse);
    # bf16 storage rounds to 2^-9 relative. Per row (the zero row's r = 1e12 scales its entries).
    for u in range(row_end - row_start):
        scale = expected[u].abs().max().item()
        tol = dict(rtol=2**-8, atol=2**-8 * scale) if out_dtype == torch.bfloat16 else dict(rtol=1e-5,
                                                                                            atol=1e-5 * scale)
        torch.testing.assert_close(block[u], expected[u], **tol, msg=lambda msg, i=row_start + u: f"row {i}: {msg}")
    expected_part = torch.stack([tau_terms[:, j:j + 64].sum(1) for j in range(0, m, 64)], 1)
    assert torch.isnan(part[:, :tile0]).all() and torch.isnan(part[:, tile0 + 2:]).all()
    torch.testing.assert_close(part[:, tile0:tile0 + 2].double(), expected_part, rtol=1e-5,
                               atol=1e-5 * tau_terms.abs().sum(1).max().item())


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_emulated_default_backward_every_option_set(backward_spy, dtype, option_set):
    """Default (chunked) backward, one chunk: loss and every gradient (tau learnable) against the float64 oracle."""
    n, d = 7, 40
    k, opts = split_option_set(option_set, n)
    a, p, neg = make_inputs(n, d, k, dtype=dtype, seed=n + d + len(option_set))
    assert_backend_matches_reference("cuda", a, p, neg, tau=torch.tensor(0.05), **opts)
    assert "block_dlogits" in backward_spy.kernels and "block_backward" not in backward_spy.kernels
    assert "target_backward" not in backward_spy.kernels
    assert backward_spy.chunks and all(c["m"] == _m_total(n, n, k, opts) for c in backward_spy.chunks)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_default_backward_odd_shapes(backward_spy, dtype):
    """N = 70 (two row tiles, the last partial), D = 100 (not a multiple of 32), hard and anchor negatives."""
    a, p, neg = make_inputs(70, 100, 70, dtype=dtype, seed=21)
    assert_backend_matches_reference("cuda", a, p, neg, tau=torch.tensor(0.05), hard_negative_weight=0.3,
                                     anchor_negatives=True)
    assert {(s, e) for s, e, _, _ in backward_spy.dlogits} == {(0, 70)}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_default_backward_more_candidates(backward_spy, dtype):
    """M > N over several column tiles; a target among the negatives; anchors as negatives."""
    a, p, neg = make_inputs(12, 36, 130, n_pos=150, dtype=dtype, seed=4)
    labels = torch.randperm(150, generator=torch.Generator().manual_seed(1))[:12]
    labels[3] = 150 + 5
    assert_backend_matches_reference("cuda", a, p, neg, tau=torch.tensor(0.05), labels=labels,
                                     hard_negative_weight=0.2, anchor_negatives=True)
    assert sorted(c0 for _, _, c0, _ in backward_spy.dlogits) == [0, 150, 280]
    assert {ld for _, _, _, ld in backward_spy.dlogits} == {150 + 130 + 12}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_default_backward_symmetric_repeated_labels_zero_rows(backward_spy, dtype):
    """Symmetric loss with repeated labels (column weights sum over rows); zero rows for fp32/bf16 (a
    zero row's gradient is dẑ/(eps·tau) ~ 1e10, beyond fp16's range whatever the backward)."""
    a, p, neg = make_inputs(10, 24, 10, n_pos=75, dtype=dtype, seed=5)
    if dtype != torch.float16:
        a[4] = 0
        p[9] = 0
        neg[2] = 0
    labels = torch.tensor([3, 1, 4, 74, 5, 9, 2, 6, 5, 3])
    assert_backend_matches_reference("cuda", a, p, neg, tau=torch.tensor(0.05), labels=labels, symmetric=True,
                                     hard_negative_weight=0.3)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_default_backward_zero_rows_with_mixcse(backward_spy, dtype):
    """Zero anchors, positives and negatives (r = 1e12 folded into ds) with hard negatives and MixCSE
    (not fp16: a zero row's gradient ~ 1e10 overflows it)."""
    a, p, neg = make_inputs(8, 32, 8, dtype=dtype, seed=6)
    a[2] = 0
    p[5] = 0
    neg[1] = 0
    assert_backend_matches_reference("cuda", a, p, neg, tau=torch.tensor(0.05), hard_negative_weight=0.3,
                                     mix_lambda=0.2)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,option_set", [(torch.bfloat16, "everything"), (torch.float32, "sym_anchor_mix"),
                                              (torch.float16, "hard_neg")])
def test_emulated_default_backward_several_row_chunks(backward_spy, monkeypatch, dtype, option_set):
    """R = 64 (a budget below one row, from SIMCSE_KERNELS_CHUNK_MIB): N = 150 crosses three chunks, the
    last one partial; the oracle takes no budget."""
    monkeypatch.setenv("SIMCSE_KERNELS_CHUNK_MIB", repr(TINY_MIB))
    n, d = 150, 24
    k, opts = split_option_set(option_set, n)
    a, p, neg = make_inputs(n, d, k, dtype=dtype, seed=31)
    assert_backend_matches_reference("cuda", a, p, neg, tau=torch.tensor(0.05), **opts)
    assert backward_spy.chunks and all(c["rows"] == 64 and c["multiple"] == 64 for c in backward_spy.chunks)
    assert {(s, e) for s, e, _, _ in backward_spy.dlogits} == {(0, 64), (64, 128), (128, 150)}


@pytest.mark.slow
def test_emulated_default_backward_budget_limits_rows(backward_spy, monkeypatch):
    """fp16 inputs (fp32 ds, 4 bytes per logit), MixCSE (M = 3N): the budget holds 128 rows but not 150,
    so R = 128 and R·M·4 <= budget; the gradients still equal the oracle's."""
    n, d = 150, 20
    m_total = 3 * n
    budget_mib = (128 * m_total * 4 + 100) / 2**20
    monkeypatch.setenv("SIMCSE_KERNELS_CHUNK_MIB", repr(budget_mib))
    a, p, _ = make_inputs(n, d, dtype=torch.float16, seed=32)
    assert_backend_matches_reference("cuda", a, p, None, tau=torch.tensor(0.05), mix_lambda=0.3, symmetric=True)
    for c in backward_spy.chunks:
        assert (c["m"], c["elem"], c["rows"]) == (m_total, 4, 128)
        assert c["rows"] * c["m"] * c["elem"] <= c["budget"] == int(budget_mib * 2**20)
    assert {(s, e) for s, e, _, _ in backward_spy.dlogits} == {(0, 128), (128, 150)}


@pytest.mark.slow
def test_emulated_chunk_budget_option_reaches_the_backward(backward_spy):
    """The ``chunk_budget_mib`` option travels through the forward to the backward."""
    a, p, neg = make_inputs(70, 16, 70, seed=33)
    fused_info_nce(a.clone().requires_grad_(True), p, neg, backend="cuda", chunk_budget_mib=TINY_MIB).backward()
    assert backward_spy.chunks and all(c["budget"] == 1 and c["rows"] == 64 for c in backward_spy.chunks)
    assert {(s, e) for s, e, _, _ in backward_spy.dlogits} == {(0, 64), (64, 70)}


@pytest.mark.slow
def test_emulated_default_backward_gemm_equivalents(backward_spy, monkeypatch):
    """Backward cost with every option on, over two chunks: one block_dlogits launch per (block, chunk)
    (each logit tile recomputed once = 1 GEMM-equivalent) and torch GEMMs of exactly 2·R·M_b·D FLOPs
    per gradient role of each block: 2 GEMM-equivalents less MixCSE's detached roles (mix3 has no
    column gradient, mix4 no row gradient)."""
    n, d = 100, 16
    flops = []
    real = cuda_loss.accumulate_gemm

    def count(out, a, b, accumulate):
        assert a.shape[1] == b.shape[0] and out.shape == (a.shape[0], b.shape[1])
        flops.append(2 * a.shape[0] * a.shape[1] * b.shape[1])
        return real(out, a, b, accumulate)

    monkeypatch.setattr(cuda_loss, "accumulate_gemm", count)
    monkeypatch.setenv("SIMCSE_KERNELS_CHUNK_MIB", repr(TINY_MIB))
    k, opts = split_option_set("everything", n)
    a, p, neg = make_inputs(n, d, k, dtype=torch.bfloat16, seed=37)
    fused_info_nce(a.clone().requires_grad_(True), p.clone().requires_grad_(True),
                   neg.clone().requires_grad_(True), backend="cuda", **opts).backward()
    m_total = _m_total(n, n, k, opts)  # P + K + N + 2N = 5N
    assert sorted(backward_spy.dlogits) == sorted((r0, r1, c0, m_total) for r0, r1 in ((0, 64), (64, 100))
                                                  for c0 in (0, n, 2 * n, 3 * n, 4 * n))
    gemm_eq = 2 * n * m_total * d
    assert sum(flops) == 2 * n * d * (2 * n + 2 * k + 2 * n + n + n)
    assert sum(flops) / gemm_eq == pytest.approx(1.6)  # <= 2


@pytest.mark.slow
def test_emulated_default_backward_is_bitwise_deterministic(backward_spy):
    """Two runs over several chunks give bit-identical gradients (no atomics); one chunk agrees to round-off."""
    a, p, neg = make_inputs(150, 24, 150, dtype=torch.bfloat16, seed=34)

    def grads(budget):
        leaves = [t.clone().requires_grad_(True) for t in (a, p, neg)]
        tau = torch.tensor(0.05, requires_grad=True)
        fused_info_nce(*leaves, temperature=tau, backend="cuda", hard_negative_weight=0.3, anchor_negatives=True,
                       symmetric=True, mix_lambda=0.4, chunk_budget_mib=budget).backward()
        return [leaf.grad for leaf in leaves] + [tau.grad]

    first, second = grads(TINY_MIB), grads(TINY_MIB)
    for g0, g1 in zip(first, second):
        assert torch.equal(g0, g1)
    whole = grads(None)
    for g0, g2 in zip(first[:3], whole[:3]):  # bf16 gradients: chunking changes the summation order only
        torch.testing.assert_close(g0.float(), g2.float(), rtol=2**-7, atol=2**-7 * g2.float().abs().max().item())
    torch.testing.assert_close(first[3], whole[3], rtol=1e-4, atol=1e-5 / (150 * 0.05**2))


@pytest.mark.slow
@pytest.mark.parametrize("dtype,option_set", [(torch.float32, "everything"), (torch.bfloat16, "sym_hard_neg"),
                                              (torch.float16, "mixcse_sup")])
def test_emulated_atomic_backward_still_matches(backward_spy, monkeypatch, dtype, option_set):
    monkeypatch.setenv("SIMCSE_CUDA_BWD", "atomic")
    k, opts = split_option_set(option_set, 9)
    a, p, neg = make_inputs(9, 40, k, dtype=dtype, seed=35)
    assert_backend_matches_reference("cuda", a, p, neg, tau=torch.tensor(0.05), **opts)
    assert "block_backward" in backward_spy.kernels and "target_backward" in backward_spy.kernels
    assert "block_dlogits" not in backward_spy.kernels


@pytest.mark.slow
def test_emulated_bad_backward_mode_raises(backward_spy, monkeypatch):
    monkeypatch.setenv("SIMCSE_CUDA_BWD", "gemm")
    a, p, _ = make_inputs(5, 16, seed=36)
    loss = fused_info_nce(a.clone().requires_grad_(True), p, backend="cuda")
    with pytest.raises(ValueError, match=r"SIMCSE_CUDA_BWD must be 'chunked' or 'atomic', got 'gemm'"):
        loss.backward()
    assert not backward_spy.kernels


# ---------------------------------------------------------------------------------------------
# GPU: parity with the float64 oracle
# ---------------------------------------------------------------------------------------------


def _cuda_or_skip():
    reason = cuda_loss.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
@pytest.mark.parametrize("n,d", [(1, 100), (7, 100), (129, 384), (70, 768)])
def test_parity_every_option(dtype, option_set, n, d):
    _cuda_or_skip()
    k, opts = split_option_set(option_set, n)
    a, p, neg = make_inputs(n, d, k, dtype=dtype, device="cuda", seed=n + d)
    assert_backend_matches_reference("cuda", a, p, neg, tau=torch.tensor(0.05), **opts)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_more_candidates_than_anchors_and_custom_labels(dtype):
    """M > N: extra positives and negatives, a permutation of labels, a target among the negatives."""
    _cuda_or_skip()
    a, p, neg = make_inputs(12, 100, 130, n_pos=150, dtype=dtype, device="cuda", seed=4)
    labels = torch.randperm(150, generator=torch.Generator().manual_seed(1))[:12]
    labels[3] = 150 + 5
    assert_backend_matches_reference("cuda", a, p, neg, tau=0.05, labels=labels.cuda(), hard_negative_weight=0.2,
                                     anchor_negatives=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_symmetric_with_repeated_labels(dtype):
    _cuda_or_skip()
    a, p, _ = make_inputs(10, 64, n_pos=75, dtype=dtype, device="cuda", seed=5)
    labels = torch.tensor([3, 1, 4, 74, 5, 9, 2, 6, 5, 3], device="cuda")
    assert_backend_matches_reference("cuda", a, p, None, tau=0.05, labels=labels, symmetric=True)


@pytest.mark.cuda
def test_zero_vectors_give_finite_loss_and_grads():
    _cuda_or_skip()
    a, p, neg = make_inputs(8, 32, 8, device="cuda", seed=6)
    a[2] = 0
    p[5] = 0
    neg[1] = 0
    assert_backend_matches_reference("cuda", a, p, neg, tau=0.05, hard_negative_weight=0.3, mix_lambda=0.2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_default_backward_several_chunks_bitwise_deterministic(dtype, monkeypatch):
    """Row chunks of 64 (tiny budget): oracle parity, and two runs give bit-identical gradients."""
    _cuda_or_skip()
    monkeypatch.delenv("SIMCSE_CUDA_BWD", raising=False)
    monkeypatch.setenv("SIMCSE_KERNELS_CHUNK_MIB", repr(TINY_MIB))  # the oracle takes no chunk_budget_mib
    a, p, neg = make_inputs(200, 96, 200, dtype=dtype, device="cuda", seed=12)
    opts = dict(hard_negative_weight=0.3, anchor_negatives=True, symmetric=True, mix_lambda=0.4)
    assert_backend_matches_reference("cuda", a, p, neg, tau=torch.tensor(0.05), **opts)

    def grads():
        leaves = [t.clone().requires_grad_(True) for t in (a, p, neg)]
        tau = torch.tensor(0.05, device="cuda", requires_grad=True)
        fused_info_nce(*leaves, temperature=tau, backend="cuda", chunk_budget_mib=TINY_MIB, **opts).backward()
        return [leaf.grad for leaf in leaves] + [tau.grad]

    for g0, g1 in zip(grads(), grads()):
        assert torch.equal(g0, g1)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_atomic_backward_on_gpu(dtype, monkeypatch):
    _cuda_or_skip()
    monkeypatch.setenv("SIMCSE_CUDA_BWD", "atomic")
    a, p, neg = make_inputs(70, 100, 70, dtype=dtype, device="cuda", seed=13)
    assert_backend_matches_reference("cuda", a, p, neg, tau=torch.tensor(0.05), hard_negative_weight=0.3,
                                     anchor_negatives=True, symmetric=True, mix_lambda=0.2)


@pytest.mark.cuda
def test_float64_is_refused_explicitly():
    _cuda_or_skip()
    a, p, _ = make_inputs(4, 16, dtype=torch.float64, device="cuda")
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        fused_info_nce(a, p, backend="cuda")


@pytest.mark.cuda
def test_torch_compile_full_graph_matches_eager():
    """The autograd Function over the two custom ops traces into one graph (fake impls give the shapes)."""
    _cuda_or_skip()
    a, p, neg = make_inputs(65, 96, 65, dtype=torch.bfloat16, device="cuda", seed=8)
    labels = torch.arange(65, device="cuda")
    tau = torch.tensor(0.05, device="cuda")

    def fn(x, y, z, t):
        per_row = cuda_loss.CudaInfoNCEFunction.apply(x, y, z, None, None, t, labels, 0.4, True, True)
        return per_row.mean()

    compiled = torch.compile(fn, fullgraph=True)
    leaves = [t.clone().requires_grad_(True) for t in (a, p, neg, tau)]
    eager = [t.clone().requires_grad_(True) for t in (a, p, neg, tau)]
    loss_compiled = compiled(*leaves)
    loss_eager = fn(*eager)
    loss_compiled.backward()
    loss_eager.backward()
    torch.testing.assert_close(loss_compiled, loss_eager)
    for x, y in zip(leaves[:3], eager[:3]):  # same kernels; the compiled graph may reorder the elementwise ops
        torch.testing.assert_close(x.grad, y.grad)
    # dL/dtau cancels terms of size 1/(N tau^2): its round-off unit (as in conftest)
    torch.testing.assert_close(leaves[3].grad, eager[3].grad, rtol=1e-4, atol=1e-5 / (65 * 0.05**2))


@pytest.mark.cuda
def test_torch_compile_through_the_public_api():
    _cuda_or_skip()
    a, p, neg = make_inputs(33, 64, 33, device="cuda", seed=9)
    fn = lambda x, y, z: fused_info_nce(x, y, z, hard_negative_weight=0.2, mix_lambda=0.3, backend="cuda")
    torch.testing.assert_close(torch.compile(fn)(a, p, neg), fn(a, p, neg))


@pytest.mark.cuda
@pytest.mark.slow
def test_parity_large_bf16_batch():
    """N = 8192, D = 768 bf16 with hard negatives: the training-size case (many splits and tiles)."""
    _cuda_or_skip()
    a, p, neg = make_inputs(8192, 768, 8192, dtype=torch.bfloat16, device="cuda", seed=11)
    assert_backend_matches_reference("cuda", a, p, neg, tau=torch.tensor(0.05), hard_negative_weight=0.3)


@pytest.mark.slow
@pytest.mark.parametrize("magnitude", [1e19, 3e38])
def test_emulated_kernels_huge_rows_match_float64(emulated_backend, magnitude):
    """Rows near fp32's max are scaled by a power of two before the kernels: the float64 answer."""
    import torch.nn.functional as F

    a, p, neg = make_inputs(9, 20, 9, dtype=torch.float32, seed=4)
    a, p, neg = (t / t.abs().amax() * magnitude for t in (a, p, neg))
    leaves = [t.clone().requires_grad_() for t in (a, p, neg)]
    loss = fused_info_nce(*leaves, temperature=0.05, hard_negative_weight=0.5, backend="cuda")
    loss.backward()
    truth_in = [t.double().requires_grad_() for t in (a, p, neg)]
    an, cn = F.normalize(truth_in[0], dim=-1), F.normalize(torch.cat(truth_in[1:]), dim=-1)
    logits = an @ cn.T / 0.05
    logits[:, 9:] += 0.5 * torch.eye(9, dtype=torch.float64)
    truth = F.cross_entropy(logits, torch.arange(9))
    truth.backward()
    # the suite's fp32 tolerances: the loss relative to max(|loss|, 1/tau), a gradient to its tensor's scale
    assert abs(float(loss.detach()) - float(truth.detach())) <= 2e-5 * max(float(truth.detach()), 1 / 0.05)
    floor = torch.finfo(torch.float32).smallest_normal * torch.finfo(torch.float32).eps  # subnormal gradients
    for got, want in zip(leaves, truth_in):
        assert ((got.grad.double() - want.grad).abs() <= 1e-4 * want.grad.abs().max() + floor).all()


@pytest.mark.slow
def test_emulated_double_backward_raises_clear_error(emulated_backend):
    from simcse_kernels import DoubleBackwardError

    a, p, _ = make_inputs(5, 8, dtype=torch.float32, seed=5)
    a.requires_grad_()
    with pytest.raises(DoubleBackwardError, match="backend 'cuda'.*backend='naive'"):
        torch.autograd.grad(fused_info_nce(a, p, backend="cuda"), a, create_graph=True)


# ---------------------------------------------------------------------------------------------
# CPU emulation: margins (CosFace / ArcFace) and dot similarity (issue 21)
# ---------------------------------------------------------------------------------------------


class _MarginSpy(_ExtensionSpy):
    """The backward spy, also recording the target arguments of every lse_partials / block_dlogits /
    block_backward launch (the margins' epilogue inputs)."""

    def __getattr__(self, name):
        attr = getattr(self.module, name)
        if name not in ("lse_partials", "block_dlogits", "block_backward", "target_backward"):
            return attr
        record = super().__getattr__(name) if name != "lse_partials" else attr

        def with_targets(*args, **kwargs):
            self.targets.append((name, {k: v for k, v in kwargs.items() if k.startswith(("target", "labels"))}))
            return record(*args, **kwargs)

        return with_targets


@pytest.fixture
def margin_spy(backward_spy, monkeypatch):
    spy = _MarginSpy(backward_spy.module)
    spy.chunks, spy.targets = backward_spy.chunks, []
    monkeypatch.setattr(cuda_loss, "extension", lambda: spy)
    return spy


def _assert_margin_launches(spy, opts, atomic=False):
    """The margins reached the kernels: every launch over a block holding targets got the per-row terms
    (the symmetric column LSE in its transposed form), and no launch got them without a margin."""
    margined = bool(opts.get("margin") or opts.get("angular_margin"))
    lse = [kw for name, kw in spy.targets if name == "lse_partials"]
    with_targets = [kw for kw in lse if kw.get("target_mode", 0) != 0]
    if not margined:
        assert not with_targets and not any(kw for name, kw in spy.targets if name != "lse_partials")
        return
    n_blocks_with_targets = 1 + (1 if opts.get("k") else 0)
    modes = sorted(kw["target_mode"] for kw in with_targets)
    assert modes == [cuda_loss.TARGET["rows"]] * n_blocks_with_targets + (
        [cuda_loss.TARGET["cols"]] if opts.get("symmetric") else [])
    kernel = "block_backward" if atomic else "block_dlogits"
    assert any("target_delta" in kw and "target_grad" in kw for name, kw in spy.targets if name == kernel)


@pytest.mark.slow
@pytest.mark.parametrize("option_set", list(MARGIN_OPTION_SETS))
def test_emulated_margins_every_option_set(margin_spy, option_set):
    """Every margin / dot option set of the Triton tests (crossed with hard negatives and their weight,
    anchor negatives, MixCSE, symmetric, reductions none/sum/mean), default backward, learnable tau,
    N = 37 (not a multiple of the 64-row tile), D = 100: loss and every gradient against the float64
    oracle."""
    a, p, neg, opts = make_margin_inputs(option_set, 37, 100, seed=21)
    assert_backend_matches_reference("cuda", a, p, neg, tau=torch.tensor(0.05), **opts)
    assert "block_dlogits" in margin_spy.kernels and "block_backward" not in margin_spy.kernels
    _assert_margin_launches(margin_spy, dict(MARGIN_OPTION_SETS[option_set]))


@pytest.mark.slow
@pytest.mark.parametrize("option_set", ["arc_plus_margin_hard_neg", "margin_everything", "dot_margin_symmetric",
                                        "margin_none"])
def test_emulated_margins_atomic_backward(margin_spy, monkeypatch, option_set):
    """SIMCSE_CUDA_BWD=atomic: block_backward redoes the target entries with the margin, target_backward
    gets g·f'(c)."""
    monkeypatch.setenv("SIMCSE_CUDA_BWD", "atomic")
    a, p, neg, opts = make_margin_inputs(option_set, 37, 100, seed=22)
    assert_backend_matches_reference("cuda", a, p, neg, tau=torch.tensor(0.05), **opts)
    assert "block_backward" in margin_spy.kernels and "block_dlogits" not in margin_spy.kernels
    _assert_margin_launches(margin_spy, dict(MARGIN_OPTION_SETS[option_set]), atomic=True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("option_set", ["arc_plus_margin_hard_neg", "margin_everything", "dot_margin_symmetric"])
def test_emulated_margins_16bit(backward_spy, dtype, option_set):
    """16-bit inputs (the WMMA tiles): N = 70 (two row tiles, the last partial), D = 100."""
    a, p, neg, opts = make_margin_inputs(option_set, 70, 100, dtype=dtype, seed=23)
    assert_backend_matches_reference("cuda", a, p, neg, tau=torch.tensor(0.07), **opts)


@pytest.mark.slow
@pytest.mark.parametrize("similarity,margins", [("cosine", dict(margin=0.3, angular_margin=0.4)),
                                                ("dot", dict(margin=0.3))])
def test_emulated_margins_more_candidates_custom_labels_symmetric(backward_spy, similarity, margins):
    """M > N over several column tiles (P = 75, K = 70 >= N as the weight needs), permuted labels with
    one target among the negatives (its own hard negative: +w and the margin on one entry); symmetric
    with repeated labels (the column direction reads the margined entries)."""
    a, p, neg = make_inputs(12, 100, 70, n_pos=75, seed=24)
    if similarity == "dot":
        a, p, neg = (t * 0.1 for t in (a, p, neg))
    labels = torch.randperm(75, generator=torch.Generator().manual_seed(2))[:12]
    labels[3] = 75 + 3  # its own hard negative
    assert_backend_matches_reference("cuda", a, p, neg, tau=torch.tensor(0.05), labels=labels,
                                     hard_negative_weight=0.3, anchor_negatives=True, similarity=similarity,
                                     **margins)
    sym_labels = torch.tensor([3, 1, 4, 74, 5, 9, 2, 6, 5, 3, 3, 70])
    assert_backend_matches_reference("cuda", a, p, None, tau=torch.tensor(0.05), labels=sym_labels,
                                     symmetric=True, similarity=similarity, **margins)


@pytest.mark.slow
@pytest.mark.parametrize("bwd_mode", ["chunked", "atomic"])
def test_emulated_arcface_target_cosines_near_one(backward_spy, monkeypatch, bwd_mode):
    """Dropout views of one sentence (positives = anchors + tiny noise, cos ≈ 0.99995; three exact
    copies, where the clamp is active and f'(c) = 0): finite loss and gradients, equal to the oracle."""
    monkeypatch.setenv("SIMCSE_CUDA_BWD", bwd_mode)
    g = torch.Generator().manual_seed(25)
    a = torch.randn(19, 64, generator=g, dtype=torch.float64)
    p = a + 0.01 * torch.randn(19, 64, generator=g, dtype=torch.float64)
    p[:3] = a[:3]
    a, p = a.float(), p.float()
    loss, grads = loss_and_grads(fused_info_nce, a, p, None, torch.tensor(0.05), backend="cuda", angular_margin=0.5)
    assert torch.isfinite(loss).all() and all(torch.isfinite(t).all() for t in grads if t is not None)
    assert_backend_matches_reference("cuda", a, p, None, tau=torch.tensor(0.05), angular_margin=0.5, margin=0.1)


@pytest.mark.slow
def test_emulated_margins_several_row_chunks_bitwise_deterministic(backward_spy, monkeypatch):
    """R = 64 (tiny budget): N = 70 gives two chunks, the second partial; the margined targets of
    both chunks against the oracle, and two runs give bit-identical gradients (no atomics)."""
    monkeypatch.setenv("SIMCSE_KERNELS_CHUNK_MIB", repr(TINY_MIB))
    a, p, neg = make_inputs(70, 16, 70, seed=26)
    opts = dict(hard_negative_weight=0.4, symmetric=True, margin=0.2, angular_margin=0.3)
    assert_backend_matches_reference("cuda", a, p, neg, tau=torch.tensor(0.05), **opts)
    assert {(s, e) for s, e, _, _ in backward_spy.dlogits} == {(0, 64), (64, 70)}

    def grads():
        leaves = [t.clone().requires_grad_(True) for t in (a, p, neg)]
        tau = torch.tensor(0.05, requires_grad=True)
        fused_info_nce(*leaves, temperature=tau, backend="cuda", **opts).backward()
        return [leaf.grad for leaf in leaves] + [tau.grad]

    for g0, g1 in zip(grads(), grads()):
        assert torch.equal(g0, g1)


@pytest.mark.slow
@pytest.mark.parametrize("option_set", ["margin_everything", "dot_margin_hard_neg"])
def test_emulated_margins_add_no_gemm(margin_spy, monkeypatch, option_set):
    """Margins and dot similarity cost no extra GEMM: the same kernel launches (one lse_partials per block,
    one block_dlogits per block and chunk) and the same gradient-GEMM FLOPs as the option set without
    them, over two row chunks."""
    n, d = 70, 16
    real = cuda_loss.accumulate_gemm
    monkeypatch.setenv("SIMCSE_KERNELS_CHUNK_MIB", repr(TINY_MIB))

    def count(opts, k):
        flops = []

        def gemm(out, x, y, accumulate):
            flops.append(2 * x.shape[0] * x.shape[1] * y.shape[1])
            return real(out, x, y, accumulate)

        monkeypatch.setattr(cuda_loss, "accumulate_gemm", gemm)
        for record in (margin_spy.kernels, margin_spy.dlogits, margin_spy.targets):
            record.clear()
        a, p, neg = make_inputs(n, d, k, seed=37)
        leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (a, p, neg)]
        fused_info_nce(*leaves, backend="cuda", **opts).backward()
        forward_launches = sum(name == "lse_partials" for name, _ in margin_spy.targets)
        return sum(flops), forward_launches, sorted(margin_spy.dlogits), sorted(margin_spy.kernels)

    m_opts = dict(MARGIN_OPTION_SETS[option_set])
    k = n if m_opts.pop("k", 0) == "n" else 0
    p_opts = {key: v for key, v in m_opts.items() if key not in ("margin", "angular_margin", "similarity")}
    assert p_opts != m_opts
    margined = count(m_opts, k)
    assert margined == count(p_opts, k)
    flops, forward_launches, dlogits, _ = margined
    m_total = _m_total(n, n, k, m_opts)
    blocks = 1 + bool(k) + bool(m_opts.get("anchor_negatives")) + 2 * (m_opts.get("mix_lambda") is not None)
    assert forward_launches == blocks + bool(m_opts.get("symmetric"))
    assert len(dlogits) == 2 * blocks  # two row chunks
    assert flops / (2 * n * m_total * d) <= 2.0  # + 1 recompute (one dlogits per tile) + 1 forward: <= 4


def test_margin_binding_argument_checks(emulated_extension):
    """The bindings' checks of the margin arguments (api.cpp; the emulated build of this checkout's
    sources, so a stale installed extension cannot hide a change)."""
    ext = emulated_extension
    args = _valid_lse_args()
    for change, match in [
        (dict(target_mode=3), r"target_mode must be 0 \(none\), 1 \(rows\) or 2 \(cols\), got 3"),
        (dict(target_mode=1, labels=0, target_delta=512), r"labels is a null pointer"),
        (dict(target_mode=2, labels=512, target_delta=0), r"target_delta is a null pointer"),
        (dict(target_mode=1, labels=512, target_delta=1024, target_col_offset=-1),
         r"target_mode 1 \(rows\) needs target_col_offset >= 0, got -1"),
        (dict(target_mode=1, labels=516, target_delta=1024, target_col_offset=0),
         r"labels pointer 0x204 is not aligned to 8 bytes"),
    ]:
        with pytest.raises(ValueError, match=r"_cuda_ext\.lse_partials: " + match):
            ext.lse_partials(**{**args, **change})
    with pytest.raises(ValueError, match=r"block_dlogits: target_delta and target_grad must both be given or both"):
        ext.block_dlogits(**_dlogits_args(target_delta=4096))
    with pytest.raises(ValueError, match=r"block_dlogits: target_grad pointer 0x1002 is not aligned to 4 bytes"):
        ext.block_dlogits(**_dlogits_args(target_delta=4096, target_grad=4098))
    x = (4096, 0, 7, 100, 8192)
    bwd = (x, x, 100, 256, 0.0, 0, 512, 768, 0, 0, 0, 0, 2048, 1, 0, 0)
    with pytest.raises(ValueError, match=r"block_backward: target_col_offset must be >= 0, or -1 for a block"):
        ext.block_backward(*bwd, target_col_offset=-2)
    with pytest.raises(ValueError, match=r"block_backward: target_grad is a null pointer"):
        ext.block_backward(*bwd, labels=1024, target_col_offset=0, target_delta=1280)


def test_float64_on_auto_keeps_the_margins():
    """"auto" lands in cuda_info_nce with float64 (CUDA) inputs and computes them with the torch backend:
    the margins and dot similarity must travel along (called directly here, on CPU tensors)."""
    from simcse_kernels.options import InfoNCEOptions
    from simcse_kernels.reference import reference_loss

    a, p, neg = make_inputs(9, 24, 9, dtype=torch.float64, seed=27)
    labels = torch.arange(9)
    for kwargs in (dict(margin=0.3, angular_margin=0.2, hard_negative_weight=0.5, symmetric=True),
                   dict(margin=0.3, similarity="dot", reduction="none")):
        options = InfoNCEOptions(temperature=0.05, **kwargs)
        torch.testing.assert_close(cuda_loss.cuda_info_nce(a, p, neg, labels, options),
                                   reference_loss(a, p, neg, labels, options), rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_emulated_auto_routes_margins_to_the_extension(margin_spy, monkeypatch):
    """``backend="auto"`` resolving to "cuda" (here through SIMCSE_KERNELS_BACKEND) runs the margins on the
    extension (it used to fall back to "torch")."""
    monkeypatch.setenv("SIMCSE_KERNELS_BACKEND", "cuda")
    a, p, neg = make_inputs(9, 24, 9, seed=28)
    assert_backend_matches_reference("auto", a, p, neg, tau=torch.tensor(0.05), margin=0.2, angular_margin=0.3,
                                     hard_negative_weight=0.5)
    assert "block_dlogits" in margin_spy.kernels
    _assert_margin_launches(margin_spy, dict(k="n", margin=0.2))


@pytest.mark.parametrize("opts", [dict(margin=0.3, angular_margin=0.2), dict(margin=0.3, dot=True)])
def test_fake_ops_with_margins_and_dot(opts):
    """The custom ops' fake implementations take the margin / dot arguments (meta device)."""
    n, d = 5, 7
    meta = dict(device="meta")
    a = torch.empty(n, d, requires_grad=True, **meta)
    p = torch.empty(n, d, requires_grad=True, **meta)
    tau = torch.empty((), requires_grad=True, **meta)
    labels = torch.empty(n, dtype=torch.int64, **meta)
    loss = cuda_loss.CudaInfoNCEFunction.apply(a, p, None, None, None, tau, labels, 0.0, False, True, None,
                                               opts["margin"], opts.get("angular_margin", 0.0), opts.get("dot", False))
    assert loss.shape == (n,) and loss.dtype == torch.float32
    loss.sum().backward()
    assert a.grad.shape == a.shape and p.grad.shape == p.shape and tau.grad.shape == ()


def test_selfcheck_key_separates_margins_and_dot_for_cuda():
    """The first-use self-check remembers results per key: a margin, an angular margin or dot similarity
    on backend "cuda" is a key of its own (never served by a plain cosine check)."""
    from simcse_kernels.options import InfoNCEOptions
    from simcse_kernels.selfcheck import check_key

    a, _, _ = make_inputs(4, 8)
    keys = {check_key("cuda", a, None, InfoNCEOptions(**kw))
            for kw in (dict(), dict(margin=0.3), dict(angular_margin=0.3), dict(similarity="dot"),
                       dict(similarity="dot", margin=0.3), dict(margin=0.3, angular_margin=0.3))}
    assert len(keys) == 6


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option_set", list(MARGIN_OPTION_SETS))
@pytest.mark.parametrize("bwd_mode", ["chunked", "atomic"])
def test_margin_parity_on_gpu(dtype, option_set, bwd_mode, monkeypatch):
    """Every margin / dot option set on the GPU build (WMMA tiles, cuBLAS GEMMs), both backwards."""
    _cuda_or_skip()
    monkeypatch.setenv("SIMCSE_CUDA_BWD", bwd_mode)
    a, p, neg, opts = make_margin_inputs(option_set, 129, 384, dtype=dtype, device="cuda", seed=29)
    assert_backend_matches_reference("cuda", a, p, neg, tau=torch.tensor(0.05), **opts)
