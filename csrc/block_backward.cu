// Recomputing backward of one logit block (mirrors simcse_kernels/ops/chunked.py's backward).
//
// For every 64 x 64 tile the logits are recomputed exactly as in the forward (block_forward.cu),
// then, with the saved row log-sum-exps lse_i and loss weights g:
//
//   dS_ij = row_weight_i exp(s_ij - lse_i) [+ col_weight_j exp(s_ij - col_lse_j)]   (col part: the
//           symmetric loss's column softmax, positives block only), dS_ij = 0 on constant logits;
//   grad_rows_i += sum_j dS_ij y_hat_j      grad_cols_j += sum_i dS_ij x_hat_i
//   dtau_acc    += sum_ij dS_ij cos_ij
//
// where x_hat = r x, y_hat = r y. The gradients are w.r.t. the normalized rows and still lack the
// 1/tau factor; normalize_backward (rowwise.cu) applies 1/tau and the normalization backward.
// The target logit's -g_i is added separately (target_backward). Margins (``target``, tile.cuh:
// TargetTerms, kTargetRows): the target entry's logit gets + delta_i / tau, its dS the factor
// f'(c_i) (grad_i) and its dtau term the similarity f(c_i) - m = cos + delta_i; the entry is
// taken out of the tile's dS pass and redone by one thread per row, so that pass is unchanged.
// Only a 64 x 64 tile of dS ever exists (shared memory); the gradient products run over D in chunks of 32 with float32 FMAs
// and are added to the float32 gradient buffers with atomicAdd (several CTAs share rows/columns).
//
// Grid: (ceil(rows / 64), n_splits), columns tiles dealt round-robin as in the forward.
#include "tile.cuh"

