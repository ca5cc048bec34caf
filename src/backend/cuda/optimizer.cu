// Optimizer kernels: fused AdamW (one pass over parameter, gradient and both moments), Muon's
// momentum + Nesterov blend (one pass, writing the bf16 input of Newton-Schulz), and the
// Frobenius normalization that starts Muon's Newton-Schulz iteration, of one matrix or of each
// matrix of a stack. Norms are reduced on the device into scratch and read there by the scaling
// kernel, so no value returns to the host; partial sums are combined in a fixed order, so the
// result does not depend on scheduling.
#include <algorithm>
#include <cmath>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/expert_amax.cuh"

namespace moelab {
using namespace cuda_detail;

namespace {

// One AdamW step's constants (bias corrections included) and the update of one element, shared
// by the kernels below so the formula is written once.
struct AdamWConsts {
  float lr, b1, b2, eps, wd, bc1, bc2;
};
__device__ __forceinline__ void adamw_element(float& p, float g, float& m, float& v, const AdamWConsts& k) {
  m = k.b1 * m + (1.f - k.b1) * g;
  v = k.b2 * v + (1.f - k.b2) * g * g;
  const float denom = sqrtf(v / k.bc2) + k.eps;
  p = p * (1.f - k.lr * k.wd) - k.lr * (m / k.bc1) / denom;
}

// Any size or alignment, one element at a time.
template <class TG>
__global__ void adamw_kernel(float* p, const TG* g, float* m, float* v, int64_t n, AdamWConsts k) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float pi = p[i], mi = m[i], vi = v[i];
    adamw_element(pi, to_f32(g[i]), mi, vi, k);
    p[i] = pi, m[i] = mi, v[i] = vi;
  }
}

// 8 elements a thread at a time (16-byte aligned, n a multiple of 8), each block walking a
// contiguous range. With kAmax it raises each of G equal parts' amax of the new weights (f32
// bits; the parts are multiples of 8): a thread's chunks change part rarely, and the block
// gathers its maxima in shared memory (up to kSharedExperts parts, else global atomics) and
// raises each once. The pointers are restrict so the loads need not wait on the maxima's atomics.
template <class TG, bool kAmax>
__global__ void adamw_vec_kernel(float* __restrict__ p, const TG* __restrict__ g, float* __restrict__ m,
                                 float* __restrict__ v, int64_t n8, AdamWConsts k, unsigned* __restrict__ amax,
                                 int64_t part8, int G) {
  __shared__ unsigned s_amax[kAmax ? kSharedExperts : 1];
  const bool in_shared = kAmax && G <= kSharedExperts;
  if (in_shared) {
    for (int i = threadIdx.x; i < G; i += blockDim.x) s_amax[i] = 0;
    __syncthreads();
  }
  unsigned* maxima = in_shared ? s_amax : amax;
  const ChunkRange range = block_chunks(n8);
  int cur = -1;
  int64_t cur_end = 0;
  float cm = 0.f;
  for (int64_t c = range.begin + threadIdx.x; c < range.end; c += blockDim.x) {
    float pv[8], gv[8], mv[8], vv[8];
    load8(p + 8 * c, pv);
    load8(g + 8 * c, gv);
    load8(m + 8 * c, mv);
    load8(v + 8 * c, vv);
    float chunk_max = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      adamw_element(pv[e], gv[e], mv[e], vv[e], k);
      chunk_max = fmaxf(chunk_max, fabsf(pv[e]));
    }
    store8(p + 8 * c, pv);
    store8(m + 8 * c, mv);
    store8(v + 8 * c, vv);
    if constexpr (kAmax) {
      if (c >= cur_end) {  // into the next part (c only grows)
        if (cur >= 0) raise_amax(maxima + cur, cm);
        cur = int(c / part8);
        cur_end = (int64_t(cur) + 1) * part8;
        cm = 0.f;
      }
      cm = fmaxf(cm, chunk_max);
    }
  }
  if constexpr (kAmax) {
    if (cur >= 0) raise_amax(maxima + cur, cm);
    if (!in_shared) return;
    __syncthreads();
    for (int i = threadIdx.x; i < G; i += blockDim.x)
      if (s_amax[i]) atomicMax(amax + i, s_amax[i]);
  }
}

// Each part's amax of x, element by element (adamw_update's fallback for uneven parts).
__global__ void raise_parts_amax_kernel(const float* x, int64_t n, int64_t part, unsigned* amax) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    raise_amax(amax + i / part, fabsf(x[i]));
}

