// Checking macros for CUDA runtime and cuBLASLt calls. A failing call throws moelab::Error naming
// the call, the file and the line, so a bad launch is reported where it happened instead of at the
// next synchronization. Kernel launches are checked with MOELAB_CUDA_LAUNCH_CHECK right after.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <string>

#include "core/error.hpp"

namespace moelab::cuda_detail {

[[noreturn]] inline void throw_cuda(cudaError_t e, const char* call, const char* file, int line) {
  throw Error(std::string("CUDA error '") + cudaGetErrorString(e) + "' (" + cudaGetErrorName(e) +
              ") from " + call + " at " + file + ":" + std::to_string(line));
}

[[noreturn]] inline void throw_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  throw Error(std::string("cuBLAS error ") + std::to_string(int(s)) + " (" + cublasLtGetStatusName(s) +
              ": " + cublasLtGetStatusString(s) + ") from " + call + " at " + file + ":" +
              std::to_string(line));
}

}  // namespace moelab::cuda_detail

#define MOELAB_CUDA_CHECK(call)                                                       \
  do {                                                                                \
    cudaError_t moelab_e_ = (call);                                                   \
    if (moelab_e_ != cudaSuccess)                                                     \
      ::moelab::cuda_detail::throw_cuda(moelab_e_, #call, __FILE__, __LINE__);        \
  } while (0)

#define MOELAB_CUBLAS_CHECK(call)                                                     \
  do {                                                                                \
    cublasStatus_t moelab_s_ = (call);                                                \
    if (moelab_s_ != CUBLAS_STATUS_SUCCESS)                                           \
      ::moelab::cuda_detail::throw_cublas(moelab_s_, #call, __FILE__, __LINE__);      \
  } while (0)

// After a kernel launch: catches bad configurations (grid, shared memory) at the launch site.
#define MOELAB_CUDA_LAUNCH_CHECK(name)                                                \
  do {                                                                                \
    cudaError_t moelab_e_ = cudaPeekAtLastError();                                    \
    if (moelab_e_ != cudaSuccess)                                                     \
      ::moelab::cuda_detail::throw_cuda(moelab_e_, "launch of " name, __FILE__, __LINE__); \
  } while (0)