namespace simcse {
namespace {

template <typename TR, typename TC>
__global__ void __launch_bounds__(kThreads)
    block_backward_kernel(const TR* __restrict__ x, int64_t xs, int64_t n_x, const float* __restrict__ rx,
                          const TC* __restrict__ y, int64_t ys, int64_t n_y, const float* __restrict__ ry,
                          int64_t dim, const float* __restrict__ tau, float weight, int pattern,
                          const float* __restrict__ lse, const float* __restrict__ row_weight,
                          const float* __restrict__ col_lse, const float* __restrict__ col_weight,
                          float* grad_rows, float* grad_cols, double* dtau_acc, int n_splits,
                          TargetTerms target) {
  __shared__ __align__(128) float s[kBM * kSLd];
  __shared__ __align__(128) float scratch[kScratchFloats];
  __shared__ float warp_part[kThreads / kWarp];
  __shared__ int64_t target_col[kBM];  // margins: tile row u's target column in this block, or -1

  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int split = blockIdx.y;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const float inv_tau = 1.0f / tau[0];
  float tau_part = 0.0f;
  if (threadIdx.x < kBM) {
    const int64_t i = i0 + threadIdx.x;
    target_col[threadIdx.x] = (i < n_x && target.mode == kTargetRows) ? target.labels[i] - target.col_offset : -1;
  }

  const int64_t n_tiles = (n_y + kBN - 1) / kBN;
  for (int64_t t = split; t < n_tiles; t += n_splits) {
    const int64_t j0 = t * kBN;
    dot_tile<TR, TC>(x, xs, n_x, i0, y, ys, n_y, j0, dim, s, scratch);
    // Margins: thread u < 64 takes row u's target entry out of the tile (its raw dot, -inf in its
    // place, so the plain dS pass below gives it 0) and fills it in after that pass.
    int target_v = -1;
    float target_dot = 0.0f;
    if (threadIdx.x < kBM) {
      const int64_t v = target_col[threadIdx.x] - j0;
      if (v >= 0 && v < kBN && j0 + v < n_y) {
        target_v = static_cast<int>(v);
        target_dot = s[threadIdx.x * kSLd + target_v];
        s[threadIdx.x * kSLd + target_v] = -INFINITY;  // the dS pass below leaves 0 there
      }
    }
    __syncthreads();

    // dS tile (in place of the dot tile).
    for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
      const int u = e / kBN, v = e % kBN;
      const int64_t i = i0 + u, j = j0 + v;
      float ds = 0.0f;
      if (i < n_x && j < n_y) {
        bool is_const;
        float cos;
        const float logit =
            block_logit(s[u * kSLd + v], rx[i], ry[j], inv_tau, weight, pattern, i, j, n_x, &is_const, &cos);
        if (!is_const) {
          ds = row_weight[i] * expf(logit - lse[i]);
          if (col_lse != nullptr) ds += col_weight[j] * expf(logit - col_lse[j]);
          if (ds != 0.0f) tau_part += ds * cos;  // ds == 0 on -inf logits, whose cos is not used
        }
      }
      s[u * kSLd + v] = ds;
    }
    if (target.mode != kTargetNone) {
      __syncthreads();
      if (target_v >= 0) {  // the forward's logit (block_logit of a "none"/"hard" entry, + delta / tau)
        const int u = threadIdx.x;
        const int64_t i = i0 + u, j = j0 + target_v;
        const float cos = target_dot * rx[i] * ry[j];
        float logit = cos * inv_tau;
        if (pattern == kPatternHard && i == j) logit += weight;
        const float delta = target.delta[i];
        logit += delta * inv_tau;
        float ds = row_weight[i] * expf(logit - lse[i]);
        if (col_lse != nullptr) ds += col_weight[j] * expf(logit - col_lse[j]);
        if (ds != 0.0f) tau_part += ds * (cos + delta);  // the target's similarity: f(c) - m
        s[u * kSLd + target_v] = ds * target.grad[i];   // chain rule: times f'(c)
      }
    }
    __syncthreads();

    float* gy = scratch;               // [kBN][kGLd]: y_hat chunk
    float* gx = scratch + kBN * kGLd;  // [kBM][kGLd]: x_hat chunk
    for (int64_t d0 = 0; d0 < dim; d0 += kGDk) {
      for (int idx = threadIdx.x; idx < kBN * kGDk; idx += kThreads) {
        const int r = idx / kGDk, k = idx % kGDk;
        const int64_t gk = d0 + k;
        const int64_t j = j0 + r, i = i0 + r;
        gy[r * kGLd + k] = (j < n_y && gk < dim) ? ry[j] * to_float(y[j * ys + gk]) : 0.0f;
        gx[r * kGLd + k] = (i < n_x && gk < dim) ? rx[i] * to_float(x[i * xs + gk]) : 0.0f;
      }
      __syncthreads();
      // Warp w owns the 8 rows (resp. columns) 8w .. 8w + 7 of the tile; the lane is the D index
      // inside the chunk. Register blocking: one y_hat (x_hat) value feeds 8 FMAs, and the dS
      // values are read as float4 (row stride kSLd = 68 floats keeps them 16-byte aligned).
      const int64_t gk = d0 + lane;
      constexpr int kPerWarp = kBM / (kThreads / kWarp);  // 8
      static_assert(kPerWarp == 8 && kBM == kBN, "the column products below unroll 8 columns per warp");
      if (grad_rows != nullptr) {
        float acc[kPerWarp];
#pragma unroll
        for (int q = 0; q < kPerWarp; ++q) acc[q] = 0.0f;
        for (int v = 0; v < kBN; v += 4) {
          const float y0 = gy[(v + 0) * kGLd + lane], y1 = gy[(v + 1) * kGLd + lane];
          const float y2 = gy[(v + 2) * kGLd + lane], y3 = gy[(v + 3) * kGLd + lane];
#pragma unroll
          for (int q = 0; q < kPerWarp; ++q) {
            const float4 d4 = *reinterpret_cast<const float4*>(s + (kPerWarp * warp + q) * kSLd + v);
            acc[q] = fmaf(d4.x, y0, fmaf(d4.y, y1, fmaf(d4.z, y2, fmaf(d4.w, y3, acc[q]))));
          }
        }
#pragma unroll
        for (int q = 0; q < kPerWarp; ++q) {
          const int64_t i = i0 + kPerWarp * warp + q;
          if (i < n_x && gk < dim && acc[q] != 0.0f) atomicAdd(grad_rows + i * dim + gk, acc[q]);
        }
      }
      if (grad_cols != nullptr) {
        float acc[kPerWarp];
#pragma unroll
        for (int q = 0; q < kPerWarp; ++q) acc[q] = 0.0f;
        for (int u = 0; u < kBM; ++u) {
          const float xv = gx[u * kGLd + lane];
          const float4 lo = *reinterpret_cast<const float4*>(s + u * kSLd + kPerWarp * warp);
          const float4 hi = *reinterpret_cast<const float4*>(s + u * kSLd + kPerWarp * warp + 4);
          acc[0] = fmaf(lo.x, xv, acc[0]);
          acc[1] = fmaf(lo.y, xv, acc[1]);
          acc[2] = fmaf(lo.z, xv, acc[2]);
          acc[3] = fmaf(lo.w, xv, acc[3]);
          acc[4] = fmaf(hi.x, xv, acc[4]);
          acc[5] = fmaf(hi.y, xv, acc[5]);
          acc[6] = fmaf(hi.z, xv, acc[6]);
          acc[7] = fmaf(hi.w, xv, acc[7]);
        }
#pragma unroll
        for (int q = 0; q < kPerWarp; ++q) {
          const int64_t j = j0 + kPerWarp * warp + q;
          if (j < n_y && gk < dim && acc[q] != 0.0f) atomicAdd(grad_cols + j * dim + gk, acc[q]);
        }
      }
      __syncthreads();
    }
  }

