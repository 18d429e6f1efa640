// CUDA runtime entry points for the host emulation (csrc/emulation/emu.h): the "device" is the
// CPU, so every call succeeds. Linked instead of cudart into the emulated test module only.
#include <cuda_runtime_api.h>

extern "C" {

cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
const char* cudaGetErrorName(cudaError_t error) { return error == cudaSuccess ? "cudaSuccess" : "cudaError"; }
const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "error (host emulation)";
}
}
