// Logit softcap + cross-entropy, fused: one block per row writes the loss and the gradient (in
// place if asked); no softmax or capped logits are ever stored. The math is f32 whatever the
// logits. Rows of up to 128K logits (a multiple of 8, 16-byte aligned) are read from memory once:
// a cluster of blocks shares the row and each thread keeps its values in registers from the
// read to the gradient's store. Other rows take the scalar kernel, which reads the row three times.
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

// The register-resident kernel: a row is split over a cluster of `cs` blocks of 256 threads, each
// holding its part's values in registers from the one read to the gradient's store; the blocks
// trade their partial maximum, sum and target logit through distributed shared memory. Several
// blocks share an SM, from different rows, so one block's loads overlap another's math.
// CPT: 8-element chunks a thread; chunk c of the row is held by block c / (256 CPT), thread
// c % 256.
//
// The kernel is bound by its instructions, not by memory, so the softcap takes no division.
// With r = 1 / (1 + e^(2l/cap)): tanh(l/cap) = 1 - 2r, z = cap (1 - 2r), dz/dl = 1 - tanh² =
// 4r(1 - r), and z - cap = -2 cap r. Since z < cap, cap serves as the log-sum-exp's shift
// (kShiftByCap: for 0 < cap <= 40, past which e^(-2 cap) would underflow the sum): the maximum
// needs no exchange, and e^(z - cap) = e^(-2 cap r) comes from r without cancellation. Otherwise
// (no cap, or a large one) the row's maximum is traded and z kept.
constexpr int kClusterThreads = 256, kMaxCluster = 8;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory"); }
// The value at `slot` in the shared memory of cluster block `rank`.
__device__ __forceinline__ float cluster_read(const float* slot, int rank) {
  uint32_t local = static_cast<uint32_t>(__cvta_generic_to_shared(slot)), remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(local), "r"(rank));
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(remote) : "memory");
  return v;
}
// r = 1 / (1 + e^(2l/cap)), with k2 = 2 log2(e) / cap; 0 when the exponential overflows.
__device__ __forceinline__ float cap_r(float l, float k2) { return __frcp_rn(1.f + exp2f(l * k2)); }

template <class TL, class TD, int CPT, bool kShiftByCap>
__global__ void __launch_bounds__(kClusterThreads, CPT <= 4 ? 4 : 2)
    softcap_xent_cluster_kernel(const TL* logits, const int32_t* targets, int V, int cs, float cap, float grad_scale,
                                float* losses, TD* dlogits, unsigned* amax) {
  __shared__ float shm[32];
  __shared__ float trade[3];  // this block's maximum, sum of exponentials, target logit
  const int part = int(blockIdx.x % unsigned(cs));
  const int64_t row = blockIdx.x / unsigned(cs);
  const TL* lr = logits + row * V;
  TD* dr = dlogits + row * V;
  const int tgt = targets[row], chunks = V / 8, first = part * CPT * kClusterThreads;
  const bool ignored = tgt < 0 || tgt >= V;
  const bool has_cap = cap > 0.f;
  const float k2 = has_cap ? 2.f * kLog2e / cap : 0.f, inv_cap = has_cap ? 1.f / cap : 0.f;
  // v holds r (kShiftByCap) or z, then exp(z - m) dz/dl, the gradient's part that needs z.
  float v[CPT][8];
  float m = -INFINITY;
#pragma unroll
  for (int u = 0; u < CPT; ++u) {
    const int c = first + threadIdx.x + u * kClusterThreads;
    if (c >= chunks) continue;
    load8(lr + 8 * c, v[u]);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if constexpr (kShiftByCap) {
        v[u][k] = cap_r(v[u][k], k2);
      } else {
        if (has_cap) v[u][k] = cap * (1.f - 2.f * cap_r(v[u][k], k2));
        m = fmaxf(m, v[u][k]);
      }
    }
  }
  if constexpr (kShiftByCap) {
    m = cap;
  } else {
    m = block_max(m, shm);
    if (threadIdx.x == 0) trade[0] = m;
    cluster_arrive();
    cluster_wait();
    m = -INFINITY;
    for (int r = 0; r < cs; ++r) m = fmaxf(m, cluster_read(&trade[0], r));
  }
  // The target's holder keeps its z and dz/dl for the loss and the one-hot term.
  const float shift_k = -2.f * cap * kLog2e, m2 = m * kLog2e;
  float s = 0.f, zt = 0.f, dzdl_t = 0.f;