  tau_part = warp_sum(tau_part);
  if (lane == 0) warp_part[warp] = tau_part;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kThreads / kWarp; ++w) total += warp_part[w];
    if (total != 0.0) atomicAdd(dtau_acc, total);
  }
}

}  // namespace

int launch_block_backward(const Operand& rows, const Operand& cols, int64_t dim, uintptr_t tau, float weight,
                          int pattern, uintptr_t lse, uintptr_t row_weight, uintptr_t col_lse,
                          uintptr_t col_weight, uintptr_t grad_rows, uintptr_t grad_cols, uintptr_t dtau_acc,
                          int n_splits, uintptr_t labels, int64_t target_col_offset, uintptr_t target_delta,
                          uintptr_t target_grad, int device, uintptr_t stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  const dim3 grid(static_cast<unsigned>((rows.rows + kBM - 1) / kBM), static_cast<unsigned>(n_splits));
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const TargetTerms target{target_col_offset >= 0 ? kTargetRows : kTargetNone, target_col_offset,
                           reinterpret_cast<const int64_t*>(labels), reinterpret_cast<const float*>(target_delta),
                           reinterpret_cast<const float*>(target_grad)};
  const bool ok = dispatch_pair(rows.dtype, cols.dtype, [&](auto xr, auto yc) {
    using TR = decltype(xr);
    using TC = decltype(yc);
    const auto kernel = &block_backward_kernel<TR, TC>;
    SIMCSE_LAUNCH(kernel, grid, kThreads, st,
        reinterpret_cast<const TR*>(rows.data), rows.stride, rows.rows, reinterpret_cast<const float*>(rows.inv_norm),
        reinterpret_cast<const TC*>(cols.data), cols.stride, cols.rows, reinterpret_cast<const float*>(cols.inv_norm),
        dim, reinterpret_cast<const float*>(tau), weight, pattern, reinterpret_cast<const float*>(lse),
        reinterpret_cast<const float*>(row_weight), reinterpret_cast<const float*>(col_lse),
        reinterpret_cast<const float*>(col_weight), reinterpret_cast<float*>(grad_rows),
        reinterpret_cast<float*>(grad_cols), reinterpret_cast<double*>(dtau_acc), n_splits, target);
  });
  if (!ok) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace simcse
