// O(N·D) row-wise kernels of the CUDA backend: inverse norms, target cosines, the target-logit
// backward and the normalization backward. One warp per row, 8 rows per 256-thread CTA; every
// kernel loops over D with the lane as the stride-32 index, so any D is valid.
//
//   row_inv_norms      r_i = 1 / max(||x_i||, 1e-12)                                 (forward)
//   target_cos         t_i = (a_i . c_{l_i}) r_i r_{l_i}, c = [positives; negatives]  (forward)
//   target_backward    grad_a[i] -= g_i c_hat_{l_i}; grad_c[l_i] -= g_i a_hat_i       (backward)
//   normalize_backward dx_i = r_i (dz_i - z_i (z_i . dz_i)) / tau, z_i = r_i x_i       (backward)
//                      (dx_i = dz_i / (eps tau) when ||x_i|| < eps: F.normalize's clamp)
#include "common.cuh"
#include "launchers.h"
#include "tile.cuh"

namespace simcse {
namespace {

constexpr int kRowsPerCta = 8;
constexpr int kRowThreads = kRowsPerCta * kWarp;

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    row_inv_norms_kernel(const T* __restrict__ x, int64_t stride, int64_t n, int64_t dim, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerCta + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= n) return;  // warp-uniform
  float ss = 0.0f;
  for (int64_t k = lane; k < dim; k += kWarp) {
    const float v = to_float(x[i * stride + k]);
    ss = fmaf(v, v, ss);
  }
  ss = warp_sum(ss);
  if (lane == 0) out[i] = 1.0f / fmaxf(sqrtf(ss), kNormEps);
}

/// The candidate row of label l: positives[l] if l < P, else negatives[l - P]; nullptr if out of range.
template <typename T>
__device__ __forceinline__ const T* candidate(const T* p, int64_t ps, int64_t n_p, const float* rp, const T* ng,
                                              int64_t ns, int64_t n_n, const float* rn, int64_t l, float* r,
                                              int64_t* index, bool* is_negative) {
  if (l >= 0 && l < n_p) {
    *r = rp[l];
    *index = l;
    *is_negative = false;
    return p + l * ps;
  }
  if (l >= n_p && l < n_p + n_n && ng != nullptr) {
    *r = rn[l - n_p];
    *index = l - n_p;
    *is_negative = true;
    return ng + (l - n_p) * ns;
  }
  return nullptr;
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    target_cos_kernel(const T* __restrict__ a, int64_t as, int64_t n, const float* __restrict__ ra,
                      const T* __restrict__ p, int64_t ps, int64_t n_p, const float* __restrict__ rp,
                      const T* __restrict__ ng, int64_t ns, int64_t n_n, const float* __restrict__ rn,
                      int64_t dim, const int64_t* __restrict__ labels, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerCta + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= n) return;
  float rc;
  int64_t index;
  bool is_negative;
  const T* c = candidate(p, ps, n_p, rp, ng, ns, n_n, rn, labels[i], &rc, &index, &is_negative);
  if (c == nullptr) {  // labels are range-checked in Python; never fail silently
    if (lane == 0) out[i] = NAN;
    return;
  }
  float acc = 0.0f;
  for (int64_t k = lane; k < dim; k += kWarp) acc = fmaf(to_float(a[i * as + k]), to_float(c[k]), acc);
  acc = warp_sum(acc);
  if (lane == 0) out[i] = acc * ra[i] * rc;
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    target_backward_kernel(const T* __restrict__ a, int64_t as, int64_t n, const float* __restrict__ ra,
                           const T* __restrict__ p, int64_t ps, int64_t n_p, const float* __restrict__ rp,
                           const T* __restrict__ ng, int64_t ns, int64_t n_n, const float* __restrict__ rn,
                           int64_t dim, const int64_t* __restrict__ labels, const float* __restrict__ g,
                           float* grad_a, float* grad_p, float* grad_n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerCta + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= n) return;
  float rc;
  int64_t index;
  bool is_negative;
  const T* c = candidate(p, ps, n_p, rp, ng, ns, n_n, rn, labels[i], &rc, &index, &is_negative);
  const float gi = g[i];
  if (c == nullptr || gi == 0.0f) return;
  float* grad_c = is_negative ? grad_n : grad_p;
  const float ga = -gi * rc, gc = -gi * ra[i];
  for (int64_t k = lane; k < dim; k += kWarp) {
    atomicAdd(grad_a + i * dim + k, ga * to_float(c[k]));
    if (grad_c != nullptr) atomicAdd(grad_c + index * dim + k, gc * to_float(a[i * as + k]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    normalize_backward_kernel(const T* __restrict__ x, int64_t stride, int64_t n, int64_t dim,
                              const float* __restrict__ dz, const float* __restrict__ tau, T* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerCta + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= n) return;
  float ss = 0.0f, xdz = 0.0f;
  for (int64_t k = lane; k < dim; k += kWarp) {
    const float v = to_float(x[i * stride + k]);
    ss = fmaf(v, v, ss);
    xdz = fmaf(v, dz[i * dim + k], xdz);
  }
  ss = warp_sum(ss);
  xdz = warp_sum(xdz);
  const float norm = sqrtf(ss);
  const float inv_tau = 1.0f / tau[0];
  if (norm < kNormEps) {  // F.normalize divides by the constant eps here: no projection
    const float scale = inv_tau / kNormEps;
    for (int64_t k = lane; k < dim; k += kWarp) out[i * dim + k] = from_float<T>(dz[i * dim + k] * scale);
    return;
  }
  const float r = 1.0f / norm;
  const float proj = xdz * r * r;  // (z . dz) r with z = r x
  for (int64_t k = lane; k < dim; k += kWarp) {
    const float v = to_float(x[i * stride + k]);
    out[i * dim + k] = from_float<T>(r * inv_tau * (dz[i * dim + k] - v * proj));
  }
}

unsigned row_grid(int64_t n) { return static_cast<unsigned>((n + kRowsPerCta - 1) / kRowsPerCta); }

}  // namespace

int launch_row_inv_norms(const Operand& x, int64_t dim, uintptr_t out, int device, uintptr_t stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const bool ok = dispatch_one(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto kernel = &row_inv_norms_kernel<T>;
    SIMCSE_LAUNCH(kernel, row_grid(x.rows), kRowThreads, st, reinterpret_cast<const T*>(x.data), x.stride, x.rows,
                  dim, reinterpret_cast<float*>(out));
  });
  if (!ok) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(cudaGetLastError());
}

int launch_target_cos(const Operand& anchors, const Operand& positives, const Operand& negatives, int64_t dim,
                      uintptr_t labels, uintptr_t out, int device, uintptr_t stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const bool ok = dispatch_one(anchors.dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto kernel = &target_cos_kernel<T>;
    SIMCSE_LAUNCH(kernel, row_grid(anchors.rows), kRowThreads, st,
        reinterpret_cast<const T*>(anchors.data), anchors.stride, anchors.rows,
        reinterpret_cast<const float*>(anchors.inv_norm), reinterpret_cast<const T*>(positives.data),
        positives.stride, positives.rows, reinterpret_cast<const float*>(positives.inv_norm),
        reinterpret_cast<const T*>(negatives.data), negatives.stride, negatives.rows,
        reinterpret_cast<const float*>(negatives.inv_norm), dim, reinterpret_cast<const int64_t*>(labels),
        reinterpret_cast<float*>(out));
  });
  if (!ok) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(cudaGetLastError());
}

int launch_target_backward(const Operand& anchors, const Operand& positives, const Operand& negatives,
                           int64_t dim, uintptr_t labels, uintptr_t g, uintptr_t grad_a, uintptr_t grad_p,
                           uintptr_t grad_n, int device, uintptr_t stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const bool ok = dispatch_one(anchors.dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto kernel = &target_backward_kernel<T>;
    SIMCSE_LAUNCH(kernel, row_grid(anchors.rows), kRowThreads, st,
        reinterpret_cast<const T*>(anchors.data), anchors.stride, anchors.rows,
        reinterpret_cast<const float*>(anchors.inv_norm), reinterpret_cast<const T*>(positives.data),
        positives.stride, positives.rows, reinterpret_cast<const float*>(positives.inv_norm),
        reinterpret_cast<const T*>(negatives.data), negatives.stride, negatives.rows,
        reinterpret_cast<const float*>(negatives.inv_norm), dim, reinterpret_cast<const int64_t*>(labels),
        reinterpret_cast<const float*>(g), reinterpret_cast<float*>(grad_a), reinterpret_cast<float*>(grad_p),
        reinterpret_cast<float*>(grad_n));
  });
  if (!ok) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(cudaGetLastError());
}

int launch_normalize_backward(const Operand& x, int64_t dim, uintptr_t dz, uintptr_t tau, uintptr_t out,
                              int device, uintptr_t stream) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const bool ok = dispatch_one(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto kernel = &normalize_backward_kernel<T>;
    SIMCSE_LAUNCH(kernel, row_grid(x.rows), kRowThreads, st,
        reinterpret_cast<const T*>(x.data), x.stride, x.rows, dim, reinterpret_cast<const float*>(dz),
        reinterpret_cast<const float*>(tau), reinterpret_cast<T*>(out));
  });
  if (!ok) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace simcse
