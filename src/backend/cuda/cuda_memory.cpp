// Tracked cudaMalloc/cudaFree (see cuda_memory.hpp).
#include "backend/cuda/cuda_memory.hpp"

#include <algorithm>
#include <string>

#include "backend/cuda/cuda_check.hpp"

namespace moelab {

std::shared_ptr<void> CudaMemory::allocate(size_t bytes) {
  size_t rounded = std::max<size_t>(256, (bytes + 255) / 256 * 256);
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, rounded);
  if (e != cudaSuccess) {
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    throw Error("cuda backend: out of device memory allocating " + std::to_string(rounded) +
                " bytes (" + std::to_string(free_b >> 20) + " MiB free of " +
                std::to_string(total_b >> 20) + " MiB; this backend holds " +
                std::to_string(*current_ >> 20) +
                " MiB): reduce train.batch_size or model size");
  }
  *current_ += rounded;
  *peak_ = std::max(*peak_, *current_);
  auto current = current_;
  return std::shared_ptr<void>(p, [current, rounded](void* q) {
    cudaFree(q);
    *current -= rounded;
  });
}

}  // namespace moelab
