// Forward of one logit block: partial row log-sum-exps with an online (streaming) LSE.
//
// A block is rows x cols of logits s_ij = (x_i . y_j) r_i r_j / tau plus a constant pattern
// (launchers.h: PatternCode). The loss's blocks are launched one after another by the Python side
// (simcse_kernels/ops/cuda_loss.py): anchors x positives, anchors x negatives (hard pattern),
// anchors x anchors (self pattern), anchors x mix3 (mix3 pattern), mix4 x positives (mix4 pattern);
// and, for the symmetric loss's column LSE, positives x anchors (the transposed positives block).
//
// Grid: (ceil(rows / 64), n_splits); CTA (bx, s) owns rows [64 bx, 64 bx + 64) and the column tiles
// s, s + n_splits, ... . It keeps a running (max, sum of exp) per row, so memory is O(rows) per
// split, never rows x cols. Output: out[s * rows + i] = log-sum-exp of row i over those columns
// (-inf when the split has no column, or all of them are -inf). Python takes logsumexp over s and
// over blocks.
//
// Margins (``target``, tile.cuh: TargetTerms): the epilogue adds delta[a] / tau to the target entry
// of anchor row a, (a, labels[a] - offset) of an anchors x candidates block or (labels[a], a) of the
// transposed positives block; without a margin target.mode is kTargetNone and nothing is read.
#include "tile.cuh"

namespace simcse {
namespace {

// Launch bounds (kThreads, 2): at most 128 registers per thread. With kThreads alone ptxas picked
// 48-64 registers on sm_90 and spilled 8-16 bytes (nvcc 13.0 --resource-usage); with a minimum of
// 2 blocks per SM it uses 102-128 and spills nothing on sm_80 and sm_90 (3 blocks spill on sm_90).
template <typename TR, typename TC>
__global__ void __launch_bounds__(kThreads, 2)
    lse_partials_kernel(const TR* __restrict__ x, int64_t xs, int64_t n_x, const float* __restrict__ rx,
                        const TC* __restrict__ y, int64_t ys, int64_t n_y, const float* __restrict__ ry,
                        int64_t dim, const float* __restrict__ tau, float weight, int pattern, int n_splits,
                        float* __restrict__ out, TargetTerms target) {
  __shared__ __align__(128) float s[kBM * kSLd];
  __shared__ __align__(128) float scratch[kScratchFloats];
  __shared__ float row_max[kBM];
  __shared__ float row_sum[kBM];

  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int split = blockIdx.y;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const float inv_tau = 1.0f / tau[0];
  if (threadIdx.x < kBM) {
    row_max[threadIdx.x] = -INFINITY;
    row_sum[threadIdx.x] = 0.0f;
  }
  __syncthreads();

  const int64_t n_tiles = (n_y + kBN - 1) / kBN;
  for (int64_t t = split; t < n_tiles; t += n_splits) {
    const int64_t j0 = t * kBN;
    dot_tile<TR, TC>(x, xs, n_x, i0, y, ys, n_y, j0, dim, s, scratch);
    for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
      const int u = e / kBN, v = e % kBN;
      const int64_t i = i0 + u, j = j0 + v;
      float logit = -INFINITY;
      if (i < n_x && j < n_y) {
        bool is_const;
        float cos;
        logit = block_logit(s[u * kSLd + v], rx[i], ry[j], inv_tau, weight, pattern, i, j, n_x, &is_const, &cos);
        const int64_t owner = target_owner(target, i, j);
        if (owner >= 0) logit += target.delta[owner] * inv_tau;
      }
      s[u * kSLd + v] = logit;
    }
    __syncthreads();
    // Warp w folds rows w, w + 8, ... (two columns per lane) into the running LSE.
    for (int u = warp; u < kBM; u += kThreads / kWarp) {
      const float a = s[u * kSLd + lane];
      const float b = s[u * kSLd + lane + kWarp];
      const float m = warp_max(fmaxf(a, b));
      if (m != -INFINITY) {
        const float part = warp_sum(expf(a - m) + expf(b - m));
        if (lane == 0) {
          const float old_max = row_max[u];
          const float new_max = fmaxf(old_max, m);
          row_sum[u] = row_sum[u] * expf(old_max - new_max) + part * expf(m - new_max);
          row_max[u] = new_max;
        }
      }
    }
    __syncthreads();
  }
  if (threadIdx.x < kBM) {
    const int64_t i = i0 + threadIdx.x;
    if (i < n_x) {
      const float m = row_max[threadIdx.x];
      out[static_cast<int64_t>(split) * n_x + i] = (m == -INFINITY) ? -INFINITY : m + logf(row_sum[threadIdx.x]);
    }
  }
}

}  // namespace

int launch_lse_partials(const Operand& rows, const Operand& cols, int64_t dim, uintptr_t tau, float weight,
                        int pattern, int n_splits, uintptr_t out, uintptr_t labels, int target_mode,
                        int64_t target_col_offset, uintptr_t target_delta, int device, uintptr_t stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  const dim3 grid(static_cast<unsigned>((rows.rows + kBM - 1) / kBM), static_cast<unsigned>(n_splits));
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const TargetTerms target{target_mode, target_col_offset, reinterpret_cast<const int64_t*>(labels),
                           reinterpret_cast<const float*>(target_delta), nullptr};
  const bool ok = dispatch_pair(rows.dtype, cols.dtype, [&](auto xr, auto yc) {
    using TR = decltype(xr);
    using TC = decltype(yc);
    const auto kernel = &lse_partials_kernel<TR, TC>;
    SIMCSE_LAUNCH(kernel, grid, kThreads, st,
        reinterpret_cast<const TR*>(rows.data), rows.stride, rows.rows, reinterpret_cast<const float*>(rows.inv_norm),
        reinterpret_cast<const TC*>(cols.data), cols.stride, cols.rows, reinterpret_cast<const float*>(cols.inv_norm),
        dim, reinterpret_cast<const float*>(tau), weight, pattern, n_splits, reinterpret_cast<float*>(out),
        target);
  });
  if (!ok) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace simcse
