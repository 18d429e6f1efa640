r"""Backend ``"triton"``: fused Triton kernels for the whole InfoNCE family, forward and backward.

The math of every option and the gradient derivation are in :mod:`simcse_kernels.reference`
(section "Gradient"); the kernels (:mod:`simcse_kernels.ops.triton_kernels`) mirror the chunked
torch backend :mod:`simcse_kernels.ops.chunked` tile by tile and never write an N x M buffer.

Algorithm
---------
* Inverse norms ``r = 1/max(‖x‖, 1e-12)`` of every feature matrix (O(N) vectors, one kernel).
  Logit tiles are ``tl.dot(raw rows, raw cols) · r_i · r_j / tau`` with fp32 accumulation
  (fp64 for fp64 inputs); fp32 inputs use ``input_precision="tf32"`` only when
  ``torch.backends.cuda.matmul.allow_tf32`` is set, ``"ieee"`` otherwise.
* Forward: one program per ``BLOCK_M`` anchor rows walks every column block (positives,
  negatives, anchors, mix3, mix4) with an online max/sum and picks up the target logit; it saves
  the per-row LSE (N,). ``symmetric=True`` adds a second kernel over positive-column blocks for
  the column LSE (P,).
* Backward (default, ``"chunked"``; :func:`backward_mode`): anchor rows are processed in chunks
  of R rows. For each chunk one Triton kernel
  (:func:`simcse_kernels.ops.triton_dlogits._dlogits_chunk_kernel`) recomputes the chunk's logit
  tiles of every block (full-D dots, as the forward) and writes ``∂L/∂s / tau`` as an (R, M_total)
  buffer in the reference's column order ``[P | K | N anchor-neg | N mix3 | N mix4]``, with every
  option's epilogue fused (inverse norms, 1/tau, hard-negative weight, MixCSE's constant entries,
  ``exp(s − lse)``, the target column, the symmetric column term); it also writes per (row, column
  tile) partial sums of ``∂L/∂s · cos`` for ∂L/∂tau, reduced in torch. The stored entry is
  ``ds_ij = r_i r_j ∂L/∂s_ij / tau`` (both inverse norms folded in), so two GEMMs in torch (cuBLAS
  on a GPU, fp32 accumulation) run on the **raw** features, never on rounded normalized copies:
  ``r_a ∂â[chunk] = ds[:, row-role columns] @ [p; n; a; mix3]`` and, block by block,
  ``r_p ∂p̂ += ds[:, P]ᵀ a[chunk]``, ``r_n ∂n̂ += ds[:, K]ᵀ a[chunk]``, ``r_a ∂â += ds[:, anchor-neg]ᵀ
  a[chunk]`` (the anchor-negatives' column role), ``r_p ∂p̂ += ds[:, mix4]ᵀ mix4[chunk]`` (the mix4
  block's rows are detached mix4, so it has no row GEMM; the mix3 columns are detached, so no
  column GEMM); one O((N+M)·D) division by ``r`` gives ``∂x̂``. The normalization backward
  ``∂x = r (∂x̂ − x̂ (x̂·∂x̂))`` is the existing O((N+M)·D) kernel.
  R comes from a memory budget: :func:`simcse_kernels.ops.budget.rows_per_chunk` with
  ``chunk_budget_mib`` (option, else ``$SIMCSE_KERNELS_CHUNK_MIB``, else 256 MiB), a multiple of
  the kernel's ``BLOCK_M``; extra memory is O(R·M_total + (N + M)·D), never N·M.

  Cost, in GEMM-equivalents (one similarity GEMM = 2·N·M·D FLOPs, M = every logit column):
  forward 1 (+1 column-LSE kernel when symmetric), recompute 1, gradient GEMMs ≤ 2 (exactly 2
  when every column has a row and a column role; MixCSE's detached blocks make it less):
  **≤ 4 at every D and option, ≤ 5 symmetric** — checked by ``tests/test_gemm_count.py``
  (:mod:`simcse_kernels.analysis.gemm_count`), which counts every ``tl.dot`` (with the CUDA block
  sizes) and every torch matmul. No float atomics: each kernel program owns its outputs and the
  GEMMs accumulate chunk after chunk in a fixed order, so gradients are bitwise reproducible.

  Why this design (and not the alternatives): (a) the previous two-kernel backward (a row-block
  kernel and a column-block kernel, each splitting D into ``BLOCK_DO`` slices to bound its
  accumulator) recomputed the logits once per D slice in each kernel: 5 GEMM-eq at D = 128, 15
  at D = 768, growing with D; it was removed. (b) The one-pass tile kernel with fp32 atomics
  (``SIMCSE_TRITON_BWD=atomic``, kept as the alternative) does 4 but adds (BLOCK_M + BLOCK_N)·D
  atomics per tile and is not reproducible. (c) Materializing ``∂L/∂s`` per row chunk costs
  ~6 bytes per logit (one bf16 store, two loads) against 4·D FLOPs of the two GEMMs: at D = 768
  ~510 FLOP/byte, above an H100's ridge (~790 TFLOP/s / 3.35 TB/s ≈ 240), so the GEMMs run at
  cuBLAS speed on tensor cores with no D-sliced recomputation. At D = 128 it is ~85 FLOP/byte:
  there the ``∂L/∂s`` round trip, not the FLOPs, bounds the time (model, not measured); a kernel
  whose accumulator spans all of D would avoid it and is not implemented.

  Storage dtype of ``∂L/∂s`` (= the GEMM operand dtype): bf16 for bf16 inputs (as
  flash-attention's backward; the raw bf16 features are exact operands, only ``ds`` and MixCSE's
  fp32 mixtures are rounded to bf16); the input dtype for fp32/fp64 (fp32 GEMMs use tf32 only when
  ``torch.backends.cuda.matmul.allow_tf32`` is set, as the kernels' ``DOT_PREC``); **fp32 for fp16
  inputs** (the fp16 features upcast exactly; fp32 GEMMs as for fp32 inputs). Why not fp16 with a
  global power-of-two scale (range is not the problem: the row scaling and one scale would keep
  entries in range unless a zero vector's ``r = 1e12`` is folded in): the rounding of ``ds`` to
  fp16 alone exceeds the fp16 gradient tolerance of ``tests/conftest.py`` (set by the previous,
  fp32-accurate backward) on plain random inputs: 1.2x over it with raw fp16 operands (N = 70,
  D = 64, randn seed 3, mean), 2x with fp16 normalized copies (seed 2); fp32 storage passes both. The price: fp16 inputs get fp32 GEMMs (IEEE unless tf32 is allowed), slower than
  bf16's tensor-core GEMMs; train in bf16 for speed. On CUDA, bf16 GEMMs are
  ``torch.mm``/``torch.addmm`` with ``out_dtype=torch.float32`` (fp32 accumulation into the fp32
  gradient buffers); on CPU (interpreter tests only) the operands are upcast to fp32.
  Inputs that need no gradient skip their GEMMs (and the ``∂L/∂s`` store when only ∂tau is needed).
* ``SIMCSE_TRITON_BWD=atomic`` selects the alternative backward: one program per (row block,
  column block) tile of each logit block recomputes the logits once and atomically adds both
  gradient products, chunk by chunk of D, into zero-initialised fp32/fp64 buffers (4 GEMM-eq,
  nondeterministic; kept for comparison on GPUs).
* ``∂L/∂tau = −(1/tau²) Σ ∂L/∂s · cos`` (exact, including the mix4 block when tau is learnable).
* MixCSE's mixtures ``mix3``/``mix4`` are detached (N, D) tensors built in the compute dtype
  (as :mod:`simcse_kernels.ops.features` does). The forward and the ``∂L/∂s`` kernel never dot
  them: by linearity ``a_i·mix3_j = λ a_i·p_j + (1-λ) a_i·p_{(j+1) mod N}`` and ``mix4_i·p_j =
  λ a_i·p_j + (1-λ) a_{(i+1) mod N}·p_j``, so each positives tile runs three raw dots of the input
  dtype and yields the positives, mix3 and mix4 tiles (one dot per logit tile; ``λ`` is passed to
  the kernels, the mixtures' inverse norms come from the fp32 mixtures). That is for 16-bit inputs;
  fp32/fp64 mixtures are in the input dtype and are dotted directly, one dot per tile as well. The
  gradient GEMMs use the mixtures (in the ``∂L/∂s`` storage dtype); the atomic backward dots them.

Block sizes
-----------
Under ``TRITON_INTERPRET=1`` (CPU tests): ``BLOCK_M=BLOCK_N=32, BLOCK_K=128, BLOCK_DO=256``
(:data:`INTERPRET_BLOCKS`; each interpreted op costs ~0.1 ms, so few big tiles) so that N = 129 /
D = 384 still cross several row, column, K and output-D blocks; the tests also shrink them to 16.
``SIMCSE_TRITON_BLOCKS=cuda`` (test-only: the GEMM-count test) makes :func:`block_config` return
the CUDA heuristics under the interpreter too. On CUDA, heuristics by dtype and D
(:func:`block_config`), or a small ``triton.autotune`` set keyed on D and the block flags when
``SIMCSE_TRITON_AUTOTUNE=1`` (forward kernels; the ``∂L/∂s`` kernel uses the heuristics, its grid
and partial-sum buffer depend on the blocks):

* 16-bit: forward 128 x 64 x 32, ``∂L/∂s`` kernel 128 x 32 x 32 (8 warps, 3 stages); atomic backward
  64 x 64 x 64 and ``BLOCK_DO = min(64, next_pow2(D))`` (8 warps, 2 stages).
* fp32: forward and ``∂L/∂s`` 64 x 64 x 16, 8 warps (forward 1 stage: with 2 the MixCSE forward
  spilled, with 4 warps under Triton 3.6 and with 8 under 3.9; ``∂L/∂s`` 2 stages, it spills with
  4 warps); atomic backward 64 x 32 x 32,
  ``BLOCK_DO = min(32, next_pow2(D))`` (8 warps, 1 stage; with "ieee" these dots run on CUDA cores).
* fp64: 32 x 32 x 16, ``BLOCK_DO = min(64, next_pow2(D))``.

These compile for sm_80 and sm_90 (Triton 3.9 and 3.6) without register spills, within the
shared-memory limits and with tensor-core MMAs in every 16-bit dot (tests/test_compile_targets.py;
``BLOCK_K = 64`` forward tiles spilled with the MixCSE blocks on sm_80, ``BLOCK_DO = 128``
atomic tiles spilled on sm_80 and, in fp32, on sm_90; fp32 forward tiles with ``BLOCK_K = 32``
spilled on sm_90 with 8 warps and on sm_80 with 4).

Dot precision: the cosine dots of 16-bit inputs are exact products with fp32 accumulation;
the MixCSE blocks of the forward and the ``∂L/∂s`` kernel are the same exact 16-bit dots (raw
anchors x raw positives, combined with λ in fp32: see "MixCSE's mixtures" above), one per logit
tile, with no split and no fp32 operand; the atomic backward's MixCSE blocks (16-bit input x fp32
mixture) split the mixture into 16-bit parts (3 bf16 / 2 fp16, fp32-accurate; ``_split_dot`` in
triton_kernels.py).
Gradient GEMMs of the default backward: see "Storage dtype" above. The atomic backward's
gradient dots: bf16 inputs cast ``∂L/∂s`` to bf16 (and a MixCSE mixture too); fp16 inputs keep
``∂L/∂s`` fp32 and dot it as tf32 (fp16's 11-bit significand with fp32's range, so it does not
underflow; "ieee" without tf32); fp32/fp64 use the forward's precision.

Custom ops
----------
The kernels run inside two ``torch.library.custom_op`` s (``simcse_kernels::triton_info_nce_fwd``
/ ``_bwd``) with fake (meta) implementations, called from :class:`TritonInfoNCEFunction`, so
``torch.compile`` traces the loss without a graph break.
"""