#pragma unroll
  for (int u = 0; u < CPT; ++u) {
    const int c = first + threadIdx.x + u * kClusterThreads;
    if (c >= chunks) continue;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      float e, dzdl, z;
      if constexpr (kShiftByCap) {
        const float r = v[u][k];
        e = exp2f(r * shift_k);
        dzdl = 4.f * r * (1.f - r);
        z = cap - 2.f * cap * r;
      } else {
        z = v[u][k];
        e = exp2f(fmaf(z, kLog2e, -m2));
        const float th = z * inv_cap;
        dzdl = has_cap ? 1.f - th * th : 1.f;
      }
      s += e;
      if (8 * c + k == tgt) zt = z, dzdl_t = dzdl;
      v[u][k] = e * dzdl;
    }
  }
  s = block_sum(s, shm);
  zt = block_sum(zt, shm);  // only the target's holder contributes
  if (threadIdx.x == 0) trade[1] = s, trade[2] = zt;
  cluster_arrive();
  cluster_wait();
  s = 0.f, zt = 0.f;
  for (int r = 0; r < cs; ++r) {  // in rank order: every block gets the same sum
    s += cluster_read(&trade[1], r);
    zt += cluster_read(&trade[2], r);
  }
  cluster_arrive();  // this block is done reading the others' shared memory (waited for at the end)
  if (part == 0 && threadIdx.x == 0) losses[row] = ignored ? 0.f : m + logf(s) - zt;
  const float g_s = grad_scale / s;
  float gmax = 0.f;
#pragma unroll
  for (int u = 0; u < CPT; ++u) {
    const int c = first + threadIdx.x + u * kClusterThreads;
    if (c >= chunks) continue;
    float g[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      g[k] = v[u][k] * g_s;
      if (8 * c + k == tgt) g[k] -= grad_scale * dzdl_t;
      if (ignored) g[k] = 0.f;
      if (amax) gmax = fmaxf(gmax, fabsf(g[k]));
    }
    store8(dr + 8 * c, g);
  }
  if (amax) raise_block_amax(amax, stored<TD>(gmax));  // uniform over the grid
  cluster_wait();  // no block leaves while another may still read its `trade`
}

template <class TL, class TD, int CPT>
void launch_xent_cluster(const TL* logits, const int32_t* targets, int64_t rows, int V, int cs, float cap,
                         float grad_scale, float* losses, TD* dlogits, unsigned* amax, cudaStream_t stream) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(unsigned(rows * cs));
  cfg.blockDim = dim3(kClusterThreads);
  cfg.stream = stream;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = unsigned(cs);
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  if (cap > 0.f && cap <= 40.f)
    MOELAB_CUDA_CHECK(cudaLaunchKernelEx(&cfg, softcap_xent_cluster_kernel<TL, TD, CPT, true>, logits, targets, V, cs,
                                         cap, grad_scale, losses, dlogits, amax));
  else
    MOELAB_CUDA_CHECK(cudaLaunchKernelEx(&cfg, softcap_xent_cluster_kernel<TL, TD, CPT, false>, logits, targets, V, cs,
                                         cap, grad_scale, losses, dlogits, amax));
}

}  // namespace

void CudaBackend::softcap_xent(const Tensor& logits, const Tensor& targets, float cap, float grad_scale,
                               Tensor& losses, Tensor& dlogits, const AmaxSink* amax) {
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
  // The register-resident kernel: a row of up to 256 CPT chunks takes one block with the fewest
  // chunks a thread (1, 2 or 4) that holds it; longer rows 4 chunks a thread over a cluster of up
  // to 8 blocks (rows up to 65,536 logits), then 8 (up to 131,072). Others take the scalar kernel.
  int cpt = 0, cs = 0;
  const int64_t chunks = V / 8;
  if (V % 8 == 0 && aligned16(logits.data) && aligned16(dlogits.data)) {
    for (int c : {1, 2, 4})
      if (chunks <= int64_t(c) * kClusterThreads) {
        cpt = c, cs = 1;
        break;
      }
    for (int c : {4, 8}) {
      const int64_t per_block = int64_t(c) * kClusterThreads;
      if (cpt == 0 && chunks <= per_block * kMaxCluster) cpt = c, cs = int((chunks + per_block - 1) / per_block);
    }
  }
#define MOELAB_XENT_CLUSTER(C)                                                                          \
  case C:                                                                                               \
    MOELAB_FLOAT_DISPATCH(logits.dtype, TL, MOELAB_FLOAT_DISPATCH(dlogits.dtype, TD,                     \
        launch_xent_cluster<TL, TD, C>(logits.as<TL>(), targets.as<int32_t>(), N, int(V), cs, cap, grad_scale, \
                                       losses.as<float>(), dlogits.as<TD>(), am, stream_)));            \
    am = nullptr; /* raised */                                                                          \
    break;
  switch (cpt) {
    MOELAB_XENT_CLUSTER(1)
    MOELAB_XENT_CLUSTER(2)
    MOELAB_XENT_CLUSTER(4)
    MOELAB_XENT_CLUSTER(8)
    default:
  MOELAB_FLOAT_DISPATCH(logits.dtype, TL, MOELAB_FLOAT_DISPATCH(dlogits.dtype, TD,
      softcap_xent_kernel<TL, TD><<<unsigned(N), kThreads, 0, stream_>>>(
          logits.as<TL>(), targets.as<int32_t>(), int(V), cap, grad_scale, losses.as<float>(), dlogits.as<TD>())));
  }
#undef MOELAB_XENT_CLUSTER
  MOELAB_CUDA_LAUNCH_CHECK("softcap_xent");
  if (am) raise_amax_by_pass(dlogits, amax->amax);  // the scalar kernel does not raise it
}

}  // namespace moelab
