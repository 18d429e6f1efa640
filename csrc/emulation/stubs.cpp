// CUDA runtime entry points for the host emulation (csrc/emulation/emu.h): the "device" is the
// CPU, so every call succeeds (cudaGetLastError reports emu.h's API-rule checks). Linked instead of cudart into the emulated test module only.
#include <cuda_runtime_api.h>

#include "emu.h"

extern "C" {

cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaGetLastError(void) {  // a violated WMMA rule in the last launch
  return simcse_emu::failed.exchange(0) ? cudaErrorMisalignedAddress : cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
const char* cudaGetErrorName(cudaError_t error) { return error == cudaSuccess ? "cudaSuccess" : "cudaError"; }
const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "error (host emulation)";
}
}