from __future__ import annotations

import os

import torch

from ..errors import refuse_double_backward
from ..reference import margin_target_grad, margin_target_logit_cos, mixed_features, reduce_loss
from .budget import chunk_budget_bytes, rows_per_chunk
from .features import compute_dtype_for, temperature_tensor
from .gemm import accumulate_gemm, backward_mode_from_env, ds_storage_dtype

try:  # triton is an optional dependency
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources

    from . import triton_dlogits as _dl
    from . import triton_kernels as _k

    _TRITON_IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the environment
    triton = tl = _k = _dl = None
    OutOfResources = RuntimeError
    _TRITON_IMPORT_ERROR = str(exc)

#: triton decides at decoration time whether kernels are interpreted: record it at import.
_INTERPRETED_AT_IMPORT = os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device: torch.device | str) -> str | None:
    """None if the Triton kernels can run on ``device``, else a sentence saying why not."""
    device = torch.device(device)
    if _TRITON_IMPORT_ERROR is not None:
        return f"triton cannot be imported ({_TRITON_IMPORT_ERROR}); pip install 'simcse-kernels[triton]'"
    if device.type == "cuda":
        if _INTERPRETED_AT_IMPORT:
            return ("TRITON_INTERPRET=1 was set when the kernels were imported: they run in the CPU "
                    "interpreter only; unset it to run them on CUDA")
        return None if torch.cuda.is_available() else "CUDA is not available in this torch build"
    if device.type == "cpu":
        if _INTERPRETED_AT_IMPORT and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return ("the Triton kernels need a CUDA GPU; on CPU they run only in the Triton interpreter "
                "(set TRITON_INTERPRET=1 before importing triton; slow, meant for tests)")
    return f"the Triton kernels do not support device type {device.type!r}"