// Muon's momentum and Nesterov blend; W = 8 moves 8 elements per access where aligned.
template <int W, class TU>
__global__ void muon_momentum_kernel(const float* g, float* b, TU* u, int64_t n_w, float mu, bool nesterov) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n_w; i += int64_t(gridDim.x) * blockDim.x) {
    float gv[W], bv[W], uv[W];
    load_w<W>(g + W * i, gv);
    load_w<W>(b + W * i, bv);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      bv[k] = (1.f - mu) * gv[k] + mu * bv[k];
      uv[k] = nesterov ? mu * bv[k] + (1.f - mu) * gv[k] : bv[k];
    }
    store_w<W>(b + W * i, bv);
    store_w<W>(u + W * i, uv);
  }
}

template <class TX, class TY>
__global__ void scale_by_norm_kernel(const TX* x, TY* y, int64_t n, const float* sumsq, float eps) {
  float s = 1.f / (sqrtf(sumsq[0]) + eps);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = from_f32<TY>(to_f32(x[i]) * s);
}

// Stack normalization, pass 1: block (b, g) sums the squares of its grid-stride share of slice g.
template <class TX>
__global__ void slice_sumsq_kernel(const TX* x, int64_t per, float* partials) {
  __shared__ float shm[32];
  const TX* xs = x + int64_t(blockIdx.y) * per;
  float s = 0.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < per; i += int64_t(gridDim.x) * blockDim.x) {
    float v = to_f32(xs[i]);
    s += v * v;
  }
  s = block_sum(s, shm);
  if (threadIdx.x == 0) partials[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = s;
}

// Pass 2: every block of slice g sums that slice's `parts` partials itself (a few dozen floats,
// cheaper than a third kernel) and scales its share of the slice.
template <class TX, class TY>
__global__ void slice_scale_kernel(const TX* x, TY* y, int64_t per, const float* partials, int parts, float eps) {
  __shared__ float shm[32];
  const float* pg = partials + int64_t(blockIdx.y) * parts;
  float p = 0.f;
  for (int i = threadIdx.x; i < parts; i += blockDim.x) p += pg[i];
  const float s = 1.f / (sqrtf(block_sum(p, shm)) + eps);
  const TX* xs = x + int64_t(blockIdx.y) * per;
  TY* ys = y + int64_t(blockIdx.y) * per;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < per; i += int64_t(gridDim.x) * blockDim.x)
    ys[i] = from_f32<TY>(to_f32(xs[i]) * s);
}

}  // namespace

