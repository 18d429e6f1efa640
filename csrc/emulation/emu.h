// Host (CPU) emulation of the few CUDA features the kernels use, to test them without a GPU.
//
// Force-included (g++ -include emu.h -x c++) when compiling csrc/*.cu as plain C++: each CTA of a
// launch runs as blockDim.x std::threads, one CTA after another; __syncthreads is a barrier of
// the CTA, warp shuffles exchange through a per-warp buffer and barrier, __shared__ arrays are
// function-local statics (shared by the threads of the running CTA), atomicAdd takes a mutex.
// Tensor-core (WMMA) tiles are device-only, so the emulated build exercises the float32 FMA
// tile path for every dtype; everything else (indexing, bounds checks, patterns, online LSE,
// reductions, gradient products, atomics, launch code) is the code that runs on the GPU.
// Used only by tests/test_cuda_ext.py (fixture emulated_extension builds the module with g++).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

#include <barrier>
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
