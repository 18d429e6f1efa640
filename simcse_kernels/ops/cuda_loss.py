"""Backend ``"cuda"``: the loss on the CUDA C++ extension ``simcse_kernels._cuda_ext`` (csrc/).

Same algorithm as the chunked torch backend (:mod:`simcse_kernels.ops.chunked`) and the Triton
kernels, with the math of :mod:`simcse_kernels.reference`, fused into CUDA kernels that never
build the N x M logit matrix:

* forward: for each block of the row layout [positives | negatives (+w at P+i) | anchors (-inf at
  i) | mix3 | mix4], a kernel walks 64 x 64 logit tiles (tensor-core WMMA on the raw bf16/fp16
  rows, float32 FMA tiles otherwise, scaled by the inverse norms afterwards) and keeps an online
  log-sum-exp per row; ``n_splits`` CTAs share a row tile and their partial LSEs (an O(splits·N)
  buffer) are combined here. The symmetric loss's column LSE is the same kernel on the
  transposed positives block. Target cosines come from an O(N·D) row kernel.
* backward (default, ``SIMCSE_CUDA_BWD`` unset or ``chunked``; :func:`backward_mode`): the same
  design as the Triton backend's default backward. The anchor rows are processed in chunks of R
  rows. For each chunk and each logit block, the kernel ``block_dlogits`` (csrc/block_dlogits.cu)
  recomputes the chunk's 64 x 64 logit tiles with the forward's tile code (bit-identical logits)
  and writes ``ds_ij = r_i r_j ∂L/∂s_ij`` — dS = row_weight·softmax [+ col_weight·column
  softmax, symmetric positives block] − g at the target column, 0 on MixCSE's constant logits,
  both inverse norms folded in, no 1/tau — into an (R, M_total) buffer (columns in the order of
  :func:`~simcse_kernels.ops.features.logit_blocks`), plus per (row, 64-column tile) partial sums
  of dS·cos for ∂L/∂tau (without the target term, which is subtracted here in float64). Then two
  torch GEMMs per block on the **raw** features (fp32 accumulation, :mod:`.gemm`):
  ``r∂x̂_rows[chunk] += ds_block @ cols`` and ``r∂x̂_cols += ds_blockᵀ @ rows[chunk]`` (MixCSE's
  detached mixtures only ever appear as operands, never receive a gradient); one division by r
  gives ∂x̂, and a row kernel applies the normalization backward dz = r·(dẑ − ẑ(ẑ·dẑ)) / tau and
  returns the gradients in the input dtype.

  Determinism: no float atomics anywhere on this path. Every ds / partial element is written by
  one thread (one warp for a partial, fixed shuffle order), the partials are summed by torch in
  float64, and the GEMMs accumulate block after block and chunk after chunk in a fixed order, so
  two runs give bitwise equal gradients.

  Cost in GEMM-equivalents (2·N·M·D FLOPs each, M = every logit column): forward 1, backward
  1 recompute + 2 gradient GEMMs (fewer for MixCSE's detached blocks): **4**; symmetric + 1
  column-LSE pass = **5**. Products: the logit tiles of 16-bit inputs on tensor cores (WMMA), the
  GEMMs in cuBLAS (bf16 tensor cores; fp32 with tf32 only when
  ``torch.backends.cuda.matmul.allow_tf32`` is set).

  Memory: R comes from :func:`simcse_kernels.ops.budget.rows_per_chunk` with the
  ``chunk_budget_mib`` option (else ``$SIMCSE_KERNELS_CHUNK_MIB``, else 256 MiB), a multiple of
  64; extra memory is O(R·M + (N + M)·D) (the ds chunk, the R x ceil(M/64) partials, float32
  gradient buffers, storage-dtype copies of the operands where the dtype differs), never N·M.

  Storage dtype of ds (= GEMM operand dtype, :func:`~simcse_kernels.ops.gemm.ds_storage_dtype`):
  bf16 for bf16 inputs (the raw bf16 features are exact operands; ds and MixCSE's fp32 mixtures
  are rounded to bf16), fp32 for fp32 and for fp16 inputs (fp16-rounded ds failed the fp16
  gradient tolerance in the Triton backend; fp16 features upcast to fp32 exactly).
* ``SIMCSE_CUDA_BWD=atomic``: the previous backward, kept for comparison. ``block_backward``
  (csrc/block_backward.cu) recomputes each tile, forms dS in shared memory, accumulates dS·ŷ and
  dSᵀ·x̂ with float32 FMAs and float32 atomicAdd into the gradient buffers, and sum(dS·cos) with a
  float64 atomic; ``target_backward`` adds the target logits' −g with float32 atomics. Not
  bitwise reproducible, its products run on CUDA cores. Any other value of ``SIMCSE_CUDA_BWD``
  raises ValueError.

MixCSE's detached mixtures ``mix3``/``mix4`` are built here in float32 (O(N·D)) and enter the
kernels as float32 operands (their blocks use the FMA tiles); no gradient flows through them.

Margins (``margin``, ``angular_margin``; math in :mod:`simcse_kernels.reference`, "Margins and
similarity") change only each row's target entry (i, l_i), so they live in the epilogues of the
existing logit tiles (no extra kernel over the N x M logits, no extra GEMM). The O(N·D) row kernel
``target_cos`` gives each row's target similarity c_i; :func:`margin_terms` turns it into
``δ_i = f(c_i) − m − c_i`` and ``f'(c_i)`` (O(N) elementwise torch, recomputed bitwise equal in the
backward). ``lse_partials`` adds ``δ_i/tau`` to the target entry of the anchors x positives /
negatives blocks (``TargetTerms`` mode "rows", csrc/tile.cuh) and of the symmetric loss's
transposed positives block (mode "cols": the column direction reads the same margined matrix);
``block_dlogits`` recomputes that logit the same way, multiplies the target's ∂L/∂s (its −g_i
included) by ``f'(c_i)`` and gives the ∂tau partial ``dS·(f(c_i) − m)``; the loss's target logit is
``(f(c) − m)/tau`` (+w at the row's own hard negative), and ∂tau subtracts ``Σ g_i (f(c_i) − m)``
in float64. The atomic backward does the same in ``block_backward`` (each target entry redone by
one thread per row after the tile's dS pass) and passes ``g·f'(c)`` to ``target_backward``. Without
a margin no target term is read. ``similarity="dot"``: every inverse norm is 1 (the tiles' "cosines"
are raw dot products), the normalization backward is skipped (∂x = the GEMMs' sums / tau) and no
row is rescaled; a margin still applies, ``angular_margin``/MixCSE do not exist there
(``InfoNCEOptions`` refuses them).

The kernels are exposed as the custom ops ``simcse_kernels::cuda_info_nce_forward`` and
``simcse_kernels::cuda_info_nce_backward`` (with fake implementations, so shapes propagate under
``torch.compile`` and on the meta device), called from :class:`CudaInfoNCEFunction`. Tensors go
to the extension as raw ``data_ptr()`` integers with the current CUDA stream, so the extension
has no dependency on torch's C++ ABI.

Inputs: float32, float16 or bfloat16 (computed in float32; loss float32; gradients in the input
dtype). float64 is not supported by the kernels: an explicit ``backend="cuda"`` raises, and
``"auto"`` (which only lands here on CUDA) computes float64 with the chunked torch backend.
Build: ``pip install -e .`` with nvcc available (see setup.py for SIMCSE_KERNELS_BUILD_CUDA and
SIMCSE_KERNELS_CUDA_ARCHS). :func:`unavailable_reason` says why the backend cannot run.
"""

