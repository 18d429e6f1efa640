// CUDA runtime queries of the extension: error text, device availability, compiled version.
// Compiled by nvcc so that api.cpp needs no CUDA header; the runtime (cudart_static) loads the
// driver lazily, on the first of these calls, which is why importing the module needs no GPU.
#include <cuda_runtime.h>

#include <string>

#include "launchers.h"

namespace simcse {

std::string error_string(int code) {
  const auto err = static_cast<cudaError_t>(code);
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

std::string runtime_status() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return "the CUDA runtime of the extension found no usable GPU (" + error_string(static_cast<int>(err)) + ")";
  }
  if (count == 0) return "the CUDA runtime of the extension found no GPU";
  return "";
}

int compiled_cuda_version() { return CUDART_VERSION; }

}  // namespace simcse
