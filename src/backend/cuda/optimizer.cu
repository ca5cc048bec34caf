// Optimizer kernels: fused AdamW (one pass over parameter, gradient and both moments) and the
// Frobenius normalization that starts Muon's Newton-Schulz iteration. The norm is reduced on the
// device into scratch and read there by the scaling kernel, so no value returns to the host.
#include <cmath>

#include "backend/cuda/cuda_common.cuh"

namespace moelab {
using namespace cuda_detail;

namespace {

template <class TG>
__global__ void adamw_kernel(float* p, const TG* g, float* m, float* v, int64_t n, float lr, float b1,
                             float b2, float eps, float wd, float bc1, float bc2) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float gi = to_f32(g[i]);
    float mi = b1 * m[i] + (1.f - b1) * gi;
    float vi = b2 * v[i] + (1.f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    float pi = p[i] * (1.f - lr * wd);
    float denom = sqrtf(vi / bc2) + eps;
    p[i] = pi - lr * (mi / bc1) / denom;
  }
}

template <class TX, class TY>
__global__ void scale_by_norm_kernel(const TX* x, TY* y, int64_t n, const float* sumsq, float eps) {
  float s = 1.f / (sqrtf(sumsq[0]) + eps);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = from_f32<TY>(to_f32(x[i]) * s);
}

}  // namespace

void CudaBackend::adamw_update(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWStep& s) {
  require_dtype(param, DType::f32, "adamw_update", "param");
  require_dtype(m, DType::f32, "adamw_update", "m");
  require_dtype(v, DType::f32, "adamw_update", "v");
  require_float(grad, "adamw_update", "grad");
  int64_t n = param.numel();
  require(grad.numel() == n && m.numel() == n && v.numel() == n, "adamw_update",
          "param, grad, m, v must have one element count: " + param.describe() + ", " + grad.describe());
  if (n == 0) return;
  float bc1 = float(1.0 - std::pow(double(s.beta1), double(s.step)));
  float bc2 = float(1.0 - std::pow(double(s.beta2), double(s.step)));
  unsigned nb = grid_for(n, 256, 132 * 16);
  MOELAB_FLOAT_DISPATCH(grad.dtype, TG,
      adamw_kernel<TG><<<nb, 256, 0, stream_>>>(param.as<float>(), grad.as<TG>(), m.as<float>(), v.as<float>(), n,
                                                s.lr, s.beta1, s.beta2, s.eps, s.weight_decay, bc1, bc2));
  MOELAB_CUDA_LAUNCH_CHECK("adamw");
}

void CudaBackend::frobenius_normalize(const Tensor& x, Tensor& y, float eps) {
  require_float(x, "frobenius_normalize", "x");
  require_float(y, "frobenius_normalize", "y");
  require(x.numel() == y.numel(), "frobenius_normalize", "x and y differ in size");
  int64_t n = x.numel();
  if (n == 0) return;
  // The reduce slot holds 1024 partials then room for results; the norm goes at index 1024.
  auto* base = static_cast<float*>(scratch(ScratchSlot::reduce, (1024 + 32) * sizeof(float)));
  Tensor sumsq;
  sumsq.data = base + 1024;
  sumsq.dtype = DType::f32;
  sumsq.device = Device::cuda;
  sumsq.shape = {1};
  reduce_sum(x, true, sumsq, false);
  unsigned nb = grid_for(n, 256, 132 * 16);
  MOELAB_FLOAT_DISPATCH(x.dtype, TX, MOELAB_FLOAT_DISPATCH(y.dtype, TY,
      scale_by_norm_kernel<TX, TY><<<nb, 256, 0, stream_>>>(x.as<TX>(), y.as<TY>(), n, sumsq.as<float>(), eps)));
  MOELAB_CUDA_LAUNCH_CHECK("frobenius_normalize");
}

}  // namespace moelab
