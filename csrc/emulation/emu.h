// Host (CPU) emulation of the few CUDA features the kernels use, to test them without a GPU.
//
// Force-included (g++ -include emu.h -x c++) when compiling csrc/*.cu as plain C++: each CTA of a
// launch runs as blockDim.x std::threads, one CTA after another; __syncthreads is a barrier of
// the CTA, warp shuffles exchange through a per-warp buffer and barrier, __shared__ arrays are
// function-local statics (shared by the threads of the running CTA), atomicAdd takes a mutex.
// nvcuda::wmma is emulated too (every lane of a warp holds the whole 16x16 tile and computes
// it redundantly; lane 0 stores), with the pointer-alignment and ldm rules of the real API
// checked, so the float16/bfloat16 tiles take the WMMA code path and float32 the FMA one.
// Everything else (indexing, bounds checks, patterns, online LSE, reductions, gradient
// products, atomics, launch code) is the code that runs on the GPU. A violated rule makes the
// launch fail (cudaGetLastError of stubs.cpp), which the bindings raise as RuntimeError.
// Used only by tests/test_cuda_ext.py (fixture emulated_extension builds the module with g++).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

#include <atomic>
#include <barrier>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __align__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define SIMCSE_HAS_WMMA 1

namespace simcse_emu {

struct Index3 {
  unsigned x = 0, y = 0, z = 0;
};

inline thread_local Index3 thread_index;
inline thread_local Index3 block_index;
inline std::unique_ptr<std::barrier<>> cta_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline std::vector<float> shuffle_buffer;
inline std::mutex atomic_mutex;
inline std::atomic<int> failed{0};  // set by a violated API rule; read by cudaGetLastError

inline void check(bool ok) {
  if (!ok) failed = 1;
}

/// Run kernel(args...) over grid x block (1-D blocks), one CTA at a time.
template <typename... KArgs, typename... Args>
void launch(dim3 grid, dim3 block, void (*kernel)(KArgs...), Args... args) {
  const unsigned threads = block.x;
  const unsigned warps = (threads + 31) / 32;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      cta_barrier = std::make_unique<std::barrier<>>(threads);
      warp_barriers.clear();
      for (unsigned w = 0; w < warps; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
      shuffle_buffer.assign(threads, 0.0f);
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([=] {
          thread_index = Index3{t, 0, 0};
          block_index = Index3{bx, by, 0};
          kernel(args...);
        });
      }
      for (auto& th : pool) th.join();
    }
  }
}

}  // namespace simcse_emu

#define threadIdx (::simcse_emu::thread_index)
#define blockIdx (::simcse_emu::block_index)
#define SIMCSE_LAUNCH(kernel, grid, block, stream, ...) \
  ::simcse_emu::launch(dim3(grid), dim3(block), kernel, __VA_ARGS__)

inline void __syncthreads() { simcse_emu::cta_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int offset) {
  const unsigned t = simcse_emu::thread_index.x;
  const unsigned warp = t / 32, lane = t % 32;
  simcse_emu::shuffle_buffer[t] = v;
  simcse_emu::warp_barriers[warp]->arrive_and_wait();
  const float other = simcse_emu::shuffle_buffer[warp * 32 + (lane ^ static_cast<unsigned>(offset))];
  simcse_emu::warp_barriers[warp]->arrive_and_wait();
  return other;
}

inline float atomicAdd(float* address, float value) {
  std::lock_guard<std::mutex> lock(simcse_emu::atomic_mutex);
  const float old = *address;
  *address = old + value;
  return old;
}

inline double atomicAdd(double* address, double value) {
  std::lock_guard<std::mutex> lock(simcse_emu::atomic_mutex);
  const double old = *address;
  *address = old + value;
  return old;
}

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

/// The whole 16x16 tile, held by every lane (element (r, c) at x[16 r + c]).
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation covers m16n16k16 only");
  float x[256];
};

inline float widen(float v) { return v; }
inline float widen(__half v) { return __half2float(v); }
inline float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

inline void check_pointer(const void* p, unsigned ldm, unsigned element_bytes) {
  simcse_emu::check(reinterpret_cast<std::uintptr_t>(p) % 32 == 0);  // 256-bit aligned
  simcse_emu::check((ldm * element_bytes) % 16 == 0);                 // ldm: multiple of 16 bytes
}

template <typename Use, typename T, typename L>
void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float v) {
  for (float& e : f.x) e = v;
}

template <typename T>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  check_pointer(p, ldm, sizeof(T));
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 16; ++k) f.x[16 * r + k] = widen(p[r * ldm + k]);
}

template <typename T>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm) {
  check_pointer(p, ldm, sizeof(T));
  for (int k = 0; k < 16; ++k)
    for (int c = 0; c < 16; ++c) f.x[16 * k + c] = widen(p[c * ldm + k]);
}

template <typename T>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, row_major>& a,
              const fragment<matrix_b, 16, 16, 16, T, col_major>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int r = 0; r < 16; ++r)
    for (int col = 0; col < 16; ++col) {
      float acc = c.x[16 * r + col];
      for (int k = 0; k < 16; ++k) acc += a.x[16 * r + k] * b.x[16 * k + col];
      out[16 * r + col] = acc;
    }
  for (int i = 0; i < 256; ++i) d.x[i] = out[i];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  check_pointer(p, ldm, sizeof(float));
  simcse_emu::check(layout == mem_row_major);
  if (simcse_emu::thread_index.x % 32 != 0) return;  // one lane writes the warp's tile
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) p[r * ldm + c] = f.x[16 * r + c];
}

}  // namespace wmma
}  // namespace nvcuda
