// dL/ds of one logit block for a chunk of anchor rows: the first half of the default backward.
//
// The default backward (simcse_kernels/ops/cuda_loss.py) processes the anchor rows in chunks
// [row_start, row_end). For each logit block (rows operand x cols operand, PatternCode) this
// kernel recomputes the chunk's 64 x 64 logit tiles exactly as the forward does (dot_tile +
// block_logit of tile.cuh, so the logits are bit-identical to block_forward.cu's) and writes
//
//   dS_ij = row_weight_i exp(s_ij - lse_i) [+ col_weight_j exp(s_ij - col_lse_j)]
//           - g_i [labels[i] == target_col_offset + j, target_col_offset >= 0]
//   dS_ij = 0 on constant logits (MixCSE's masked entries)
//
// Margins (target_delta / target_grad, the per-row terms of tile.cuh's TargetTerms): the target
// logit is recomputed with + delta_i / tau (as the forward) and its dS, -g_i included, is
// multiplied by f'(c_i) = grad_i; its dtau term reads cos + delta_i = f(c_i) - m.
//
// (the math of block_backward.cu plus target_backward of rowwise.cu) into an (R, ld_out) buffer
// with both inverse norms folded in, so the two gradient GEMMs that follow (torch, fp32
// accumulation) run on the RAW rows:
//
//   out[(i - row_start) * ld_out + out_col0 + j] = dS_ij r_i r_j          (storage dtype TO)
//   grad_rows[chunk] += out_block @ cols_raw,  grad_cols += out_block^T @ rows_raw[chunk]
//
// (the gradients w.r.t. the normalized rows times r, still without the 1/tau factor, which
// normalize_backward applies). The temperature partial of each (row, column tile) is
//
//   dtau_part[(i - row_start) * n_tiles_total + tile_col0 + t] = sum_{j in tile t} dS'_ij cos_ij
//
// with dS' = dS without the target's -g_i (the Python side subtracts sum_i g_i target_cos_i in
// float64, as for the atomic backward). Each output element is written by exactly one thread and
// each dtau_part entry by one warp with a fixed summation order: no atomics, bitwise
// reproducible.
//
// Arguments (device pointers; shapes):
//   x (n_x, dim) rows operand, row stride xs, inverse norms rx (n_x,) float32 — rows of the
//     chunk are [row_start, row_end), row_end <= n_x; y (n_y, dim) cols operand, stride ys,
//     inverse norms ry (n_y,);
//   tau (1,) float32; weight, pattern: the block's PatternCode (n_x is the modulus of MixCSE's);
//   lse, row_weight (n_x,) float32 (global row index); col_lse, col_weight (n_y,) float32 or
//     both null; target (TargetTerms: kTargetRows when the block holds targets, labels (n_x,)
//     int64, delta / grad (n_x,) float32 or both null) and g (n_x,) float32 (read with targets);
//   out (row_end - row_start, ld_out) TO (float32 or bfloat16), columns out_col0 .. out_col0+n_y;
//   dtau_part (row_end - row_start, n_tiles_total) float32 or null, columns tile_col0 ..
//     tile_col0 + ceil(n_y / 64).
// Grid: (ceil(n_y / 64), ceil((row_end - row_start) / 64)); CTA (bx, by) owns rows
// row_start + 64 by .. + 63 and columns 64 bx .. 64 bx + 63. Any N, M and D (bounds-checked).
#include "tile.cuh"

