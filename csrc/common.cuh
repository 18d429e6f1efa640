// Shared device helpers of the simcse_kernels CUDA extension (pure CUDA: no torch headers).
//
// Conventions used by every kernel:
//   * matrices are row-major with a row stride in elements (>= D); rows are embeddings;
//   * dtype codes: 0 = float32, 1 = float16, 2 = bfloat16 (see dtype_codes.h);
//   * the inverse norm of a row x is r = 1 / max(||x||, 1e-12) (torch.nn.functional.normalize),
//     so the normalized row is x_hat = r * x;
//   * all arithmetic is float32; 16-bit inputs are only ever widened (their products are exact in
//     float32, which is why the tensor-core tiles multiply the raw rows and scale by r afterwards).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

/// Kernel launch ``kernel<<<grid, block, 0, stream>>>(args...)``. A macro so that the host-side
/// emulator used to test the kernels on a CPU (csrc/emulation/) can run the same launch code.
#ifndef SIMCSE_LAUNCH
#define SIMCSE_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

namespace simcse {

constexpr float kNormEps = 1e-12f;
constexpr int kWarp = 32;

/// Widen one element to float32.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

/// Round a float32 to the storage type T (round to nearest even).
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

/// Sum of ``v`` over the 32 lanes of a warp (every lane gets the result).
__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

/// Maximum of ``v`` over the 32 lanes of a warp (every lane gets the result).
__device__ __forceinline__ float warp_max(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

}  // namespace simcse
