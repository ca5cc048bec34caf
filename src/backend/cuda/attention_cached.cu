// Attention over a KV cache (Backend::attention_cached_fwd, incremental decoding): each block owns
// one query row, i.e. one (batch, head, new position), and reads the keys and values of its
// window from the cache. Decoding is one row per head, so there are no query tiles to share: the
// block's warps split the keys instead (warp w takes keys j0 + w, j0 + w + warps, ...), each
// keeps its own online softmax (running max m, sum l, accumulator o) in f32 over bf16 or f32
// inputs, and the warps' states are merged at the end by their maxima, so no score is stored and
// no exp overflows. Within a warp the lanes split the head dim and a key's score is a warp sum;
// keys go in groups of kKeysPerStep so their loads are in flight together.
#include <cmath>
#include <type_traits>

#include "backend/cuda/cuda_common.cuh"

namespace moelab {
using namespace cuda_detail;

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kKeysPerStep = 4;
constexpr float kLog2e = 1.4426950408889634f;

// q, out [B, Tq, Hq, HD]; k, v [B, S, Hkv, HD]. Query i sits at position t = S - Tq + i and sees
// keys max(0, t - window) .. t (window <= 0: all up to t).
template <int HD, class T>
__global__ void __launch_bounds__(kThreads) attn_cached_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                               const T* __restrict__ v, T* __restrict__ out, int Tq,
                                                               int S, int Hq, int Hkv, int window, float scale) {
  constexpr int E = (HD + 31) / 32;  // head-dim elements per lane: lane + 32 e
  __shared__ float warp_m[kWarps], warp_l[kWarps], warp_o[kWarps][HD];
  const int i = blockIdx.x, bh = blockIdx.y, b = bh / Hq, h = bh % Hq, g = h / (Hq / Hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t = S - Tq + i;
  const int j0 = window > 0 && t > window ? t - window : 0;

  // Scores in the log2 domain (exp2f), the softmax scale folded into q.
  const float sl2 = scale * kLog2e;
  const T* qrow = q + ((int64_t(b) * Tq + i) * Hq + h) * HD;
  float qr[E], o[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int c = lane + 32 * e;
    qr[e] = c < HD ? to_f32(qrow[c]) * sl2 : 0.f;
    o[e] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  const int64_t kv_stride = int64_t(Hkv) * HD;  // one position of the cache
  const T* kbase = k + (int64_t(b) * S * Hkv + g) * HD;
  const T* vbase = v + (int64_t(b) * S * Hkv + g) * HD;
  for (int jb = j0 + warp * kKeysPerStep; jb <= t; jb += kWarps * kKeysPerStep) {
    float kr[kKeysPerStep][E], vr[kKeysPerStep][E], s[kKeysPerStep];
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) {
      const int j = jb + u;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int c = lane + 32 * e;
        const bool in = j <= t && c < HD;
        kr[u][e] = in ? to_f32(kbase[j * kv_stride + c]) : 0.f;
        vr[u][e] = in ? to_f32(vbase[j * kv_stride + c]) : 0.f;
      }
    }
    float step_max = -INFINITY;
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) {
      float d = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) d += qr[e] * kr[u][e];
      d = warp_sum(d);
      s[u] = jb + u <= t ? d : -INFINITY;  // past the query: no weight
      step_max = fmaxf(step_max, s[u]);
    }
    // The group's first key is always visible, so step_max is finite and so is the new max.
    const float mn = fmaxf(m, step_max), corr = exp2f(m - mn);
    l *= corr;
#pragma unroll
    for (int e = 0; e < E; ++e) o[e] *= corr;
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) {
      const float p = exp2f(s[u] - mn);
      l += p;
#pragma unroll
      for (int e = 0; e < E; ++e) o[e] += p * vr[u][e];
    }
    m = mn;
  }

  // Merge the warps: a warp that saw no key has m = -inf and l = o = 0, and weighs 0.
  if (lane == 0) warp_m[warp] = m, warp_l[warp] = l;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int c = lane + 32 * e;
    if (c < HD) warp_o[warp][c] = o[e];
  }
  __syncthreads();
  float M = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) M = fmaxf(M, warp_m[w]);
  float L = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) L += warp_l[w] * exp2f(warp_m[w] - M);
  T* orow = out + ((int64_t(b) * Tq + i) * Hq + h) * HD;
  for (int c = threadIdx.x; c < HD; c += kThreads) {
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) acc += warp_o[w][c] * exp2f(warp_m[w] - M);
    orow[c] = from_f32<T>(acc / L);
  }
}

}  // namespace

void CudaBackend::attention_cached_fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, int window) {
  const char* op = "attention_cached_fwd";
  auto check = [&](const Tensor& t, const char* name) {
    require_cuda(t, op, name);
    require_float(t, op, name);
    require(t.ndim() == 4, op, std::string(name) + " must be [B, T, H, hd], got " + t.describe());
  };
  check(q, "q");
  check(k, "k");
  check(v, "v");
  check(out, "out");
  require(k.dtype == q.dtype && v.dtype == q.dtype && out.dtype == q.dtype, op, "q, k, v and out must share one dtype");
  const int B = int(q.dim(0)), Tq = int(q.dim(1)), Hq = int(q.dim(2)), hd = int(q.dim(3));
  const int S = int(k.dim(1)), Hkv = int(k.dim(2));
  require(out.shape == q.shape, op, "out " + out.describe() + " must match q " + q.describe());
  require(k.shape == v.shape && k.dim(0) == B && k.dim(3) == hd, op,
          "k " + k.describe() + " and v " + v.describe() + " must be [B, S, Hkv, head_dim] of q " + q.describe());
  require(S >= Tq, op, "the cache's " + std::to_string(S) + " positions must include the " + std::to_string(Tq) + " queries");
  require(Hkv > 0 && Hq % Hkv == 0, op,
          "query heads " + std::to_string(Hq) + " must be a multiple of kv heads " + std::to_string(Hkv));
  require(hd == 16 || hd == 32 || hd == 64 || hd == 96 || hd == 128 || hd == 256, op,
          "head_dim must be 16, 32, 64, 96, 128 or 256, got " + std::to_string(hd));
  if (q.numel() == 0) return;
  const dim3 grid(unsigned(Tq), unsigned(B * Hq));
  const float scale = 1.f / std::sqrt(float(hd));
  MOELAB_FLOAT_DISPATCH(q.dtype, T, {
    auto launch = [&](auto hd_tag) {
      constexpr int HD = decltype(hd_tag)::value;
      attn_cached_kernel<HD, T><<<grid, kThreads, 0, stream_>>>(q.as<T>(), k.as<T>(), v.as<T>(), out.as<T>(), Tq, S,
                                                               Hq, Hkv, window, scale);
    };
    switch (hd) {
      case 16: launch(std::integral_constant<int, 16>{}); break;
      case 32: launch(std::integral_constant<int, 32>{}); break;
      case 64: launch(std::integral_constant<int, 64>{}); break;
      case 96: launch(std::integral_constant<int, 96>{}); break;
      case 128: launch(std::integral_constant<int, 128>{}); break;
      default: launch(std::integral_constant<int, 256>{}); break;
    }
  });
  MOELAB_CUDA_LAUNCH_CHECK("attention_cached_fwd");
}

}  // namespace moelab
