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
from conftest import OPTION_SETS, assert_backend_matches_reference, make_inputs, split_option_set

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
    jobs = [[cxx, "-std=c++20", *flags, "-x", "c++", "-include", str(emu / "emu.h"), "-c", str(ROOT / "csrc" / src),
             "-o", str(out / (src + ".o"))] for src in ("block_forward.cu", "block_backward.cu", "rowwise.cu",
                                                       "runtime.cu")]
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
    for x, y in zip(leaves[:3], eager[:3]):  # float32 atomics: equal up to summation order
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
