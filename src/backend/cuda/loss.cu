// Logit softcap + cross-entropy, fused: one block per row reads the logits twice (statistics,
// then gradient) and writes the loss and the gradient in place if asked; no softmax or capped
// logits are ever stored. The math is f32 whatever the logits' storage type.
#include "backend/cuda/cuda_common.cuh"

namespace moelab {
using namespace cuda_detail;

namespace {

constexpr int kThreads = 512;

__device__ __forceinline__ float capped(float l, float cap) { return cap > 0.f ? cap * tanhf(l / cap) : l; }

template <class TL, class TD>
__global__ void softcap_xent_kernel(const TL* logits, const int32_t* targets, int V, float cap, float grad_scale,
                                    float* losses, TD* dlogits) {
  __shared__ float shm[32];
  int64_t row = blockIdx.x;
  const TL* lr = logits + row * V;
  TD* dr = dlogits + row * V;
  int tgt = targets[row];
  bool ignored = tgt < 0 || tgt >= V;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < V; i += blockDim.x) m = fmaxf(m, capped(to_f32(lr[i]), cap));
  m = block_max(m, shm);
  float s = 0.f;
  for (int i = threadIdx.x; i < V; i += blockDim.x) s += __expf(capped(to_f32(lr[i]), cap) - m);
  s = block_sum(s, shm);
  float zt = ignored ? 0.f : capped(to_f32(lr[tgt]), cap);
  float lse = m + logf(s);
  __syncthreads();  // every thread has read lr[tgt] before any gradient overwrites it (aliasing)
  if (threadIdx.x == 0) losses[row] = ignored ? 0.f : lse - zt;
  float inv_s = 1.f / s;
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    if (ignored) {
      dr[i] = from_f32<TD>(0.f);
      continue;
    }
    float l = to_f32(lr[i]);
    float z = capped(l, cap);
    float p = __expf(z - m) * inv_s;
    float dz = p - (i == tgt ? 1.f : 0.f);
    float dzdl = 1.f;
    if (cap > 0.f) {
      float th = z / cap;
      dzdl = 1.f - th * th;
    }
    dr[i] = from_f32<TD>(grad_scale * dz * dzdl);
  }
}

}  // namespace

void CudaBackend::softcap_xent(const Tensor& logits, const Tensor& targets, float cap, float grad_scale,
                               Tensor& losses, Tensor& dlogits) {
  require_float(logits, "softcap_xent", "logits");
  require_float(dlogits, "softcap_xent", "dlogits");
  require_dtype(targets, DType::i32, "softcap_xent", "targets");
  require_dtype(losses, DType::f32, "softcap_xent", "losses");
  int64_t N = logits.rows(), V = logits.cols();
  require(targets.numel() == N && losses.numel() == N && dlogits.numel() == logits.numel(), "softcap_xent",
          "targets/losses must have one entry per row of " + logits.describe());
  require(logits.data != dlogits.data || logits.dtype == dlogits.dtype, "softcap_xent",
          "aliased logits and dlogits must share one dtype");
  if (N == 0) return;
  MOELAB_FLOAT_DISPATCH(logits.dtype, TL, MOELAB_FLOAT_DISPATCH(dlogits.dtype, TD,
      softcap_xent_kernel<TL, TD><<<unsigned(N), kThreads, 0, stream_>>>(
          logits.as<TL>(), targets.as<int32_t>(), int(V), cap, grad_scale, losses.as<float>(), dlogits.as<TD>())));
  MOELAB_CUDA_LAUNCH_CHECK("softcap_xent");
}

}  // namespace moelab