void CudaBackend::adamw_update(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWStep& s,
                               const AmaxSink* amax_sink) {
  require(!amax_sink || !amax_sink->per_expert(), "adamw_update",
          "amax must be an AmaxSink of parts (no offsets): the param's elements split evenly");
  const Tensor* parts_amax = amax_sink ? &amax_sink->amax : nullptr;
  require_dtype(param, DType::f32, "adamw_update", "param");
  require_dtype(m, DType::f32, "adamw_update", "m");
  require_dtype(v, DType::f32, "adamw_update", "v");
  require_float(grad, "adamw_update", "grad");
  int64_t n = param.numel();
  require(grad.numel() == n && m.numel() == n && v.numel() == n, "adamw_update",
          "param, grad, m, v must have one element count: " + param.describe() + ", " + grad.describe());
  if (n == 0) return;
  const AdamWConsts k{s.lr,
                      s.beta1,
                      s.beta2,
                      s.eps,
                      s.weight_decay,
                      float(1.0 - std::pow(double(s.beta1), double(s.step))),
                      float(1.0 - std::pow(double(s.beta2), double(s.step)))};
  int64_t part = n;
  if (parts_amax) {
    require_dtype(*parts_amax, DType::f32, "adamw_update", "amax");
    const int64_t G = parts_amax->numel();
    require(G > 0 && n % G == 0 && G <= INT32_MAX, "adamw_update",
            "amax " + parts_amax->describe() + " must split " + param.describe() + " evenly");
    part = n / G;
  }
  const bool vec = part % 8 == 0 && aligned16(param.data) && aligned16(grad.data) && aligned16(m.data) &&
                   aligned16(v.data);
  if (vec) {
    const unsigned blocks = grid_for(n / 8, 256, 132 * 16);
    unsigned* amax = parts_amax ? parts_amax->as<unsigned>() : nullptr;
    const int G = parts_amax ? int(parts_amax->numel()) : 0;
    MOELAB_FLOAT_DISPATCH(grad.dtype, TG, {
      if (amax)
        adamw_vec_kernel<TG, true><<<blocks, 256, 0, stream_>>>(param.as<float>(), grad.as<TG>(), m.as<float>(),
                                                                v.as<float>(), n / 8, k, amax, part / 8, G);
      else
        adamw_vec_kernel<TG, false><<<blocks, 256, 0, stream_>>>(param.as<float>(), grad.as<TG>(), m.as<float>(),
                                                                 v.as<float>(), n / 8, k, nullptr, part / 8, 0);
    });
    MOELAB_CUDA_LAUNCH_CHECK("adamw");
    return;
  }
  const unsigned nb = grid_for(n, 256, 132 * 16);
  MOELAB_FLOAT_DISPATCH(grad.dtype, TG,
      adamw_kernel<TG><<<nb, 256, 0, stream_>>>(param.as<float>(), grad.as<TG>(), m.as<float>(), v.as<float>(), n, k));
  MOELAB_CUDA_LAUNCH_CHECK("adamw");
  if (parts_amax) {  // parts that are not whole aligned 8-element chunks (no FP8 weight's): a pass
    raise_parts_amax_kernel<<<nb, 256, 0, stream_>>>(param.as<float>(), n, part, parts_amax->as<unsigned>());
    MOELAB_CUDA_LAUNCH_CHECK("adamw parts amax");
  }
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

void CudaBackend::muon_momentum(const Tensor& grad, Tensor& momentum, Tensor& update, float mu, bool nesterov) {
  require_dtype(grad, DType::f32, "muon_momentum", "grad");
  require_dtype(momentum, DType::f32, "muon_momentum", "momentum");
  require_float(update, "muon_momentum", "update");
  const int64_t n = momentum.numel();
  require(grad.numel() == n && update.numel() == n, "muon_momentum",
          "grad " + grad.describe() + ", momentum " + momentum.describe() + ", update " + update.describe() +
              " must have one element count");
  if (n == 0) return;
  const bool vec = n % 8 == 0 && aligned16(grad.data) && aligned16(momentum.data) && aligned16(update.data);
  const int64_t n_w = vec ? n / 8 : n;
  const unsigned nb = grid_for(n_w, 256, 132 * 16);
  MOELAB_FLOAT_DISPATCH(update.dtype, TU, {
    if (vec)
      muon_momentum_kernel<8, TU><<<nb, 256, 0, stream_>>>(grad.as<float>(), momentum.as<float>(), update.as<TU>(), n_w,
                                                           mu, nesterov);
    else
      muon_momentum_kernel<1, TU><<<nb, 256, 0, stream_>>>(grad.as<float>(), momentum.as<float>(), update.as<TU>(), n_w,
                                                           mu, nesterov);
  });
  MOELAB_CUDA_LAUNCH_CHECK("muon_momentum");
}

void CudaBackend::frobenius_normalize_batched(const Tensor& x, Tensor& y, float eps) {
  require_float(x, "frobenius_normalize_batched", "x");
  require_float(y, "frobenius_normalize_batched", "y");
  require(x.ndim() >= 1 && x.shape == y.shape, "frobenius_normalize_batched",
          "x " + x.describe() + " and y " + y.describe() + " need one shape [G, ...]");
  const int64_t groups = x.dim(0), per = groups > 0 ? x.numel() / groups : 0;
  if (per == 0) return;
  require(groups <= 65535, "frobenius_normalize_batched", "at most 65535 slices, got " + x.describe());
  constexpr int kThreads = 256;
  // Partials per slice: enough blocks to fill the GPU, but G * parts stays within the 1024 floats
  // the reduce slot already holds for the other reductions (so it never grows for this op).
  const int64_t want = (per + kThreads * 16 - 1) / (kThreads * 16);
  const int parts = int(std::max<int64_t>(1, std::min<int64_t>(want, 1024 / groups)));
  auto* partials = static_cast<float*>(scratch(ScratchSlot::reduce, size_t(std::max<int64_t>(groups * parts, 1024 + 32)) * sizeof(float)));
  MOELAB_FLOAT_DISPATCH(x.dtype, TX,
      slice_sumsq_kernel<TX><<<dim3(unsigned(parts), unsigned(groups)), kThreads, 0, stream_>>>(x.as<TX>(), per, partials));
  MOELAB_CUDA_LAUNCH_CHECK("slice_sumsq");
  const unsigned nb = unsigned(std::min<int64_t>((per + kThreads * 8 - 1) / (kThreads * 8), 256));
  MOELAB_FLOAT_DISPATCH(x.dtype, TX, MOELAB_FLOAT_DISPATCH(y.dtype, TY,
      slice_scale_kernel<TX, TY><<<dim3(nb, unsigned(groups)), kThreads, 0, stream_>>>(x.as<TX>(), y.as<TY>(), per,
                                                                                       partials, parts, eps)));
  MOELAB_CUDA_LAUNCH_CHECK("frobenius_normalize_batched");
}

}  // namespace moelab