import functools
import importlib

import torch

from ..errors import BackendUnavailableError, refuse_double_backward
from ..options import InfoNCEOptions
from ..reference import margin_target_grad, margin_target_logit_cos, mixed_features, reduce_loss
from .budget import chunk_budget_bytes, rows_per_chunk
from .features import logit_blocks, temperature_tensor
from .gemm import accumulate_gemm, backward_mode_from_env, ds_storage_dtype

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
PATTERN = {"none": 0, "hard": 1, "self": 2, "mix3": 3, "mix4": 4}
#: where a block's target entries are (csrc/launchers.h, TargetCode)
TARGET = {"none": 0, "rows": 1, "cols": 2}
TILE = 64  # rows and columns of a kernel tile (csrc/tile.cuh)
#: environment variable selecting the backward: "chunked" (default) or "atomic"
BACKWARD_ENV = "SIMCSE_CUDA_BWD"
#: most rows of one backward chunk (grid.y = ceil(R / 64) <= 65535)
MAX_CHUNK_ROWS = 65535 * TILE
BUILD_HINT = "reinstall with nvcc on PATH: SIMCSE_KERNELS_BUILD_CUDA=1 pip install -e ."


@functools.lru_cache(maxsize=1)
def _load_extension():
    """(module, None) or (None, why the import failed)."""
    try:
        return importlib.import_module("simcse_kernels._cuda_ext"), None
    except ImportError as exc:
        return None, f"{type(exc).__name__}: {exc}"