# ----------------------------------------------------------------------------------------------
# block sizes

def _interpreting() -> bool:
    return _INTERPRETED_AT_IMPORT


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


#: block sizes under the interpreter (small: several blocks at test shapes, few Python steps)
INTERPRET_BLOCKS = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128, BLOCK_DO=256)


def _interpreter_blocks() -> bool:
    """Interpreter block sizes: interpreting, unless ``SIMCSE_TRITON_BLOCKS=cuda`` (test-only: the
    GEMM-count test runs the interpreter with the blocks a CUDA device would get for every kernel
    with dots; the norm kernels keep the interpreter's blocks)."""
    return _interpreting() and os.environ.get("SIMCSE_TRITON_BLOCKS", "") != "cuda"


def block_config(kind: str, d: int, dtype: torch.dtype) -> dict:
    """Launch parameters of kernel ``kind`` for dimension ``d`` and input ``dtype``.

    ``kind``: "fwd" (forward kernels), "dlogits" (the default backward's ``∂L/∂s`` kernel: the
    forward's tiles), "bwd" (the atomic backward, with ``BLOCK_DO``) or "norm".
    """
    if kind not in ("fwd", "dlogits", "bwd", "norm"):
        raise ValueError(f"unknown kernel kind {kind!r}")
    if kind == "norm":  # memory-bound: ~8 elements per thread (pointer tensors cost 2 registers each)
        if _interpreting():  # (no dots: the GEMM count keeps the interpreter's fast blocks)
            return dict(BLOCK_R=16, BLOCK_D=min(256, max(16, _next_pow2(d))))
        return dict(BLOCK_R=8, BLOCK_D=min(128, max(16, _next_pow2(d))), num_warps=4)
    dlogits = kind == "dlogits"
    if kind == "dlogits":
        kind = "fwd"
    if _interpreter_blocks():
        cfg = dict(INTERPRET_BLOCKS)
        if kind == "fwd":
            cfg.pop("BLOCK_DO")
        return cfg
    d_pow2 = max(16, _next_pow2(d))
    if dtype == torch.float64:
        cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, BLOCK_DO=min(64, d_pow2), num_warps=4, num_stages=2)
    # (warps, BLOCK_K and BLOCK_DO chosen so that no kernel spills registers when compiled for
    # sm_80 and sm_90: tests/test_compile_targets.py)
    elif dtype == torch.float32:
        if kind == "fwd":
            # (forward: one stage; with 2 the MixCSE forward spilled on sm_80/sm_90, with 4 warps
            # under Triton 3.6 and with 8 under 3.9; the dS kernel spills with 4 warps)
            cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2 if dlogits else 1)
        else:
            # (atomic backward: one stage; with 2 its margined hard-negative tile (MARGIN) spilled
            # 24 B on sm_90 under Triton 3.9; with 1 no variant spills on sm_80/sm_90)
            cfg = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, BLOCK_DO=min(32, d_pow2), num_warps=8,
                       num_stages=1)
    else:
        if kind == "fwd":
            cfg = dict(BLOCK_M=128, BLOCK_N=32 if dlogits else 64, BLOCK_K=32, num_warps=8, num_stages=3)
        else:
            cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64 if d >= 64 else 32, BLOCK_DO=min(64, d_pow2),
                       num_warps=8, num_stages=2)
    if kind == "fwd":
        cfg.pop("BLOCK_DO", None)
    return cfg


def _autotune_enabled() -> bool:
    return not _interpreting() and os.environ.get("SIMCSE_TRITON_AUTOTUNE", "0") == "1"


_TUNED: dict[str, object] = {}


def _tuned(name: str):
    """The autotuned wrapper of kernel ``name`` (CUDA only), built on first use."""
    if name in _TUNED:
        return _TUNED[name]
    Config = triton.Config
    if name in ("fwd_row", "fwd_col"):
        configs = [Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=wp, num_stages=st)
                   for m, n, k, wp, st in [(128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3),
                                           (64, 64, 32, 4, 4), (32, 32, 16, 4, 2)]]
        key = ["D", "HAS_NEG", "ANCHOR_NEG", "HAS_MIX"] if name == "fwd_row" else ["D"]
    else:
        raise ValueError(f"no autotune set for kernel {name!r}")
    kernel = {"fwd_row": _k._fwd_row_kernel, "fwd_col": _k._fwd_col_kernel}[name]
    _TUNED[name] = triton.autotune(configs=configs, key=key)(kernel)
    return _TUNED[name]


def _smaller(cfg: dict) -> dict | None:
    """A config using less shared memory/registers (fewer stages, then halved tiles), or None."""
    cfg = dict(cfg)
    if cfg.get("num_stages", 1) > 1:
        cfg["num_stages"] -= 1
        return cfg
    for key in ("BLOCK_DO", "BLOCK_K", "BLOCK_M", "BLOCK_N"):
        if cfg.get(key, 0) > 16:
            cfg[key] //= 2
            return cfg
    return None


def _launch(name: str, kernel, grid, d: int, dtype: torch.dtype, **kwargs) -> None:
    """Launch ``kernel`` with heuristic blocks, or its autotuned version. ``grid(meta) -> tuple``.

    Compiled launches that exceed the GPU's shared memory (smaller GPUs than the A100/H100 the
    heuristics target) retry with smaller configs; the kernels only write their outputs, so a
    failed attempt leaves nothing to undo.
    """
    if _autotune_enabled() and name in ("fwd_row", "fwd_col"):  # (not the atomic adds)
        _tuned(name)[grid](**kwargs)
        return
    cfg = block_config("fwd" if name.startswith("fwd") else "bwd", d, dtype)
    while True:
        try:
            kernel[grid(cfg)](**kwargs, **cfg)
            return
        except OutOfResources:
            cfg = _smaller(cfg)
            if cfg is None:
                raise


