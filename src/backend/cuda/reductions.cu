// Whole-tensor reductions (sum, sum of squares) into a one-element f32 tensor. Deterministic:
// a fixed grid writes per-block partials to scratch, then one block adds them in a fixed order,
// so the result does not depend on scheduling (no atomics) and nothing is read back to the host.
#include "backend/cuda/cuda_common.cuh"

namespace moelab {
using namespace cuda_detail;

namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;

template <class T, bool Squares>
__global__ void partial_sum_kernel(const T* x, int64_t n, float* partials) {
  __shared__ float shm[32];
  float acc = 0.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float v = to_f32(x[i]);
    acc += Squares ? v * v : v;
  }
  acc = block_sum(acc, shm);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

__global__ void final_sum_kernel(const float* partials, int count, float scale, float* out, bool accumulate) {
  __shared__ float shm[32];
  float acc = 0.f;
  for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
  acc = block_sum(acc, shm) * scale;
  if (threadIdx.x == 0) out[0] = accumulate ? out[0] + acc : acc;
}

}  // namespace

void CudaBackend::reduce_sum(const Tensor& x, bool squares, Tensor& out, bool accumulate, float scale) {
  require_float(x, "sum", "x");
  require_dtype(out, DType::f32, "sum", "out");
  require(out.numel() >= 1, "sum", "out must hold one element");
  int64_t n = x.numel();
  int nb = int(std::min<int64_t>(kMaxBlocks, std::max<int64_t>(1, (n + kThreads - 1) / kThreads)));
  auto* partials = static_cast<float*>(scratch(ScratchSlot::reduce, (kMaxBlocks + 32) * sizeof(float)));
  if (squares) {
    MOELAB_FLOAT_DISPATCH(x.dtype, T, partial_sum_kernel<T, true><<<nb, kThreads, 0, stream_>>>(x.as<T>(), n, partials));
  } else {
    MOELAB_FLOAT_DISPATCH(x.dtype, T, partial_sum_kernel<T, false><<<nb, kThreads, 0, stream_>>>(x.as<T>(), n, partials));
  }
  MOELAB_CUDA_LAUNCH_CHECK("partial_sum");
  final_sum_kernel<<<1, 1024, 0, stream_>>>(partials, nb, scale, out.as<float>(), accumulate);
  MOELAB_CUDA_LAUNCH_CHECK("final_sum");
}

void CudaBackend::sum(const Tensor& x, Tensor& out, bool accumulate) { reduce_sum(x, false, out, accumulate); }
void CudaBackend::sum_squares(const Tensor& x, Tensor& out, bool accumulate) { reduce_sum(x, true, out, accumulate); }

}  // namespace moelab