namespace simcse {
namespace {

// Launch bounds (kThreads, 2): at most 128 registers per thread, as lse_partials_kernel (the
// same dot_tile spilled on sm_90 when ptxas was free to target more blocks per SM).
template <typename TR, typename TC, typename TO>
__global__ void __launch_bounds__(kThreads, 2)
    block_dlogits_kernel(const TR* __restrict__ x, int64_t xs, int64_t n_x, const float* __restrict__ rx,
                         const TC* __restrict__ y, int64_t ys, int64_t n_y, const float* __restrict__ ry,
                         int64_t dim, const float* __restrict__ tau, float weight, int pattern, int64_t row_start,
                         int64_t row_end, const float* __restrict__ lse, const float* __restrict__ row_weight,
                         const float* __restrict__ col_lse, const float* __restrict__ col_weight,
                         TargetTerms target, const float* __restrict__ g, TO* __restrict__ out, int64_t ld_out,
                         int64_t out_col0, float* __restrict__ dtau_part, int64_t n_tiles_total,
                         int64_t tile_col0) {
  __shared__ __align__(128) float s[kBM * kSLd];
  __shared__ __align__(128) float scratch[kScratchFloats];

  const int64_t tile = blockIdx.x;
  const int64_t j0 = tile * kBN;
  const int64_t i0 = row_start + static_cast<int64_t>(blockIdx.y) * kBM;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const float inv_tau = 1.0f / tau[0];

  // rows past row_end read as 0 (they belong to another chunk or do not exist)
  dot_tile<TR, TC>(x, xs, row_end, i0, y, ys, n_y, j0, dim, s, scratch);

  // Warp w owns the tile rows w, w + 8, ...; lane l the columns l and l + 32 (coalesced stores).
  for (int u = warp; u < kBM; u += kThreads / kWarp) {
    const int64_t i = i0 + u;
    if (i >= row_end) break;  // warp-uniform
    const float ri = rx[i], lse_i = lse[i], w_i = row_weight[i];
    int64_t target_j = -1;
    float g_i = 0.0f, delta_i = 0.0f, grad_i = 1.0f;  // no margin: shift 0, chain factor 1
    if (target.mode == kTargetRows) {
      target_j = target.labels[i] - target.col_offset;  // outside [0, n_y): not in this block
      g_i = g[i];
      if (target.delta != nullptr) {
        delta_i = target.delta[i];
        grad_i = target.grad[i];
      }
    }
    float tau_part = 0.0f;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int v = lane + half * kWarp;
      const int64_t j = j0 + v;
      if (j >= n_y) continue;
      bool is_const;
      float cos;
      const float rj = ry[j];
      float logit = block_logit(s[u * kSLd + v], ri, rj, inv_tau, weight, pattern, i, j, n_x, &is_const, &cos);
      const bool is_target = j == target_j;
      if (is_target && target.delta != nullptr) logit += delta_i * inv_tau;  // as the forward's epilogue
      float ds = 0.0f;
      if (!is_const) {
        ds = w_i * expf(logit - lse_i);
        if (col_lse != nullptr) ds += col_weight[j] * expf(logit - col_lse[j]);
        // ds == 0 on -inf logits, whose cos is not used; the target's similarity is f(c) - m
        if (ds != 0.0f) tau_part += ds * (is_target ? cos + delta_i : cos);
        if (is_target) ds = (ds - g_i) * grad_i;
      }
      out[(i - row_start) * ld_out + out_col0 + j] = from_float<TO>(ds * ri * rj);
    }
    if (dtau_part != nullptr) {
      tau_part = warp_sum(tau_part);
      if (lane == 0) dtau_part[(i - row_start) * n_tiles_total + tile_col0 + tile] = tau_part;
    }
  }
}

}  // namespace

int launch_block_dlogits(const Operand& rows, const Operand& cols, int64_t dim, uintptr_t tau, float weight,
                         int pattern, int64_t row_start, int64_t row_end, uintptr_t lse, uintptr_t row_weight,
                         uintptr_t col_lse, uintptr_t col_weight, uintptr_t labels, uintptr_t g,
                         int64_t target_col_offset, uintptr_t out, int out_dtype, int64_t ld_out, int64_t out_col0,
                         uintptr_t dtau_part, int64_t n_tiles_total, int64_t tile_col0, uintptr_t target_delta,
                         uintptr_t target_grad, int device, uintptr_t stream) {
  if (out_dtype != kFloat32 && out_dtype != kBFloat16) return static_cast<int>(cudaErrorInvalidValue);
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  const dim3 grid(static_cast<unsigned>((cols.rows + kBN - 1) / kBN),
                  static_cast<unsigned>((row_end - row_start + kBM - 1) / kBM));
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const TargetTerms target{target_col_offset >= 0 ? kTargetRows : kTargetNone, target_col_offset,
                           reinterpret_cast<const int64_t*>(labels), reinterpret_cast<const float*>(target_delta),
                           reinterpret_cast<const float*>(target_grad)};
  const bool ok = dispatch_pair(rows.dtype, cols.dtype, [&](auto xr, auto yc) {
    using TR = decltype(xr);
    using TC = decltype(yc);
    auto launch = [&](auto zo) {
      using TO = decltype(zo);
      const auto kernel = &block_dlogits_kernel<TR, TC, TO>;
      SIMCSE_LAUNCH(kernel, grid, kThreads, st,
          reinterpret_cast<const TR*>(rows.data), rows.stride, rows.rows,
          reinterpret_cast<const float*>(rows.inv_norm), reinterpret_cast<const TC*>(cols.data), cols.stride,
          cols.rows, reinterpret_cast<const float*>(cols.inv_norm), dim, reinterpret_cast<const float*>(tau),
          weight, pattern, row_start, row_end, reinterpret_cast<const float*>(lse),
          reinterpret_cast<const float*>(row_weight), reinterpret_cast<const float*>(col_lse),
          reinterpret_cast<const float*>(col_weight), target, reinterpret_cast<const float*>(g),
          reinterpret_cast<TO*>(out), ld_out, out_col0,
          reinterpret_cast<float*>(dtau_part), n_tiles_total, tile_col0);
    };
    if (out_dtype == kBFloat16) {
      launch(__nv_bfloat16());
    } else {
      launch(float());
    }
  });
  if (!ok) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace simcse
