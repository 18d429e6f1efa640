// One 64 x 64 tile of raw dot products x_i . y_j, and the logit of one entry of a block.
//
// dot_tile multiplies the *raw* rows (not the normalized ones): for float16/bfloat16 inputs the
// products are exact in float32, so scaling the dot by r_i r_j afterwards keeps float32 accuracy
// while the multiply runs on tensor cores (WMMA 16x16x16, float32 accumulate, sm_80+). float32
// inputs, mixed pairs (a 16-bit operand against MixCSE's float32 mixtures) and pre-sm_80 builds
// use plain float32 FMA tiles. Every load is bounds-checked: rows past the end and columns past D
// read as 0, so any N, M and D (no multiple of 8 needed) are valid.
#pragma once

#include <math.h>
#if defined(__CUDACC__)
#include <mma.h>
#endif

// WMMA tiles need sm_80+ (bf16); the host emulation (csrc/emulation/emu.h) defines it to 1.
#ifndef SIMCSE_HAS_WMMA
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define SIMCSE_HAS_WMMA 1
#else
#define SIMCSE_HAS_WMMA 0
#endif
#endif

#include <type_traits>

#include "common.cuh"
#include "launchers.h"

namespace simcse {

constexpr int kBM = 64;          // rows per tile
constexpr int kBN = 64;          // columns per tile (kBM == kBN: the FMA buffers are shared)
constexpr int kBK = 32;          // D per step of the dot tile
constexpr int kThreads = 256;    // 8 warps
constexpr int kSLd = kBN + 4;    // float leading dim of the logit tile (multiple of 4 for WMMA)
constexpr int kHLd = kBK + 8;    // 16-bit leading dim of the WMMA operand tiles (multiple of 8)
constexpr int kFLd = kBM + 1;    // float leading dim of the k-major FMA operand tiles
constexpr int kGDk = 32;         // D per step of the gradient products
constexpr int kGLd = kGDk + 1;   // float leading dim of the gradient operand tiles

// Scratch shared by the phases of a tile (operand tiles of the dot, operand tiles of the
// gradient products), in floats.
constexpr int kHalfTileFloats = (2 * kBM * kHLd) / 2;
constexpr int kFmaTileFloats = 2 * kBK * kFLd;
constexpr int kGradTileFloats = (kBM + kBN) * kGLd;
constexpr int kScratchFloats = kGradTileFloats > kFmaTileFloats
                                   ? (kGradTileFloats > kHalfTileFloats ? kGradTileFloats : kHalfTileFloats)
                                   : (kFmaTileFloats > kHalfTileFloats ? kFmaTileFloats : kHalfTileFloats);
static_assert(kBM == kBN, "the FMA tile code assumes square tiles");
static_assert(kThreads == 256, "thread mappings below assume 256 threads");

template <typename T>
__device__ __forceinline__ T zero_value() {
  return from_float<T>(0.0f);
}

/// Load a kBM x kBK tile of x (rows row0.., columns k0..) into 16-bit shared memory [kBM][kHLd].
template <typename T>
__device__ __forceinline__ void load_tile_16(T* dst, const T* __restrict__ x, int64_t stride, int64_t n_rows,
                                             int64_t row0, int64_t dim, int64_t k0) {
  for (int idx = threadIdx.x; idx < kBM * kBK; idx += kThreads) {
    const int r = idx / kBK, k = idx % kBK;
    const int64_t gr = row0 + r, gk = k0 + k;
    dst[r * kHLd + k] = (gr < n_rows && gk < dim) ? x[gr * stride + gk] : zero_value<T>();
  }
}

/// Load a kBM x kBK tile of x into float shared memory, k-major: dst[k * kFLd + r].
template <typename T>
__device__ __forceinline__ void load_tile_f32(float* dst, const T* __restrict__ x, int64_t stride, int64_t n_rows,
                                              int64_t row0, int64_t dim, int64_t k0) {
  for (int idx = threadIdx.x; idx < kBM * kBK; idx += kThreads) {
    const int r = idx / kBK, k = idx % kBK;
    const int64_t gr = row0 + r, gk = k0 + k;
    dst[k * kFLd + r] = (gr < n_rows && gk < dim) ? to_float(x[gr * stride + gk]) : 0.0f;
  }
}

template <typename TR, typename TC>
struct UseWmma {
  static constexpr bool value = std::is_same<TR, TC>::value && !std::is_same<TR, float>::value;
};

/// s[u * kSLd + v] = x_{i0+u} . y_{j0+v} (raw rows; 0 outside the matrices), u, v < 64.
///
/// Args: x (rows, stride xs, n_x rows), y (cols, stride ys, n_y rows), dim = D, s = the float
/// logit tile in shared memory, scratch = kScratchFloats floats of shared memory (16-byte
/// aligned). Must be called by all kThreads threads; ends with __syncthreads().
template <typename TR, typename TC>
__device__ void dot_tile(const TR* __restrict__ x, int64_t xs, int64_t n_x, int64_t i0, const TC* __restrict__ y,
                         int64_t ys, int64_t n_y, int64_t j0, int64_t dim, float* s, float* scratch) {
#if SIMCSE_HAS_WMMA
  if constexpr (UseWmma<TR, TC>::value) {
    using namespace nvcuda;
    const int warp = threadIdx.x / kWarp;
    const int wm = warp / 2;  // 4 warp rows of 16
    const int wn = warp % 2;  // 2 warp columns of 32 (two 16-wide fragments)
    TR* sx = reinterpret_cast<TR*>(scratch);
    TR* sy = sx + kBM * kHLd;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.0f);
    wmma::fill_fragment(acc[1], 0.0f);
    for (int64_t k0 = 0; k0 < dim; k0 += kBK) {
      load_tile_16(sx, x, xs, n_x, i0, dim, k0);
      load_tile_16(sy, y, ys, n_y, j0, dim, k0);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, TR, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, sx + (16 * wm) * kHLd + kk, kHLd);
#pragma unroll
        for (int f = 0; f < 2; ++f) {
          // B = y^T (K x N) read column-major from the row-major y tile.
          wmma::fragment<wmma::matrix_b, 16, 16, 16, TR, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, sy + (32 * wn + 16 * f) * kHLd + kk, kHLd);
          wmma::mma_sync(acc[f], fa, fb, acc[f]);
        }
      }
      __syncthreads();
    }
    for (int f = 0; f < 2; ++f)
      wmma::store_matrix_sync(s + (16 * wm) * kSLd + 32 * wn + 16 * f, acc[f], kSLd, wmma::mem_row_major);
    __syncthreads();
    return;
  }