# ----------------------------------------------------------------------------------------------
# precision

def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[dtype]


def _precisions(dtype: torch.dtype, device: torch.device) -> dict:
    """``ACC_DTYPE``, ``DOT_PREC``, ``MIX_PREC``, ``GRAD_DTYPE``, ``GRAD_PREC`` for inputs of ``dtype``.

    tf32 needs NVIDIA sm_80+; ROCm and older GPUs get "ieee" everywhere.
    """
    no_tf32 = torch.version.hip is not None or (
        device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32 and not no_tf32
    dot_prec = "tf32" if allow_tf32 else "ieee"
    # fp32 operands that must stay fp32-accurate (16-bit inputs): 3 tf32 passes on tensor cores
    fp32_exact = "ieee" if no_tf32 else "tf32x3"
    if dtype == torch.float64:
        return dict(ACC_DTYPE=tl.float64, DOT_PREC="ieee", MIX_PREC="ieee", GRAD_DTYPE=tl.float64,
                    GRAD_PREC="ieee")
    if dtype == torch.bfloat16:
        return dict(ACC_DTYPE=tl.float32, DOT_PREC=dot_prec, MIX_PREC=fp32_exact, GRAD_DTYPE=tl.bfloat16,
                    GRAD_PREC=dot_prec)
    if dtype == torch.float16:  # fp32 ∂L/∂s rounded to tf32 (fp16's mantissa, fp32's range: no underflow)
        return dict(ACC_DTYPE=tl.float32, DOT_PREC=dot_prec, MIX_PREC=fp32_exact, GRAD_DTYPE=tl.float32,
                    GRAD_PREC="ieee" if no_tf32 else "tf32")
    return dict(ACC_DTYPE=tl.float32, DOT_PREC=dot_prec, MIX_PREC=dot_prec, GRAD_DTYPE=tl.float32,
                GRAD_PREC=dot_prec)


# ----------------------------------------------------------------------------------------------
# launch wrappers

def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _inv_norms(x: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """(R,) inverse norms ``1/max(‖x_r‖, 1e-12)`` of the (R, D) rows of ``x``, dtype ``cdt``."""
    r, d = x.shape
    out = torch.empty(r, device=x.device, dtype=cdt)
    if r == 0:
        return out
    cfg = block_config("norm", d, x.dtype)
    _k._inv_norm_kernel[(_cdiv(r, cfg["BLOCK_R"]),)](x, out, r, d, ACC_DTYPE=_tl_dtype(cdt), **cfg)
    return out


def _norm_backward(x: torch.Tensor, r: torch.Tensor, g1: torch.Tensor,
                   g2: torch.Tensor | None) -> torch.Tensor:
    """``∂L/∂x`` (input dtype) from ``∂L/∂x̂ = g1 (+ g2)`` (compute dtype), all (R, D)."""
    rows, d = x.shape
    out = torch.empty_like(x)
    if rows == 0:
        return out
    cfg = block_config("norm", d, x.dtype)
    _k._norm_bwd_kernel[(_cdiv(rows, cfg["BLOCK_R"]),)](
        x, r, g1, g1 if g2 is None else g2, out, rows, d,
        HAS_SECOND=g2 is not None, ACC_DTYPE=_tl_dtype(g1.dtype), **cfg)
    return out


def _prepare(anchors, positives, negatives, mix3, mix4, tau, w, mix_lambda=None, dot=False):
    """Inverse norms, scalar tensors, flags, negative count and precisions shared by the forward and
    backward launches. ``mix_lambda``: MixCSE's λ (required with ``mix3``): ``lam_ptr`` = ``[λ, 1 - λ]``
    in the compute dtype. ``dot`` (``similarity="dot"``): every "inverse norm" is 1, so the tiles are
    raw dot products (and the backward skips the normalization)."""
    cdt = compute_dtype_for(anchors.dtype)
    if dot and mix3 is not None:
        raise ValueError("the Triton MixCSE blocks need similarity='cosine'")
    inv_norms = (lambda x, dt: torch.ones(x.shape[0], device=x.device, dtype=dt)) if dot else _inv_norms
    ra = inv_norms(anchors, cdt)
    rp = inv_norms(positives, cdt)
    has_neg = negatives is not None and negatives.shape[0] > 0
    has_mix = mix3 is not None
    neg = negatives if has_neg else anchors
    rneg = inv_norms(negatives, cdt) if has_neg else ra
    m3, m4 = (mix3, mix4) if has_mix else (anchors, anchors)
    rm3, rm4 = (_inv_norms(mix3, cdt), _inv_norms(mix4, cdt)) if has_mix else (ra, ra)
    tau_t = tau.detach().reshape(1).to(device=anchors.device, dtype=cdt)
    w_t = torch.full((1,), float(w), device=anchors.device, dtype=cdt)
    if has_mix and (mix_lambda is None or positives.shape[0] != anchors.shape[0]):
        raise ValueError("the Triton MixCSE blocks need mix_lambda and as many positives as anchors")
    lam = float(mix_lambda) if has_mix else 0.0
    lam_t = torch.tensor([lam, 1.0 - lam], device=anchors.device, dtype=cdt)
    ptrs = dict(a_ptr=anchors, ra_ptr=ra, p_ptr=positives, rp_ptr=rp, neg_ptr=neg, rneg_ptr=rneg,
                mix3_ptr=m3, rmix3_ptr=rm3, mix4_ptr=m4, rmix4_ptr=rm4, tau_ptr=tau_t, w_ptr=w_t, lam_ptr=lam_t)
    k = negatives.shape[0] if has_neg else 0
    return cdt, ptrs, has_neg, has_mix, k, _precisions(anchors.dtype, anchors.device)


def _margin_terms(ptrs, labels, n_pos, cdt, margin, angular_margin):
    """Per-row target terms of the margins (reference.py, "Margins"), or ``(None, None)`` without one.

    ``c_i`` = the target similarity ``â_i·ĉ_{l_i}`` (a rowwise dot, O(N·D), from the raw rows and the
    inverse norms ``ptrs`` holds, as the tiles compute it). Returns ``(δ, f'(c))``, both (N,) in
    ``cdt``: ``δ_i = f(c_i) − m − c_i`` (the kernels add ``δ_i / tau`` to the target logit and read
    ``c + δ`` for ∂tau there) and the chain-rule factor of the target entry.
    """
    if not (margin or angular_margin):
        return None, None
    a, ra = ptrs["a_ptr"], ptrs["ra_ptr"]
    lab = labels.to(torch.int64)
    is_pos = lab < n_pos
    tgt_pos = ptrs["p_ptr"][lab.clamp(max=n_pos - 1)].to(cdt) * ptrs["rp_ptr"][lab.clamp(max=n_pos - 1), None]
    if ptrs["neg_ptr"] is not a:  # negatives present: targets may be negatives (columns P + j)
        j = (lab - n_pos).clamp(min=0)
        tgt_neg = ptrs["neg_ptr"][j].to(cdt) * ptrs["rneg_ptr"][j, None]
        target = torch.where(is_pos[:, None], tgt_pos, tgt_neg)
    else:
        target = tgt_pos
    cos = ((a.to(cdt) * ra[:, None]) * target).sum(dim=1)
    delta = margin_target_logit_cos(cos, margin, angular_margin) - cos
    return delta.contiguous(), margin_target_grad(cos, angular_margin).to(cdt).contiguous()


def _forward_impl(anchors, positives, negatives, mix3, mix4, tau, labels, hard_negative_weight,
                  anchor_negatives, symmetric, mix_lambda=None, margin=0.0, angular_margin=0.0, dot=False):
    n, d = anchors.shape
    n_pos = positives.shape[0]
    cdt, ptrs, has_neg, has_mix, k, prec = _prepare(anchors, positives, negatives, mix3, mix4, tau,
                                                    hard_negative_weight, mix_lambda, dot)
    tdelta, _ = _margin_terms(ptrs, labels, n_pos, cdt, margin, angular_margin)
    has_margin = tdelta is not None
    lse = torch.empty(n, device=anchors.device, dtype=cdt)
    tgt = torch.empty(n, device=anchors.device, dtype=cdt)
    _launch("fwd_row", _k._fwd_row_kernel, lambda m: (_cdiv(n, m["BLOCK_M"]),), d, anchors.dtype,
            **ptrs, labels_ptr=labels, tdelta_ptr=tdelta if has_margin else lse, lse_ptr=lse, tgt_ptr=tgt,
            N=n, P=n_pos, K=k, D=d, HAS_NEG=has_neg, ANCHOR_NEG=anchor_negatives, HAS_MIX=has_mix,
            MARGIN=has_margin, ACC_DTYPE=prec["ACC_DTYPE"], DOT_PREC=prec["DOT_PREC"])
    loss = lse - tgt
    if symmetric:
        clse = torch.empty(n_pos, device=anchors.device, dtype=cdt)
        _launch("fwd_col", _k._fwd_col_kernel, lambda m: (_cdiv(n_pos, m["BLOCK_N"]),), d, anchors.dtype,
                a_ptr=ptrs["a_ptr"], ra_ptr=ptrs["ra_ptr"], p_ptr=ptrs["p_ptr"], rp_ptr=ptrs["rp_ptr"],
                tau_ptr=ptrs["tau_ptr"], labels_ptr=labels, tdelta_ptr=tdelta if has_margin else lse,
                clse_ptr=clse, N=n, P=n_pos, D=d, MARGIN=has_margin,
                ACC_DTYPE=prec["ACC_DTYPE"], DOT_PREC=prec["DOT_PREC"])
        loss = 0.5 * (loss + clse[labels] - tgt)
    else:
        clse = torch.empty(0, device=anchors.device, dtype=cdt)
    return loss, lse, clse


def _backward_impl(grad_rows, anchors, positives, negatives, mix3, mix4, tau, labels, lse, clse,
                   hard_negative_weight, anchor_negatives, symmetric, need_anchors, need_positives,
                   need_negatives, need_dtau, chunk_budget_mib=None, mix_lambda=None, margin=0.0,
                   angular_margin=0.0, dot=False):
    n, d = anchors.shape
    n_pos = positives.shape[0]
    cdt, ptrs, has_neg, has_mix, k, prec = _prepare(anchors, positives, negatives, mix3, mix4, tau,
                                                    hard_negative_weight, mix_lambda, dot)
    tdelta, tgrad = _margin_terms(ptrs, labels, n_pos, cdt, margin, angular_margin)
    dev = anchors.device
    g = grad_rows.to(cdt).contiguous()
    if symmetric:
        cw = torch.zeros(n_pos, device=dev, dtype=cdt).index_add_(0, labels, 0.5 * g)
    else:
        cw = clse = lse  # unused (SYMMETRIC=False)
    need_negatives = need_negatives and has_neg
    # skipped grads: distinct empty tensors (custom-op outputs may not alias each other)
    d_anc, d_pos, d_neg = (anchors.new_empty((0, d)) for _ in range(3))
    d_tau = torch.zeros((), device=dev, dtype=cdt)
    if backward_mode() == "atomic":
        common = dict(tau_ptr=ptrs["tau_ptr"], w_ptr=ptrs["w_ptr"], labels_ptr=labels, lse_ptr=lse, g_ptr=g,
                      cw_ptr=cw, clse_ptr=clse, tdelta_ptr=lse if tdelta is None else tdelta,
                      tgrad_ptr=lse if tgrad is None else tgrad, HAS_MARGIN=tdelta is not None, **prec)
        da_hat, dp_hat, dn_hat, dtau_rows = _backward_atomic(
            anchors, positives, negatives, ptrs, common, n, n_pos, k, d, cdt, has_neg, has_mix,
            anchor_negatives, symmetric, need_anchors, need_positives, need_negatives, need_dtau)
        da_cols, dtau_sum = None, dtau_rows.sum() if need_dtau else None
    else:
        da_hat, da_cols, dp_hat, dn_hat, dtau_sum = _backward_chunked(
            g, cw, clse, anchors, positives, negatives, labels, lse, ptrs, prec, cdt, n, n_pos, k, d,
            has_neg, has_mix, anchor_negatives, symmetric, need_anchors, need_positives, need_negatives,
            need_dtau, chunk_budget_mib, tdelta, tgrad)
    if dot:  # similarity="dot": the features are the similarity's operands, no normalization backward
        norm_backward = lambda x, r, g1, g2: (g1 if g2 is None else g1 + g2).to(x.dtype)
    else:
        norm_backward = _norm_backward
    if need_anchors:
        d_anc = norm_backward(anchors, ptrs["ra_ptr"], da_hat, da_cols)
    if need_positives:
        d_pos = norm_backward(positives, ptrs["rp_ptr"], dp_hat, None)
    if need_negatives:
        d_neg = norm_backward(negatives, ptrs["rneg_ptr"], dn_hat, None)
    if need_dtau:
        tau_c = tau.detach().to(device=dev, dtype=cdt).reshape(())
        d_tau = -dtau_sum / (tau_c * tau_c)
    return d_anc, d_pos, d_neg, d_tau


def backward_mode() -> str:
    """``"chunked"`` (default: ≤ 4 GEMM-equivalents, deterministic) or ``"atomic"``
    (``SIMCSE_TRITON_BWD=atomic``)."""
    return backward_mode_from_env("SIMCSE_TRITON_BWD")


def _backward_chunked(g, cw, clse, anchors, positives, negatives, labels, lse, ptrs, prec, cdt, n, n_pos, k,
                      d, has_neg, has_mix, anchor_negatives, symmetric, need_a, need_p, need_n, need_dtau,
                      chunk_budget_mib, tdelta=None, tgrad=None):
    """The default backward (module docstring, "Backward"): row chunks of ``∂L/∂s`` and two GEMMs.

    Args: g (N,) ∂L/∂ℓ and cw (P,) symmetric column weights (compute dtype), clse (P,) or unused;
    features and ``ptrs``/``prec`` as :func:`_prepare` returns them; ``need_*``: which gradients;
    ``tdelta``/``tgrad``: the margins' per-row target terms (:func:`_margin_terms`) or None.

    Returns:
        ``(∂â row role (N, D) or None, ∂â column role (N, D) or None (anchor negatives),
        ∂p̂ (P, D) or None, ∂n̂ (K, D) or None, Σ ∂L/∂s·cos (0-dim) or None)``, compute dtype.
    """
    dev = anchors.device
    gdt = ds_storage_dtype(anchors.dtype)
    n_mix = n if has_mix else 0
    n_an = n if anchor_negatives else 0
    m_row = n_pos + k + n_an + n_mix  # columns with a row role (all but mix4)
    m_total = m_row + n_mix
    c_an = n_pos + k  # first anchor-negative column
    c_m4 = m_row  # first mix4 column
    store_ds = need_a or need_p or need_n
    if not (store_ds or need_dtau):
        return None, None, None, None, None

    def raw(x):  # the GEMM operand: raw rows (their inverse norms are folded into ds)
        return x if x.dtype == gdt else x.to(gdt)

    a_raw = raw(anchors) if store_ds else None
    c_row = None
    if need_a:
        parts = [raw(positives)]
        if has_neg:
            parts.append(raw(negatives))
        if anchor_negatives:
            parts.append(a_raw)
        if has_mix:
            parts.append(raw(ptrs["mix3_ptr"]))
        c_row = torch.cat(parts, 0)  # (m_row, D)
    m4_raw = raw(ptrs["mix4_ptr"]) if (need_p and has_mix) else None
    da_rows = torch.empty(n, d, device=dev, dtype=cdt) if need_a else None
    da_cols = torch.zeros(n, d, device=dev, dtype=cdt) if (need_a and anchor_negatives) else None
    dp_hat = torch.zeros(n_pos, d, device=dev, dtype=cdt) if need_p else None
    dn_hat = torch.zeros(k, d, device=dev, dtype=cdt) if need_n else None

    cfg = block_config("dlogits", d, anchors.dtype)
    budget = chunk_budget_bytes(chunk_budget_mib)
    elem = gdt.itemsize
    dtau_sum = torch.zeros((), device=dev, dtype=cdt) if need_dtau else None
    r0 = 0
    ds_buf = None
    rows_cap = rows_per_chunk(n, m_total, elem, budget, multiple=cfg["BLOCK_M"])
    while r0 < n:
        if store_ds and (ds_buf is None or ds_buf.shape[0] < min(rows_cap, n - r0)):
            ds_buf = torch.empty(rows_cap, m_total, device=dev, dtype=gdt)
        r1 = min(n, r0 + rows_cap)
        rows = r1 - r0
        bn = cfg["BLOCK_N"]
        # 16-bit MixCSE: the mix3/mix4 tiles are written by the positives-tile programs (3 dots each);
        # fp32/fp64 MixCSE: their own tile programs (dots against the input-dtype mixtures)
        n_tiles = (_cdiv(n_pos, bn) + (_cdiv(k, bn) if has_neg else 0) + _cdiv(n_an, bn)
                   + (2 * _cdiv(n_mix, bn) if cdt == anchors.dtype else 0))
        dtau_part = torch.empty(rows, n_tiles, device=dev, dtype=cdt) if need_dtau else g
        try:
            _dl._dlogits_chunk_kernel[(_cdiv(rows, cfg["BLOCK_M"]), n_tiles)](
                **{key: ptrs[key] for key in ("a_ptr", "ra_ptr", "p_ptr", "rp_ptr", "neg_ptr", "rneg_ptr",
                                              "mix3_ptr", "rmix3_ptr", "mix4_ptr", "rmix4_ptr", "tau_ptr",
                                              "w_ptr", "lam_ptr")},
                labels_ptr=labels, lse_ptr=lse, g_ptr=g, cw_ptr=cw, clse_ptr=clse,
                tdelta_ptr=g if tdelta is None else tdelta, tgrad_ptr=g if tgrad is None else tgrad,
                ds_ptr=ds_buf if store_ds else g, dtau_ptr=dtau_part, row_start=r0, row_end=r1, N=n, P=n_pos,
                K=k, D=d, ld_ds=m_total, n_tiles=n_tiles, HAS_NEG=has_neg, ANCHOR_NEG=anchor_negatives,
                HAS_MIX=has_mix, MARGIN=tdelta is not None, SYMMETRIC=symmetric, STORE_DS=store_ds, NEED_DTAU=need_dtau,
                ACC_DTYPE=prec["ACC_DTYPE"], DOT_PREC=prec["DOT_PREC"], **cfg)
        except OutOfResources:  # smaller GPUs: retry this chunk with smaller tiles
            cfg = _smaller(cfg)
            if cfg is None:
                raise
            rows_cap = rows_per_chunk(n, m_total, elem, budget, multiple=cfg["BLOCK_M"])
            continue
        if need_dtau:
            dtau_sum = dtau_sum + dtau_part.sum()
        if store_ds:
            ds = ds_buf[:rows]
            if need_a:
                accumulate_gemm(da_rows[r0:r1], ds[:, :m_row], c_row, accumulate=False)
            a_c = a_raw[r0:r1]
            if need_p:
                accumulate_gemm(dp_hat, ds[:, :n_pos].T, a_c, accumulate=True)
                if has_mix:
                    accumulate_gemm(dp_hat, ds[:, c_m4:c_m4 + n].T, m4_raw[r0:r1], accumulate=True)
            if need_n:
                accumulate_gemm(dn_hat, ds[:, n_pos:n_pos + k].T, a_c, accumulate=True)
            if need_a and anchor_negatives:
                accumulate_gemm(da_cols, ds[:, c_an:c_an + n].T, a_c, accumulate=True)
        r0 = r1
    # the GEMMs gave r_x ∂x̂ (the inverse norms folded into ds): divide the row scaling out
    for buf, r in ((da_rows, ptrs["ra_ptr"]), (da_cols, ptrs["ra_ptr"]), (dp_hat, ptrs["rp_ptr"]),
                   (dn_hat, ptrs["rneg_ptr"])):
        if buf is not None:
            buf.div_(r[:, None])
    return da_rows, da_cols, dp_hat, dn_hat, dtau_sum


def _backward_atomic(anchors, positives, negatives, ptrs, common, n, n_pos, k, d, cdt, has_neg, has_mix,
                     anchor_negatives, symmetric, need_a, need_p, need_n, need_dtau):
    """The atomic variant: one tile kernel per logit block; returns ``(∂â, ∂p̂, ∂n̂, dtau_rows)``."""
    dev = anchors.device
    zeros = lambda rows: torch.zeros(rows, d, device=dev, dtype=cdt)
    da_hat = zeros(n) if need_a else None
    dp_hat = zeros(n_pos) if need_p else None
    dn_hat = zeros(k) if need_n else None
    dtau_rows = torch.zeros(n, device=dev, dtype=cdt)
    mix_prec = common["MIX_PREC"]
    tile_args = {key: common[key] for key in ("tau_ptr", "w_ptr", "labels_ptr", "lse_ptr", "g_ptr", "cw_ptr",
                                             "clse_ptr", "tdelta_ptr", "tgrad_ptr", "ACC_DTYPE", "GRAD_DTYPE",
                                             "GRAD_PREC")}
    blocks = [  # x, rx, y, ry, n_cols, col_offset, pattern, target, mixed, dx, dy
        ("a", "p", n_pos, 0, 0, True, False, da_hat, dp_hat)]
    if has_neg:
        blocks.append(("a", "neg", k, n_pos, 1, True, False, da_hat, dn_hat))
    if anchor_negatives:
        blocks.append(("a", "a", n, 0, 2, False, False, da_hat, da_hat))
    if has_mix:
        blocks.append(("a", "mix3", n, 0, 3, False, True, da_hat, None))
        blocks.append(("mix4", "p", n, 0, 4, False, True, None, dp_hat))
    for x, y, n_cols, col_offset, pattern, target, mixed, dx, dy in blocks:
        if dx is None and dy is None and not need_dtau:
            continue
        _launch("bwd_tile", _k._bwd_tile_atomic_kernel,
                lambda m, n_cols=n_cols: (_cdiv(n, m["BLOCK_M"]), _cdiv(n_cols, m["BLOCK_N"])),
                d, anchors.dtype, x_ptr=ptrs[f"{x}_ptr"], rx_ptr=ptrs[f"r{x}_ptr"],
                y_ptr=ptrs[f"{y}_ptr"], ry_ptr=ptrs[f"r{y}_ptr"],
                **tile_args, DOT_PREC=mix_prec if mixed else common["DOT_PREC"],
                dx_ptr=dtau_rows if dx is None else dx, dy_ptr=dtau_rows if dy is None else dy,
                dtau_ptr=dtau_rows, N=n, n_cols=n_cols, D=d, col_offset=col_offset, PATTERN=pattern,
                TARGET=target, MARGIN=target and common["HAS_MARGIN"], SYMMETRIC=symmetric, SYM_COLS=symmetric and pattern == 0, MIXED=mixed,
                ROW_GRAD=dx is not None, COL_GRAD=dy is not None, NEED_DTAU=need_dtau)
    return da_hat, dp_hat, dn_hat, dtau_rows


# ----------------------------------------------------------------------------------------------
# custom ops (opaque to torch.compile) and their fake implementations

@torch.library.custom_op("simcse_kernels::triton_info_nce_fwd", mutates_args=())
def triton_info_nce_fwd(
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
    mix_lambda: float | None = None,
    margin: float = 0.0,
    angular_margin: float = 0.0,
    dot: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row losses (N,), row LSE (N,) and column LSE (P,; (0,) unless symmetric), compute dtype.

    Args: anchors (N, D), positives (P, D), negatives (K, D) or None — contiguous, one dtype;
    mix3, mix4 (N, D) detached MixCSE mixtures in the compute dtype, or None; tau 0-dim;
    labels (N,) int64 in [0, P + K); mix_lambda: MixCSE's λ (required with the mixtures; P = N);
    margin, angular_margin: the target margins (reference.py, "Margins"); dot: ``similarity="dot"``
    (raw dot products, no normalization).
    """
    return _forward_impl(anchors, positives, negatives, mix3, mix4, tau, labels, hard_negative_weight,
                         anchor_negatives, symmetric, mix_lambda, margin, angular_margin, dot)


@triton_info_nce_fwd.register_fake
def _(anchors, positives, negatives, mix3, mix4, tau, labels, hard_negative_weight, anchor_negatives,
      symmetric, mix_lambda=None, margin=0.0, angular_margin=0.0, dot=False):
    cdt = compute_dtype_for(anchors.dtype)
    n = anchors.shape[0]
    loss = anchors.new_empty((n,), dtype=cdt)
    lse = anchors.new_empty((n,), dtype=cdt)
    clse = anchors.new_empty((positives.shape[0] if symmetric else 0,), dtype=cdt)
    return loss, lse, clse


@torch.library.custom_op("simcse_kernels::triton_info_nce_bwd", mutates_args=())
def triton_info_nce_bwd(
    grad_rows: torch.Tensor,
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    mix3: torch.Tensor | None,
    mix4: torch.Tensor | None,
    tau: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    clse: torch.Tensor,
    hard_negative_weight: float,
    anchor_negatives: bool,
    symmetric: bool,
    need_anchors: bool,
    need_positives: bool,
    need_negatives: bool,
    need_dtau: bool,
    chunk_budget_mib: float | None = None,
    mix_lambda: float | None = None,
    margin: float = 0.0,
    angular_margin: float = 0.0,
    dot: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(∂anchors, ∂positives, ∂negatives, ∂tau)`` from ``grad_rows`` = ∂L/∂ℓ (N,).

    Feature grads come in the input dtype; one whose ``need_*`` flag is False (or the negatives'
    when there are none) is an empty (0, D) tensor and costs no kernel. ``∂tau`` is 0-dim in the
    compute dtype (zero unless ``need_dtau``). Other args as the forward, plus its saved ``lse``
    (N,) and ``clse`` (P,) or (0,). ``chunk_budget_mib``: the (R, M) ``∂L/∂s`` chunk budget of the
    default backward (None: ``$SIMCSE_KERNELS_CHUNK_MIB``, else 256 MiB). ``mix_lambda``, ``margin``,
    ``angular_margin``, ``dot``: as the forward.
    """
    return _backward_impl(grad_rows, anchors, positives, negatives, mix3, mix4, tau, labels, lse, clse,
                          hard_negative_weight, anchor_negatives, symmetric, need_anchors, need_positives,
                          need_negatives, need_dtau, chunk_budget_mib, mix_lambda, margin, angular_margin, dot)


@triton_info_nce_bwd.register_fake
def _(grad_rows, anchors, positives, negatives, mix3, mix4, tau, labels, lse, clse, hard_negative_weight,
      anchor_negatives, symmetric, need_anchors, need_positives, need_negatives, need_dtau,
      chunk_budget_mib=None, mix_lambda=None, margin=0.0, angular_margin=0.0, dot=False):
    cdt = compute_dtype_for(anchors.dtype)
    d = anchors.shape[1]
    d_anc = torch.empty_like(anchors) if need_anchors else anchors.new_empty((0, d))
    d_pos = torch.empty_like(positives) if need_positives else anchors.new_empty((0, d))
    has_neg = negatives is not None and need_negatives
    d_neg = torch.empty_like(negatives) if has_neg else anchors.new_empty((0, d))
    return d_anc, d_pos, d_neg, anchors.new_empty((), dtype=cdt)


class TritonInfoNCEFunction(torch.autograd.Function):
    """Per-row InfoNCE losses (N,) in the compute dtype from raw features, via the Triton custom ops.

    ``forward(anchors, positives, negatives, mix3, mix4, tau, labels, w, anchor_negatives, symmetric,
    chunk_budget_mib=None, mix_lambda=None, margin=0.0, angular_margin=0.0, dot=False)``: shapes as
    :func:`triton_info_nce_fwd`; ``chunk_budget_mib`` as :func:`triton_info_nce_bwd`; ``mix_lambda``:
    MixCSE's λ (with the mixtures); ``margin``, ``angular_margin``, ``dot``: as the forward. Gradients
    flow to anchors, positives, negatives and tau (never to the detached mixtures or labels).
    """

    @staticmethod
    def forward(ctx, anchors, positives, negatives, mix3, mix4, tau, labels, w, anchor_negatives, symmetric,
                chunk_budget_mib=None, mix_lambda=None, margin=0.0, angular_margin=0.0, dot=False):
        loss, lse, clse = torch.ops.simcse_kernels.triton_info_nce_fwd(
            anchors, positives, negatives, mix3, mix4, tau, labels, w, anchor_negatives, symmetric, mix_lambda,
            margin, angular_margin, dot)
        ctx.save_for_backward(anchors, positives, negatives, mix3, mix4, tau, labels, lse, clse)
        ctx.options = (w, anchor_negatives, symmetric, chunk_budget_mib, mix_lambda, margin, angular_margin, dot)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_double_backward('triton', torch.is_grad_enabled(), torch.compiler.is_compiling())
        anchors, positives, negatives, mix3, mix4, tau, labels, lse, clse = ctx.saved_tensors
        w, anchor_negatives, symmetric, chunk_budget_mib, mix_lambda, margin, angular_margin, dot = ctx.options
        need = ctx.needs_input_grad
        need_neg = need[2] and negatives is not None
        d_anc, d_pos, d_neg, d_tau = torch.ops.simcse_kernels.triton_info_nce_bwd(
            grad_loss.contiguous(), anchors, positives, negatives, mix3, mix4, tau, labels, lse, clse,
            w, anchor_negatives, symmetric, need[0], need[1], need_neg, need[5], chunk_budget_mib, mix_lambda,
            margin, angular_margin, dot)
        return (d_anc if need[0] else None, d_pos if need[1] else None, d_neg if need_neg else None,
                None, None, d_tau if need[5] else None, None, None, None, None, None, None, None, None, None)


def triton_info_nce(anchors, positives, negatives, labels, options):
    """The loss of backend ``"triton"`` on validated inputs (reduced like ``reference_loss``).

    Args:
        anchors: (N, D), positives: (P, D), negatives: (K, D) or None — one float dtype, one device.
        labels: (N,) integer targets in [0, P + K).
        options: :class:`~simcse_kernels.options.InfoNCEOptions`.

    Returns:
        The loss in fp32 (fp64 for fp64 inputs): shape () or (N,) for ``reduction="none"``.
    """
    cdt = compute_dtype_for(anchors.dtype)
    tau = temperature_tensor(options, anchors.device, cdt)
    mix3 = mix4 = None
    if options.mix_lambda is not None:
        mix3 = mixed_features(positives.to(cdt), options.mix_lambda).contiguous()
        mix4 = mixed_features(anchors.to(cdt), options.mix_lambda).contiguous()
    if negatives is not None and negatives.shape[0] == 0:
        negatives = None
    per_row = TritonInfoNCEFunction.apply(
        anchors.contiguous(), positives.contiguous(), None if negatives is None else negatives.contiguous(),
        mix3, mix4, tau, labels.to(torch.int64).contiguous(), float(options.hard_negative_weight),
        bool(options.anchor_negatives), bool(options.symmetric),
        None if options.chunk_budget_mib is None else float(options.chunk_budget_mib),
        None if options.mix_lambda is None else float(options.mix_lambda),
        float(options.margin), float(options.angular_margin), options.similarity == "dot")
    return reduce_loss(per_row, options.reduction)