def extension():
    """The compiled ``simcse_kernels._cuda_ext`` module; raises ImportError with the reason if absent."""
    ext, error = _load_extension()
    if ext is None:
        raise ImportError(f"simcse_kernels._cuda_ext is not available ({error}); {BUILD_HINT}")
    return ext


@functools.lru_cache(maxsize=1)
def _runtime_status() -> str:
    return extension().runtime_status()


def _arch_supported(major: int, minor: int, archs: str) -> bool:
    """True if a cubin of ``archs`` ("80;90") runs on sm_<major><minor>, or the PTX of the last one JITs."""
    cc = 10 * major + minor
    compiled = [int(a) for a in archs.split(";") if a.strip().isdigit()]
    if not compiled:
        return True  # unknown build: let the launch report it
    return any(a // 10 == major and a <= cc for a in compiled) or compiled[-1] <= cc


def unavailable_reason(device: torch.device | str) -> str | None:
    """None if the ``"cuda"`` backend can run on ``device``, else a sentence saying why not.

    Args:
        device: the device of the inputs.
    """
    device = torch.device(device)
    ext, error = _load_extension()
    if device.type != "cuda":
        reason = f"the CUDA extension backend runs on CUDA devices only, got device {device.type!r}"
        if ext is None:
            reason += f" (and the extension simcse_kernels._cuda_ext is not built: {error})"
        return reason
    if ext is None:
        return f"the CUDA extension simcse_kernels._cuda_ext is not built or cannot be imported ({error}); {BUILD_HINT}"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available to torch (torch.cuda.is_available() is False)"
    status = _runtime_status()
    if status:
        return status
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if not _arch_supported(major, minor, ext.CUDA_ARCHS):
        return (f"the GPU has compute capability {major}.{minor}, which the extension was not compiled for "
                f"(SIMCSE_KERNELS_CUDA_ARCHS={ext.CUDA_ARCHS}; sm_80 or newer is needed)")
    return None


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def n_splits(n_rows: int, n_cols: int, sm_count: int) -> int:
    """CTAs per row tile: enough for ~2 CTAs per SM, at most one per column tile."""
    row_tiles = -(-n_rows // TILE)
    col_tiles = -(-n_cols // TILE)
    wanted = -(-2 * sm_count // row_tiles)
    return max(1, min(col_tiles, wanted, 65535))


def _operand(t: torch.Tensor | None, inv_norm: torch.Tensor | None, dim: int) -> tuple[int, int, int, int, int]:
    """The (data_ptr, dtype_code, rows, row_stride, inv_norm_ptr) tuple of a (rows, D) tensor (or an absent one)."""
    if t is None:
        return (0, 0, 0, dim, 0)
    if t.stride(1) != 1 and t.shape[1] > 1:
        raise ValueError(f"the CUDA kernels need unit stride along D, got strides {t.stride()}")
    return (t.data_ptr(), DTYPE_CODES[t.dtype], t.shape[0], max(t.stride(0), dim),
            0 if inv_norm is None else inv_norm.data_ptr())


class _Launch:
    """Device index, stream and inverse norms shared by the kernel launches of one call.

    ``dot`` (``similarity="dot"``): every inverse norm is 1, so the kernels' "cosines" are the raw
    dot products (and the backward skips the normalization).
    """

    def __init__(self, tensors: dict[str, torch.Tensor | None], dot: bool = False):
        self.ext = extension()
        first = tensors["anchors"]
        self.device = first.device
        self.index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.stream = torch.cuda.current_stream(self.device).cuda_stream
        self.dim = first.shape[1]
        self.tensors = tensors
        self.dot = dot
        self.inv_norms = {}
        for name, t in tensors.items():
            if t is None:
                continue
            if dot:
                self.inv_norms[name] = torch.ones(t.shape[0], device=self.device, dtype=torch.float32)
                continue
            r = torch.empty(t.shape[0], device=self.device, dtype=torch.float32)
            self.ext.row_inv_norms(_operand(t, None, self.dim), self.dim, r.data_ptr(), self.index, self.stream)
            self.inv_norms[name] = r

    def op(self, name: str) -> tuple[int, int, int, int, int]:
        return _operand(self.tensors[name], self.inv_norms.get(name), self.dim)

    def splits(self, rows: str, cols: str) -> int:
        return n_splits(self.tensors[rows].shape[0], self.tensors[cols].shape[0], _sm_count(self.index))


def margin_terms(target_cos: torch.Tensor, margin: float, angular_margin: float):
    """The margins' per-row target terms from the target similarities ``c`` (reference.py, "Margins").

    Returns ``(f(c) − m, δ = f(c) − m − c, f'(c))``, each (N,) float32 and contiguous: the target
    logit is ``(f(c) − m)/tau``, the kernels add ``δ/tau`` to the block's target entry and multiply its
    ∂L/∂s by ``f'(c)``. Elementwise and deterministic, so the forward and the backward compute the same
    δ from the same ``c``.
    """
    target_sim = margin_target_logit_cos(target_cos, margin, angular_margin)
    return (target_sim.contiguous(), (target_sim - target_cos).contiguous(),
            margin_target_grad(target_cos, angular_margin).to(torch.float32).contiguous())


@torch.library.custom_op("simcse_kernels::cuda_info_nce_forward", mutates_args=(), device_types="cuda")
def cuda_info_nce_forward(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    mix3: torch.Tensor | None,
    mix4: torch.Tensor | None,
    tau: torch.Tensor,
    labels: torch.Tensor,
    hard_negative_weight: float,
    anchor_negatives: bool,
    symmetric: bool,
    margin: float = 0.0,
    angular_margin: float = 0.0,
    dot: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row LSEs, column LSEs and target cosines of the loss (custom op; CUDA only).

    Args:
        anchors: (N, D), positives: (P, D), negatives: (K, D) or None — raw embeddings, one dtype
            (float32/float16/bfloat16), unit stride along D.
        mix3, mix4: (N, D) float32 detached MixCSE mixtures (raw, not normalized), or None.
        tau: 0-dim float32 temperature on the device.
        labels: (N,) int64 targets in [0, P + K).
        hard_negative_weight, anchor_negatives, symmetric: the loss options.
        margin, angular_margin: the target margins (reference.py, "Margins"): the target entry of
            each row (and, symmetric, of each column direction) gets ``δ_i/tau`` (:func:`margin_terms`).
        dot: ``similarity="dot"`` (every inverse norm 1: raw dot products).

    Returns:
        lse (N,) float32 over every block; col_lse (P,) float32 of the positives block's columns
        (empty (0,) unless symmetric); target_cos (N,) float32 = cos(anchor i, candidate labels[i])
        (the raw dot product with ``dot``; before any margin).
    """
    launch = _Launch({"anchors": anchors, "positives": positives, "negatives": negatives, "mix3": mix3,
                      "mix4": mix4}, dot)
    ext, dim = launch.ext, launch.dim
    n, n_pos = anchors.shape[0], positives.shape[0]
    target_cos = torch.empty(n, device=anchors.device, dtype=torch.float32)
    ext.target_cos(launch.op("anchors"), launch.op("positives"), launch.op("negatives"), dim, labels.data_ptr(),
                   target_cos.data_ptr(), launch.index, launch.stream)
    delta = margin_terms(target_cos, margin, angular_margin)[1] if margin or angular_margin else None

    def targets(mode, offset=-1):  # keyword arguments of a launch whose block holds target entries
        if delta is None or (mode == "rows" and offset < 0):
            return {}
        return dict(labels=labels.data_ptr(), target_mode=TARGET[mode], target_col_offset=offset,
                    target_delta=delta.data_ptr())

    parts = []
    for rows, cols, pattern in logit_blocks(negatives is not None, anchor_negatives, mix3 is not None):
        splits = launch.splits(rows, cols)
        part = torch.empty((splits, n), device=anchors.device, dtype=torch.float32)
        ext.lse_partials(launch.op(rows), launch.op(cols), dim, tau.data_ptr(), hard_negative_weight,
                         PATTERN[pattern], splits, part.data_ptr(), launch.index, launch.stream,
                         **targets("rows", _target_col_offset(rows, cols, n_pos)))
        parts.append(part)
    lse = torch.logsumexp(torch.cat(parts), dim=0)
    if symmetric:  # the column direction reads the same (margined) positives block, transposed
        splits = launch.splits("positives", "anchors")
        part = torch.empty((splits, n_pos), device=anchors.device, dtype=torch.float32)
        ext.lse_partials(launch.op("positives"), launch.op("anchors"), dim, tau.data_ptr(), 0.0, PATTERN["none"],
                         splits, part.data_ptr(), launch.index, launch.stream, **targets("cols"))
        col_lse = torch.logsumexp(part, dim=0)
    else:
        col_lse = torch.empty(0, device=anchors.device, dtype=torch.float32)
    return lse, col_lse, target_cos


@cuda_info_nce_forward.register_fake
def _cuda_info_nce_forward_fake(anchors, positives, negatives, mix3, mix4, tau, labels, hard_negative_weight,
                                anchor_negatives, symmetric, margin=0.0, angular_margin=0.0, dot=False):
    n, p = anchors.shape[0], positives.shape[0]
    return (anchors.new_empty(n, dtype=torch.float32), anchors.new_empty(p if symmetric else 0, dtype=torch.float32),
            anchors.new_empty(n, dtype=torch.float32))


def backward_mode() -> str:
    """``"chunked"`` (default: deterministic, 4 GEMM-equivalents) or ``"atomic"`` (``SIMCSE_CUDA_BWD=atomic``)."""
    return backward_mode_from_env(BACKWARD_ENV)


def backward_rows_per_chunk(n_rows: int, n_cols: int, storage: torch.dtype, chunk_budget_mib: float | None) -> int:
    """Rows R of one (R, n_cols) ds chunk of the default backward: within the budget (option, else
    ``$SIMCSE_KERNELS_CHUNK_MIB``, else 256 MiB), a multiple of the 64-row tile (at least one tile),
    at most ``n_rows`` and :data:`MAX_CHUNK_ROWS`."""
    rows = rows_per_chunk(n_rows, n_cols, storage.itemsize, chunk_budget_bytes(chunk_budget_mib), multiple=TILE)
    return min(rows, MAX_CHUNK_ROWS)


def _target_col_offset(rows: str, cols: str, n_pos: int) -> int:
    """First label of a block's columns when the block holds target columns, else -1."""
    if rows != "anchors":
        return -1
    return {"positives": 0, "negatives": n_pos}.get(cols, -1)


def _zero_grad_buffers(t: dict) -> tuple[dict, torch.Tensor]:
    """float32 gradient accumulators of anchors, positives and negatives (if any), and a 0-dim
    float64 accumulator of sum dS·cos, on the anchors' device (both backwards)."""
    dev = t["anchors"].device
    grads = {name: torch.zeros(t[name].shape, device=dev, dtype=torch.float32)
             for name in ("anchors", "positives", "negatives") if t[name] is not None}
    return grads, torch.zeros((), device=dev, dtype=torch.float64)


def _backward_chunked(launch, tau, labels, lse, col_lse, row_weight, col_weight, g, w, anchor_negatives, symmetric,
                      margins, chunk_budget_mib):
    """The default backward (module docstring): row chunks of ds, two GEMMs per block.

    ``margins``: :func:`margin_terms` of the target similarities, or None (no margin); block_dlogits
    applies their δ and f'(c) at the target entries.

    Returns:
        ({name: float32 ∂x̂ (rows, D)} for anchors, positives and negatives (if any), 0-dim float64
        sum of dS·cos over the non-target logits).
    """
    ext, dim, t = launch.ext, launch.dim, launch.tensors
    anchors = t["anchors"]
    n, n_pos, dev = anchors.shape[0], t["positives"].shape[0], anchors.device
    storage = ds_storage_dtype(anchors.dtype)
    layout = []  # (block, first ds column, first partial column, columns)
    col0 = tile0 = 0
    for block in logit_blocks(t["negatives"] is not None, anchor_negatives, t["mix3"] is not None):
        m = t[block.cols].shape[0]
        layout.append((block, col0, tile0, m))
        col0 += m
        tile0 += -(-m // TILE)
    m_total, n_tiles = col0, tile0
    raw_cache = {}

    def raw(name):  # the GEMM operand: raw rows in the storage dtype (inverse norms are folded into ds)
        if name not in raw_cache:
            x = t[name]
            raw_cache[name] = x if x.dtype == storage else x.to(storage)
        return raw_cache[name]

    grads, dtau_acc = _zero_grad_buffers(t)
    margin_ptrs = {} if margins is None else dict(target_delta=margins[1].data_ptr(),
                                                  target_grad=margins[2].data_ptr())
    rows_cap = backward_rows_per_chunk(n, m_total, storage, chunk_budget_mib)
    ds_buf = torch.empty((min(rows_cap, n), m_total), device=dev, dtype=storage)
    part_buf = torch.empty((min(rows_cap, n), n_tiles), device=dev, dtype=torch.float32)
    for r0 in range(0, n, rows_cap):
        r1 = min(n, r0 + rows_cap)
        ds, part = ds_buf[: r1 - r0], part_buf[: r1 - r0]
        for block, c0, tile_c0, _ in layout:
            column_softmax = symmetric and (block.rows, block.cols) == ("anchors", "positives")
            ext.block_dlogits(
                launch.op(block.rows), launch.op(block.cols), dim, tau.data_ptr(), w, PATTERN[block.pattern], r0,
                r1, lse.data_ptr(), row_weight.data_ptr(), col_lse.data_ptr() if column_softmax else 0,
                col_weight.data_ptr() if column_softmax else 0, labels.data_ptr(), g.data_ptr(),
                _target_col_offset(block.rows, block.cols, n_pos), ds.data_ptr(), DTYPE_CODES[storage], m_total,
                c0, part.data_ptr(), n_tiles, tile_c0, launch.index, launch.stream, **margin_ptrs,
            )
        dtau_acc += part.sum(dtype=torch.float64)
        for block, c0, _, m in layout:
            ds_block = ds[:, c0:c0 + m]
            if block.rows in grads:
                accumulate_gemm(grads[block.rows][r0:r1], ds_block, raw(block.cols), accumulate=True)
            if block.cols in grads:
                accumulate_gemm(grads[block.cols], ds_block.T, raw(block.rows)[r0:r1], accumulate=True)
    for name, buf in grads.items():  # the GEMMs gave r ∂x̂: divide the row scaling out (dot: r = 1)
        if not launch.dot:
            buf.div_(launch.inv_norms[name][:, None])
    return grads, dtau_acc


def _backward_atomic(launch, tau, labels, lse, col_lse, row_weight, col_weight, g, w, anchor_negatives, symmetric,
                     margins):
    """The ``SIMCSE_CUDA_BWD=atomic`` backward: block_backward + target_backward (float atomics).

    ``margins``: :func:`margin_terms` of the target similarities, or None; block_backward applies
    their δ and f'(c) to the target entries' softmax part, target_backward gets ``g·f'(c)``.
    """
    ext, dim, t = launch.ext, launch.dim, launch.tensors
    grads, dtau_acc = _zero_grad_buffers(t)
    ptr = lambda x: 0 if x is None else x.data_ptr()
    n_pos = t["positives"].shape[0]
    for rows, cols, pattern in logit_blocks(t["negatives"] is not None, anchor_negatives, t["mix3"] is not None):
        column_softmax = symmetric and (rows, cols) == ("anchors", "positives")
        offset = _target_col_offset(rows, cols, n_pos)
        margin_args = {} if margins is None or offset < 0 else dict(
            labels=labels.data_ptr(), target_col_offset=offset, target_delta=margins[1].data_ptr(),
            target_grad=margins[2].data_ptr())
        ext.block_backward(
            launch.op(rows), launch.op(cols), dim, tau.data_ptr(), w, PATTERN[pattern],
            lse.data_ptr(), row_weight.data_ptr(), col_lse.data_ptr() if column_softmax else 0,
            col_weight.data_ptr() if column_softmax else 0, ptr(grads.get(rows)), ptr(grads.get(cols)),
            dtau_acc.data_ptr(), launch.splits(rows, cols), launch.index, launch.stream, **margin_args,
        )
    g_target = g if margins is None else (g * margins[2]).contiguous()  # the target's -g_i, times f'(c_i)
    ext.target_backward(launch.op("anchors"), launch.op("positives"), launch.op("negatives"), dim, labels.data_ptr(),
                        g_target.data_ptr(), grads["anchors"].data_ptr(), grads["positives"].data_ptr(),
                        ptr(grads.get("negatives")), launch.index, launch.stream)
    return grads, dtau_acc


@torch.library.custom_op("simcse_kernels::cuda_info_nce_backward", mutates_args=(), device_types="cuda")
def cuda_info_nce_backward(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    mix3: torch.Tensor | None,
    mix4: torch.Tensor | None,
    tau: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    col_lse: torch.Tensor,
    row_weight: torch.Tensor,
    col_weight: torch.Tensor,
    g: torch.Tensor,
    hard_negative_weight: float,
    anchor_negatives: bool,
    symmetric: bool,
    chunk_budget_mib: float | None = None,
    target_cos: torch.Tensor | None = None,
    margin: float = 0.0,
    angular_margin: float = 0.0,
    dot: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_i g_i loss_i w.r.t. the raw embeddings, and sum dS·cos (custom op; CUDA only).

    Args:
        anchors, positives, negatives, mix3, mix4, tau, labels, options: as the forward op.
        lse: (N,) and col_lse: (P,) or (0,) float32 from the forward.
        row_weight: (N,) float32 weight of each row's softmax (g, or g/2 when symmetric).
        col_weight: (P,) float32 weight of each positive column's softmax (symmetric) or (0,).
        g: (N,) float32 upstream gradient of the per-row losses (weight of the target logits).
        chunk_budget_mib: budget of the default backward's (R, M) ds chunk (None: the
            ``$SIMCSE_KERNELS_CHUNK_MIB`` / 256 MiB default); unused by the atomic backward.
        target_cos: (N,) float32 target similarities from the forward (needed with a margin).
        margin, angular_margin: the target margins, as the forward (their per-row terms come from
            :func:`margin_terms` of ``target_cos``, bitwise the forward's).
        dot: ``similarity="dot"`` (no normalization: the gradients are ∂x = ∂(x·y)-terms / tau).

    Returns:
        grad_anchors (N, D), grad_positives (P, D), grad_negatives (K, D) or (0, D), all in the
        input dtype, and a 0-dim float64 ``sum_ij dS_ij sim_ij`` over the non-target logits' dS
        (``sim`` = the cosine, ``f(c) − m`` at margined targets; dL/dtau = -(that - sum_i g_i
        target_sim_i) / tau^2).
    """
    mode = backward_mode()
    launch = _Launch({"anchors": anchors, "positives": positives, "negatives": negatives, "mix3": mix3,
                      "mix4": mix4}, dot)
    ext, dim = launch.ext, launch.dim
    margins = margin_terms(target_cos, margin, angular_margin) if margin or angular_margin else None
    args = (launch, tau, labels, lse, col_lse, row_weight, col_weight, g, hard_negative_weight, anchor_negatives,
            symmetric)
    if mode == "atomic":
        grads, dtau_acc = _backward_atomic(*args, margins)
    else:
        grads, dtau_acc = _backward_chunked(*args, margins, chunk_budget_mib)
    outputs = []
    for name in ("anchors", "positives", "negatives"):
        t = launch.tensors[name]
        if t is None:
            outputs.append(anchors.new_empty((0, dim)))
            continue
        if dot:  # no normalization backward: ∂x = (the GEMMs' ∂(x·y) terms) / tau
            outputs.append(grads[name].div_(tau).to(t.dtype))
            continue
        out = torch.empty(t.shape, device=t.device, dtype=t.dtype)
        ext.normalize_backward(_operand(t, None, dim), dim, grads[name].data_ptr(), tau.data_ptr(), out.data_ptr(),
                               launch.index, launch.stream)
        outputs.append(out)
    return outputs[0], outputs[1], outputs[2], dtau_acc


@cuda_info_nce_backward.register_fake
def _cuda_info_nce_backward_fake(anchors, positives, negatives, mix3, mix4, tau, labels, lse, col_lse, row_weight,
                                 col_weight, g, hard_negative_weight, anchor_negatives, symmetric,
                                 chunk_budget_mib=None, target_cos=None, margin=0.0, angular_margin=0.0,
                                 dot=False):
    grad_n = torch.empty_like(negatives) if negatives is not None else anchors.new_empty((0, anchors.shape[1]))
    return (torch.empty_like(anchors), torch.empty_like(positives), grad_n,
            anchors.new_empty((), dtype=torch.float64))


def _target_logits(target_sim, tau, labels, n_pos, has_negatives, weight):
    """Each row's target logit: sim / tau (sim = cos, or f(c) − m with margins), plus w when the target
    is the row's own hard negative."""
    target = target_sim / tau
    if has_negatives and weight != 0.0:
        rows = torch.arange(labels.shape[0], device=labels.device)
        target = target + weight * (labels == n_pos + rows)
    return target


class CudaInfoNCEFunction(torch.autograd.Function):
    """Per-row losses (N,) float32 from raw embeddings via the CUDA kernels (see module docstring).

    apply(anchors, positives, negatives, mix3, mix4, tau, labels, w, anchor_negatives, symmetric,
    chunk_budget_mib=None, margin=0.0, angular_margin=0.0, dot=False): tensors as
    :func:`cuda_info_nce_forward`, ``chunk_budget_mib`` as :func:`cuda_info_nce_backward`, the margins
    and ``dot`` (``similarity="dot"``) as the forward op; gradients reach anchors, positives,
    negatives (input dtype) and tau (float32).
    """

    @staticmethod
    def forward(ctx, anchors, positives, negatives, mix3, mix4, tau, labels, w, anchor_negatives, symmetric,
                chunk_budget_mib=None, margin=0.0, angular_margin=0.0, dot=False):
        lse, col_lse, target_cos = torch.ops.simcse_kernels.cuda_info_nce_forward(
            anchors, positives, negatives, mix3, mix4, tau, labels, w, anchor_negatives, symmetric, margin,
            angular_margin, dot,
        )
        has_margin = bool(margin or angular_margin)
        target_sim = margin_terms(target_cos, margin, angular_margin)[0] if has_margin else target_cos
        target = _target_logits(target_sim, tau, labels, positives.shape[0], negatives is not None, w)
        loss = lse - target
        if symmetric:
            loss = 0.5 * (loss + col_lse[labels] - target)
        ctx.save_for_backward(anchors, positives, negatives, mix3, mix4, tau, labels, lse, col_lse, target_cos)
        ctx.options = (w, anchor_negatives, symmetric, chunk_budget_mib, margin, angular_margin, dot)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_double_backward('cuda', torch.is_grad_enabled(), torch.compiler.is_compiling())
        anchors, positives, negatives, mix3, mix4, tau, labels, lse, col_lse, target_cos = ctx.saved_tensors
        w, anchor_negatives, symmetric, chunk_budget_mib, margin, angular_margin, dot = ctx.options
        target_sim = margin_terms(target_cos, margin, angular_margin)[0] if margin or angular_margin else target_cos
        g = grad_loss.float().contiguous()
        if symmetric:
            row_weight = 0.5 * g
            col_weight = torch.zeros(positives.shape[0], device=g.device, dtype=g.dtype).index_add_(0, labels, 0.5 * g)
        else:
            row_weight = g
            col_weight = g.new_empty(0)
        grad_a, grad_p, grad_n, dtau_acc = torch.ops.simcse_kernels.cuda_info_nce_backward(
            anchors, positives, negatives, mix3, mix4, tau, labels, lse, col_lse, row_weight, col_weight, g, w,
            anchor_negatives, symmetric, chunk_budget_mib, target_cos, margin, angular_margin, dot,
        )
        # sum dS·sim nearly cancels against the target term: subtract in float64
        dtau_cos = dtau_acc - (g.double() * target_sim.double()).sum()
        grad_tau = (-dtau_cos / (tau.double() * tau.double())).to(tau.dtype)
        return (grad_a, grad_p, grad_n if negatives is not None else None, None, None, grad_tau,
                None, None, None, None, None, None, None, None)


def _check_cuda_inputs(anchors, positives, negatives, labels) -> None:
    """Raise unless every tensor is on one CUDA device with a dtype the kernels support."""
    for name, t in (("anchors", anchors), ("positives", positives), ("negatives", negatives)):
        if t is None:
            continue
        if t.device.type != "cuda":
            raise ValueError(f"backend 'cuda' needs CUDA tensors, {name} is on {t.device}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"backend 'cuda' supports float32, float16 and bfloat16, {name} is {t.dtype} "
                            "(use backend='torch' for float64)")
        if t.device != anchors.device:
            raise ValueError(f"{name} is on {t.device} but anchors is on {anchors.device}")
    if labels.device != anchors.device:
        raise ValueError(f"labels is on {labels.device} but anchors is on {anchors.device}")


def cuda_info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    labels: torch.Tensor,
    options: InfoNCEOptions,
) -> torch.Tensor:
    """The reduced loss of already validated inputs on the CUDA extension (like ``reference_loss``).

    Args:
        anchors: (N, D), positives: (P, D), negatives: (K, D) or None; one CUDA device and dtype.
        labels: (N,) integer targets.
        options: the loss options (temperature may be a learnable 0-dim tensor).

    Returns:
        float32 loss, shape () or (N,) for ``reduction="none"``.
    """
    if anchors.dtype == torch.float64 and options.backend != "cuda":
        # "auto" picked this backend: float64 is computed by the chunked torch backend instead.
        from .chunked import chunked_per_row_loss, chunked_scalar_loss
        from .features import normalized_features

        feats = normalized_features(anchors, positives, negatives, options)
        if options.reduction != "none":
            return chunked_scalar_loss(feats, labels, options)
        return reduce_loss(chunked_per_row_loss(feats, labels, options), options.reduction)
    _check_cuda_inputs(anchors, positives, negatives, labels)
    reason = unavailable_reason(anchors.device)
    if reason is not None:
        raise BackendUnavailableError(f"backend 'cuda' is unavailable on {anchors.device}: {reason}")
    mix3 = mix4 = None
    if options.mix_lambda is not None:
        mix3 = mixed_features(positives.float(), options.mix_lambda).contiguous()
        mix4 = mixed_features(anchors.float(), options.mix_lambda).contiguous()
    tau = temperature_tensor(options, anchors.device, torch.float32)
    per_row = CudaInfoNCEFunction.apply(
        anchors.contiguous(), positives.contiguous(), None if negatives is None else negatives.contiguous(),
        mix3, mix4, tau, labels.to(torch.int64).contiguous(), float(options.hard_negative_weight),
        options.anchor_negatives, options.symmetric,
        None if options.chunk_budget_mib is None else float(options.chunk_budget_mib),
        float(options.margin), float(options.angular_margin), options.similarity == "dot",
    )
    return reduce_loss(per_row, options.reduction)