#endif
  // float32 FMA tile: thread (ty, tx) owns rows ty + 16a and columns tx + 16b, a, b < 4.
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  float* fx = scratch;
  float* fy = scratch + kBK * kFLd;
  float acc[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = 0.0f;
  for (int64_t k0 = 0; k0 < dim; k0 += kBK) {
    load_tile_f32(fx, x, xs, n_x, i0, dim, k0);
    load_tile_f32(fy, y, ys, n_y, j0, dim, k0);
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < kBK; ++k) {
      float va[4], vb[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) va[a] = fx[k * kFLd + ty + 16 * a];
#pragma unroll
      for (int b = 0; b < 4; ++b) vb[b] = fy[k * kFLd + tx + 16 * b];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(va[a], vb[b], acc[a][b]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) s[(ty + 16 * a) * kSLd + tx + 16 * b] = acc[a][b];
  __syncthreads();
}

/// Logit of entry (i, j) of a block from its raw dot product.
///
/// cos = dot r_i r_j; logit = cos / tau, then the block's pattern (PatternCode); n = the number
/// of rows (N, for the modular MixCSE masks). *is_const is set when the entry is a constant
/// (MixCSE's masked 0, possibly + w), whose gradient is zero; *cos_out receives cos.
__device__ __forceinline__ float block_logit(float dot, float ri, float rj, float inv_tau, float weight, int pattern,
                                             int64_t i, int64_t j, int64_t n, bool* is_const, float* cos_out) {
  const float cos = dot * ri * rj;
  *cos_out = cos;
  *is_const = false;
  float logit = cos * inv_tau;
  switch (pattern) {
    case kPatternHard:
      if (i == j) logit += weight;
      break;
    case kPatternSelf:
      if (i == j) logit = -INFINITY;
      break;
    case kPatternMix3:
      if (i == (j + 1) % n) {  // entry (i, (i-1) mod N)
        logit = 0.0f;
        *is_const = true;
      }
      if (i == j) logit += weight;
      break;
    case kPatternMix4:
      if (j == (i + 1) % n) {  // entry (i, (i+1) mod N)
        logit = 0.0f;
        *is_const = true;
      }
      if (i == j) logit += weight;
      break;
    default:
      break;
  }
  return logit;
}

/// The target entries of one block and the margins' per-row terms (simcse_kernels/reference.py,
/// "Margins and similarity"): the target logit of anchor row a is (f(c_a) - m) / tau, i.e. the
/// block's logit plus delta[a] / tau, and its dS gets the chain-rule factor grad[a] = f'(c_a).
///
///   mode        TargetCode: kTargetNone (no target entry to modify), kTargetRows (entry
///               (a, labels[a] - col_offset): anchors x positives / negatives), kTargetCols (entry
///               (labels[a], a): the transposed positives block of the symmetric column LSE);
///   col_offset  label of the block's first column (kTargetRows);
///   labels      int64[N] (read unless kTargetNone);
///   delta       float32[N] f(c_a) - m - c_a, or null (no margin);
///   grad        float32[N] f'(c_a), or null (no margin, or a forward kernel).
struct TargetTerms {
  int mode;
  int64_t col_offset;
  const int64_t* labels;
  const float* delta;
  const float* grad;
};

/// The anchor row whose target is entry (i, j) of the block, or -1 (always -1 for kTargetNone).
__device__ __forceinline__ int64_t target_owner(const TargetTerms& t, int64_t i, int64_t j) {
  if (t.mode == kTargetRows) return t.labels[i] - t.col_offset == j ? i : -1;
  if (t.mode == kTargetCols) return t.labels[j] == i ? j : -1;
  return -1;
}

/// Call ``f.template operator()<TR, TC>()`` for a (rows dtype, cols dtype) pair: equal dtypes,
/// or one side float32. Returns false for an unsupported pair (float16 with bfloat16).
template <typename F>
bool dispatch_pair(int rows_dtype, int cols_dtype, F&& f) {
  if (rows_dtype == kFloat32 && cols_dtype == kFloat32) return f(float(), float()), true;
  if (rows_dtype == kFloat16 && cols_dtype == kFloat16) return f(__half(), __half()), true;
  if (rows_dtype == kBFloat16 && cols_dtype == kBFloat16) return f(__nv_bfloat16(), __nv_bfloat16()), true;
  if (rows_dtype == kFloat16 && cols_dtype == kFloat32) return f(__half(), float()), true;
  if (rows_dtype == kBFloat16 && cols_dtype == kFloat32) return f(__nv_bfloat16(), float()), true;
  if (rows_dtype == kFloat32 && cols_dtype == kFloat16) return f(float(), __half()), true;
  if (rows_dtype == kFloat32 && cols_dtype == kBFloat16) return f(float(), __nv_bfloat16()), true;
  return false;
}

/// Call f(T()) for one dtype code; false for an unknown code.
template <typename F>
bool dispatch_one(int dtype, F&& f) {
  if (dtype == kFloat32) return f(float()), true;
  if (dtype == kFloat16) return f(__half()), true;
  if (dtype == kBFloat16) return f(__nv_bfloat16()), true;
  return false;
}

}  // namespace simcse
