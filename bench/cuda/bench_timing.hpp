// Median time of a piece of GPU work for the kernel benchmarks: `warmup` untimed calls, then
// `reps` calls each bracketed by CUDA events on `stream`, the median of those in milliseconds.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "backend/cuda/cuda_check.hpp"

namespace moelab {

template <class F>
double median_event_ms(cudaStream_t stream, F&& fn, int warmup = 5, int reps = 30) {
  for (int i = 0; i < warmup; ++i) fn();
  cudaEvent_t a, b;
  MOELAB_CUDA_CHECK(cudaEventCreate(&a));
  MOELAB_CUDA_CHECK(cudaEventCreate(&b));
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    MOELAB_CUDA_CHECK(cudaEventRecord(a, stream));
    fn();
    MOELAB_CUDA_CHECK(cudaEventRecord(b, stream));
    MOELAB_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    MOELAB_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace moelab
