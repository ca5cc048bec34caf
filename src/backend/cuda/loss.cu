// Logit softcap + cross-entropy, fused: one block per row writes the loss and the gradient (in
// place if asked); no softmax or capped logits are ever stored. The math is f32 whatever the
// logits. Rows of up to 32K logits (a multiple of 8, 16-byte aligned) are read
// from memory once: each thread keeps its capped logits in registers through the max, the sum
// and the gradient. Other rows take the scalar kernel, which reads the row three times.
#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/expert_amax.cuh"

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

constexpr int kVecThreads = 1024;

// cap * tanh(l / cap) through one exp and one reciprocal: tanh(y) = 1 - 2 / (1 + e^(2y)). Its
// absolute error (~1e-7, saturating cleanly to +-1) is what the loss needs; tanhf's accuracy
// near 0 costs several times the instructions in a kernel that runs on every logit.
__device__ __forceinline__ float capped_fast(float l, float cap) {
  return cap > 0.f ? cap * (1.f - 2.f / (1.f + __expf(2.f * l / cap))) : l;
}

// CPT: 8-element chunks per thread; chunk c of the row is held by thread c % 1024. With amax,
// the block raises it to the largest |gradient| written.
template <class TL, class TD, int CPT>
__global__ void __launch_bounds__(kVecThreads, 1)
    softcap_xent_vec_kernel(const TL* logits, const int32_t* targets, int V, float cap, float grad_scale,
                            float* losses, TD* dlogits, unsigned* amax) {
  __shared__ float shm[32];
  const int64_t row = blockIdx.x;
  const TL* lr = logits + row * V;
  TD* dr = dlogits + row * V;
  const int tgt = targets[row], chunks = V / 8;
  const bool ignored = tgt < 0 || tgt >= V;
  float z[CPT][8];
  float m = -INFINITY;
#pragma unroll
  for (int u = 0; u < CPT; ++u) {
    const int c = threadIdx.x + u * kVecThreads;
    if (c >= chunks) continue;
    load8(lr + 8 * c, z[u]);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      z[u][k] = capped_fast(z[u][k], cap);
      m = fmaxf(m, z[u][k]);
    }
  }
  // Every thread has its logits in registers after this barrier, so writing the gradient over
  // the logits (aliased buffers) below is safe.
  m = block_max(m, shm);
  float s = 0.f, zt = 0.f;
#pragma unroll
  for (int u = 0; u < CPT; ++u) {
    const int c = threadIdx.x + u * kVecThreads;
    if (c >= chunks) continue;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      s += __expf(z[u][k] - m);
      if (8 * c + k == tgt) zt = z[u][k];
    }
  }
  s = block_sum(s, shm);
  zt = block_sum(zt, shm);  // only the target's holder contributes
  if (threadIdx.x == 0) losses[row] = ignored ? 0.f : m + logf(s) - zt;
  const float inv_s = 1.f / s;
  float gmax = 0.f;
#pragma unroll
  for (int u = 0; u < CPT; ++u) {
    const int c = threadIdx.x + u * kVecThreads;
    if (c >= chunks) continue;
    float g[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float p = __expf(z[u][k] - m) * inv_s;
      const float dz = p - (8 * c + k == tgt ? 1.f : 0.f);
      float dzdl = 1.f;
      if (cap > 0.f) {
        const float th = z[u][k] / cap;
        dzdl = 1.f - th * th;
      }
      g[k] = ignored ? 0.f : grad_scale * dz * dzdl;
      if (amax) gmax = fmaxf(gmax, fabsf(g[k]));
    }
    store8(dr + 8 * c, g);
  }
  if (amax) raise_block_amax(amax, stored<TD>(gmax));  // uniform over the grid
}

}  // namespace

void CudaBackend::softcap_xent(const Tensor& logits, const Tensor& targets, float cap, float grad_scale,
                               Tensor& losses, Tensor& dlogits, const Tensor* amax) {
  unsigned* am = tensor_amax_arg(amax, "softcap_xent");
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
  // Chunks per thread for the register-resident kernel, rounded up to an instantiated count.
  int cpt = 0;
  if (V % 8 == 0 && aligned16(logits.data) && aligned16(dlogits.data))
    for (int c : {1, 2, 4})
      if (int64_t(c) * 8 * kVecThreads >= V) {
        cpt = c;
        break;
      }
  const unsigned rows = unsigned(N);
#define MOELAB_XENT_VEC(C)                                                                                \
  case C:                                                                                                 \
    MOELAB_FLOAT_DISPATCH(logits.dtype, TL, MOELAB_FLOAT_DISPATCH(dlogits.dtype, TD,                       \
        softcap_xent_vec_kernel<TL, TD, C><<<rows, kVecThreads, 0, stream_>>>(                            \
            logits.as<TL>(), targets.as<int32_t>(), int(V), cap, grad_scale, losses.as<float>(), dlogits.as<TD>(), \
            am)));                                                                                        \
    am = nullptr; /* raised */                                                                            \
    break;
  switch (cpt) {
    MOELAB_XENT_VEC(1)
    MOELAB_XENT_VEC(2)
    MOELAB_XENT_VEC(4)
    default:
  MOELAB_FLOAT_DISPATCH(logits.dtype, TL, MOELAB_FLOAT_DISPATCH(dlogits.dtype, TD,
      softcap_xent_kernel<TL, TD><<<unsigned(N), kThreads, 0, stream_>>>(
          logits.as<TL>(), targets.as<int32_t>(), int(V), cap, grad_scale, losses.as<float>(), dlogits.as<TD>())));
  }
#undef MOELAB_XENT_VEC
  MOELAB_CUDA_LAUNCH_CHECK("softcap_xent");
  if (am) raise_amax_by_pass(dlogits, *amax);  // the scalar kernel does not raise it
}

}  // namespace moelab
