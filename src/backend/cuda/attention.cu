// Causal self-attention (grouped-query, optional sliding window): the entry points, which route
// bf16 at head dim 64 and 128 to cuDNN's fused engine (cudnn_attention.cpp) where it plans the
// shape and to the own tensor-core kernels (flash_attention.cu) otherwise, and generic flash-style
// kernels for the rest: f32 inputs and head dims 16, 32, 96, 256 (correct, not fast; training
// refuses those head dims on the GPU, see train/device_select.cpp). Scores are computed tile by tile with an
// online softmax and never stored; the backward recomputes them from q, k and the saved
// log-sum-exp. Each query (forward, dq) or key (dk, dv) row is owned by a pair of threads that
// split the head dimension, so the per-row state (q, accumulators) fits in registers; K/V (or
// Q/dO) tiles of 64 rows are staged in shared memory as f32. dK/dV loop over the query heads of
// their kv group, so no atomics are needed and results are deterministic.
#include <cmath>
#include <cstdio>
#include <mutex>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/cudnn_attention.hpp"
#include "backend/cuda/flash_attention.cuh"

namespace moelab {
using namespace cuda_detail;

namespace {

constexpr int kRows = 64;           // query (or key) rows per block
constexpr int kThreads = 2 * kRows;  // two threads per row
constexpr float kLog2e = 1.4426950408889634f;
// Rows of K/V (or Q/dO) staged per tile: two f32 tiles stay within 48 KiB of static shared memory.
template <int HD> constexpr int kTile = HD <= 64 ? 64 : HD <= 128 ? 32 : 16;
// Window as a span: query t sees keys t - W .. t (W = T: full causal).
inline int span_of(int window, int T) { return window > 0 && window < T ? window : T; }

// Loads rows [r0, r0 + kTile) of a [B, T, H, hd] tensor's head h into tile[kTile][HD] (f32);
// rows past T are zero.
template <int HD, class T>
__device__ __forceinline__ void load_rows(float* tile, const T* base, int b, int r0, int h, int Tn, int H) {
  for (int q = threadIdx.x; q < kTile<HD> * HD; q += blockDim.x) {
    int r = q / HD, c = q % HD, t = r0 + r;
    tile[q] = t < Tn ? to_f32(base[((int64_t(b) * Tn + t) * H + h) * HD + c]) : 0.f;
  }
}

template <int HD, class T>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(const T* q, const T* k, const T* v, T* out, float* lse,
                                                           int Tn, int Hq, int Hkv, int W, float scale) {
  constexpr int P = HD / 2;
  __shared__ float ks[kTile<HD> * HD], vs[kTile<HD> * HD];
  const int bh = blockIdx.y, b = bh / Hq, h = bh % Hq, g = h / (Hq / Hkv);
  const int i0 = blockIdx.x * kRows;
  const int row = threadIdx.x >> 1, half = threadIdx.x & 1;
  const int i = i0 + row;
  const bool valid = i < Tn;
  float qr[P], o[P];
  const float sl2 = scale * kLog2e;
#pragma unroll
  for (int c = 0; c < P; ++c) {
    qr[c] = valid ? to_f32(q[((int64_t(b) * Tn + i) * Hq + h) * HD + half * P + c]) * sl2 : 0.f;
    o[c] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  const int last = min(Tn, i0 + kRows);
  for (int j0 = max(0, i0 - W) / kTile<HD> * kTile<HD>; j0 < last; j0 += kTile<HD>) {
    __syncthreads();
    load_rows<HD>(ks, k, b, j0, g, Tn, Hkv);
    load_rows<HD>(vs, v, b, j0, g, Tn, Hkv);
    __syncthreads();
    const int jn = min(kTile<HD>, last - j0);
    for (int jj = 0; jj < jn; ++jj) {
      const float* kr = ks + jj * HD + half * P;
      float s = 0.f;
#pragma unroll
      for (int c = 0; c < P; ++c) s += qr[c] * kr[c];
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      if (j0 + jj > i || j0 + jj < i - W) continue;  // outside the span (the pair agrees, so the shuffle is complete)
      float mn = fmaxf(m, s);
      float corr = exp2f(m - mn), p = exp2f(s - mn);
      l = l * corr + p;
      const float* vr = vs + jj * HD + half * P;
#pragma unroll
      for (int c = 0; c < P; ++c) o[c] = o[c] * corr + p * vr[c];
      m = mn;
    }
  }
  if (!valid) return;
  float inv = 1.f / l;
#pragma unroll
  for (int c = 0; c < P; ++c) out[((int64_t(b) * Tn + i) * Hq + h) * HD + half * P + c] = from_f32<T>(o[c] * inv);
  if (half == 0) lse[(int64_t(b) * Hq + h) * Tn + i] = (m + log2f(l)) / kLog2e;
}

// D[b, h, t] = <dout, out> per query row, one warp per row.
template <class T>
__global__ void attn_dot_kernel(const T* out, const T* dout, float* D, int64_t rows, int Tn, int Hq, int hd) {
  int64_t r = blockIdx.x * 8ll + (threadIdx.x >> 5);  // r = (b * T + t) * Hq + h
  if (r >= rows) return;
  float s = 0.f;
  for (int c = threadIdx.x & 31; c < hd; c += 32) s += to_f32(out[r * hd + c]) * to_f32(dout[r * hd + c]);
  s = warp_sum(s);
  if ((threadIdx.x & 31) == 0) {
    int64_t h = r % Hq, bt = r / Hq, t = bt % Tn, b = bt / Tn;
    D[(b * Hq + h) * Tn + t] = s;
  }
}

template <int HD, class T, class TG>
__global__ void __launch_bounds__(kThreads) attn_dq_kernel(const T* q, const T* k, const T* v, const T* dout,
                                                          const float* lse, const float* D, TG* dq, int Tn, int Hq,
                                                          int Hkv, int W, float scale) {
  constexpr int P = HD / 2;
  __shared__ float ks[kTile<HD> * HD], vs[kTile<HD> * HD];
  const int bh = blockIdx.y, b = bh / Hq, h = bh % Hq, g = h / (Hq / Hkv);
  const int i0 = blockIdx.x * kRows;
  const int row = threadIdx.x >> 1, half = threadIdx.x & 1;
  const int i = i0 + row;
  const bool valid = i < Tn;
  const int64_t qoff = ((int64_t(b) * Tn + (valid ? i : 0)) * Hq + h) * HD + half * P;
  float qr[P], dor[P], acc[P];
  const float sl2 = scale * kLog2e;
#pragma unroll
  for (int c = 0; c < P; ++c) {
    qr[c] = valid ? to_f32(q[qoff + c]) * sl2 : 0.f;
    dor[c] = valid ? to_f32(dout[qoff + c]) : 0.f;
    acc[c] = 0.f;
  }
  const float lse2 = valid ? lse[(int64_t(b) * Hq + h) * Tn + i] * kLog2e : 0.f;
  const float Di = valid ? D[(int64_t(b) * Hq + h) * Tn + i] : 0.f;
  const int last = min(Tn, i0 + kRows);
  for (int j0 = max(0, i0 - W) / kTile<HD> * kTile<HD>; j0 < last; j0 += kTile<HD>) {
    __syncthreads();
    load_rows<HD>(ks, k, b, j0, g, Tn, Hkv);
    load_rows<HD>(vs, v, b, j0, g, Tn, Hkv);
    __syncthreads();
    const int jn = min(kTile<HD>, last - j0);
    for (int jj = 0; jj < jn; ++jj) {
      const float* kr = ks + jj * HD + half * P;
      const float* vr = vs + jj * HD + half * P;
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int c = 0; c < P; ++c) {
        s += qr[c] * kr[c];
        dp += dor[c] * vr[c];
      }
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      dp += __shfl_xor_sync(0xffffffffu, dp, 1);
      if (!valid || j0 + jj > i || j0 + jj < i - W) continue;
      float p = exp2f(s - lse2);
      float ds = p * (dp - Di);
#pragma unroll
      for (int c = 0; c < P; ++c) acc[c] += ds * kr[c];
    }
  }
  if (!valid) return;
#pragma unroll
  for (int c = 0; c < P; ++c) dq[qoff + c] = from_f32<TG>(acc[c] * scale);
}

template <int HD, class T, class TG>
__global__ void __launch_bounds__(kThreads) attn_dkv_kernel(const T* q, const T* k, const T* v, const T* dout,
                                                           const float* lse, const float* D, TG* dk, TG* dv, int Tn,
                                                           int Hq, int Hkv, int W, float scale) {
  constexpr int P = HD / 2;
  __shared__ float qs[kTile<HD> * HD], dos[kTile<HD> * HD], ls[kTile<HD>], ds_[kTile<HD>];
  const int bg = blockIdx.y, b = bg / Hkv, g = bg % Hkv, group = Hq / Hkv;
  const int j0 = blockIdx.x * kRows;
  const int row = threadIdx.x >> 1, half = threadIdx.x & 1;
  const int j = j0 + row;
  const bool valid = j < Tn;
  const int64_t koff = ((int64_t(b) * Tn + (valid ? j : 0)) * Hkv + g) * HD + half * P;
  float kr[P], vr[P], dka[P], dva[P];
  const float sl2 = scale * kLog2e;
#pragma unroll
  for (int c = 0; c < P; ++c) {
    kr[c] = valid ? to_f32(k[koff + c]) * sl2 : 0.f;
    vr[c] = valid ? to_f32(v[koff + c]) : 0.f;
    dka[c] = dva[c] = 0.f;
  }
  for (int h = g * group; h < (g + 1) * group; ++h) {
    for (int i0 = j0; i0 < min(Tn, j0 + kRows + W); i0 += kTile<HD>) {
      __syncthreads();
      load_rows<HD>(qs, q, b, i0, h, Tn, Hq);
      load_rows<HD>(dos, dout, b, i0, h, Tn, Hq);
      for (int r = threadIdx.x; r < kTile<HD>; r += blockDim.x) {
        int t = i0 + r;
        ls[r] = t < Tn ? lse[(int64_t(b) * Hq + h) * Tn + t] * kLog2e : 0.f;
        ds_[r] = t < Tn ? D[(int64_t(b) * Hq + h) * Tn + t] : 0.f;
      }
      __syncthreads();
      const int in = min(kTile<HD>, Tn - i0);
      for (int ii = 0; ii < in; ++ii) {
        const float* qrow = qs + ii * HD + half * P;
        const float* drow = dos + ii * HD + half * P;
        float s = 0.f, dp = 0.f;
#pragma unroll
        for (int c = 0; c < P; ++c) {
          s += kr[c] * qrow[c];
          dp += vr[c] * drow[c];
        }
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        dp += __shfl_xor_sync(0xffffffffu, dp, 1);
        if (!valid || i0 + ii < j || i0 + ii > j + W) continue;
        float p = exp2f(s - ls[ii]);
        float dsv = p * (dp - ds_[ii]);
#pragma unroll
        for (int c = 0; c < P; ++c) {
          dva[c] += p * drow[c];
          dka[c] += dsv * qrow[c];
        }
      }
    }
  }
  if (!valid) return;
#pragma unroll
  for (int c = 0; c < P; ++c) {
    dk[koff + c] = from_f32<TG>(dka[c] * scale);
    dv[koff + c] = from_f32<TG>(dva[c]);
  }
}

struct AttnShape {
  int B, T, Hq, Hkv, hd;
};

AttnShape check_shapes(const Tensor& q, const Tensor& k, const Tensor& v, const char* op) {
  require_float(q, op, "q");
  require_float(k, op, "k");
  require_float(v, op, "v");
  require(q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4, op, "q, k, v must be [B, T, H, hd]");
  AttnShape s{int(q.dim(0)), int(q.dim(1)), int(q.dim(2)), int(k.dim(2)), int(q.dim(3))};
  require(k.shape == v.shape && k.dim(0) == s.B && k.dim(1) == s.T && k.dim(3) == s.hd && s.Hkv > 0 &&
              s.Hq % s.Hkv == 0, op, "k, v must be [B, T, Hkv, hd] with Hq % Hkv == 0; got q " + q.describe() +
              ", k " + k.describe());
  require(q.dtype == k.dtype && k.dtype == v.dtype, op, "q, k, v must share one dtype");
  require(s.hd == 16 || s.hd == 32 || s.hd == 64 || s.hd == 96 || s.hd == 128 || s.hd == 256, op,
          "head_dim must be 16, 32, 64, 96, 128 or 256");
  return s;
}

#define MOELAB_HD_DISPATCH(hd, HD, ...)                 \
  do {                                                  \
    switch (hd) {                                       \
      case 16: { constexpr int HD = 16; __VA_ARGS__; break; }  \
      case 32: { constexpr int HD = 32; __VA_ARGS__; break; }  \
      case 64: { constexpr int HD = 64; __VA_ARGS__; break; }  \
      case 96: { constexpr int HD = 96; __VA_ARGS__; break; }  \
      case 128: { constexpr int HD = 128; __VA_ARGS__; break; } \
      default: { constexpr int HD = 256; __VA_ARGS__; break; } \
    }                                                   \
  } while (0)

}  // namespace

bool CudaBackend::fast_attention_head_dim(int head_dim) { return flash::supports_head_dim(head_dim); }

namespace {
// cuDNN counts a window as the keys up to and including the query (t - W < j <= t); moelab, as
// flash-attn's window_size = (w, 0), as the keys before it (t - w <= j <= t): W = w + 1.
cudnn_attention::Shape cudnn_shape(int B, int T, int Hq, int Hkv, int hd, int window) {
  return {B, T, Hq, Hkv, hd, window > 0 && window + 1 < T ? window + 1 : 0};
}
}  // namespace

bool CudaBackend::attention_on_cudnn(int B, int T, int Hq, int Hkv, int hd, int window, bool bf16_grads) {
  if (attention_kernels_ == AttentionKernels::flash) return false;
  std::string why;
  const bool ok = bf16_grads && cudnn_attention::supported(cudnn_shape(B, T, Hq, Hkv, hd, window), &why);
  if (ok) return true;
  const std::string what = "cuDNN's fused attention engine cannot serve B=" + std::to_string(B) + " T=" +
                           std::to_string(T) + " Hq=" + std::to_string(Hq) + " Hkv=" + std::to_string(Hkv) +
                           " head_dim=" + std::to_string(hd) +
                           (bf16_grads ? ": " + why : ": it writes bf16 gradients only");
  if (attention_kernels_ == AttentionKernels::cudnn) throw Error("attention: " + what);
  // The own kernels take over; say so once, since they are slower at long sequences.
  static std::once_flag told;
  if (bf16_grads) std::call_once(told, [&] { std::fprintf(stderr, "moelab: %s; using moelab's attention kernels\n", what.c_str()); });
  return false;
}

void CudaBackend::attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, Tensor& lse,
                                int window) {
  AttnShape s = check_shapes(q, k, v, "attention_fwd");
  require(out.shape == q.shape && out.dtype == q.dtype, "attention_fwd", "out must match q, got " + out.describe());
  require_dtype(lse, DType::f32, "attention_fwd", "lse");
  require(lse.numel() == int64_t(s.B) * s.Hq * s.T, "attention_fwd", "lse must be [B, Hq, T]");
  if (q.numel() == 0) return;
  dim3 grid(unsigned((s.T + kRows - 1) / kRows), unsigned(s.B * s.Hq));
  float scale = 1.f / std::sqrt(float(s.hd));
  if (q.dtype == DType::bf16 && flash::supports_head_dim(s.hd)) {
    if (attention_on_cudnn(s.B, s.T, s.Hq, s.Hkv, s.hd, window, true)) {
      const auto cs = cudnn_shape(s.B, s.T, s.Hq, s.Hkv, s.hd, window);
      void* ws = scratch(ScratchSlot::attention, cudnn_attention::workspace_bytes(cs));
      cudnn_attention::forward(cs, q.as<bf16>(), k.as<bf16>(), v.as<bf16>(), out.as<bf16>(), lse.as<float>(), ws,
                               stream_);
      return;
    }
    flash::forward(q.as<bf16>(), k.as<bf16>(), v.as<bf16>(), out.as<bf16>(), lse.as<float>(), s.B, s.T, s.Hq, s.Hkv,
                   s.hd, window, scale, stream_);
    return;
  }
  const int W = span_of(window, s.T);
  MOELAB_FLOAT_DISPATCH(q.dtype, T, MOELAB_HD_DISPATCH(s.hd, HD,
      attn_fwd_kernel<HD, T><<<grid, kThreads, 0, stream_>>>(q.as<T>(), k.as<T>(), v.as<T>(), out.as<T>(),
                                                             lse.as<float>(), s.T, s.Hq, s.Hkv, W, scale)));
  MOELAB_CUDA_LAUNCH_CHECK("attention_fwd");
}

void CudaBackend::attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                const Tensor& lse, const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv,
                                int window) {
  AttnShape s = check_shapes(q, k, v, "attention_bwd");
  require(out.shape == q.shape && dout.shape == q.shape && out.dtype == q.dtype && dout.dtype == q.dtype,
          "attention_bwd", "out and dout must match q");
  require(dq.shape == q.shape && dk.shape == k.shape && dv.shape == v.shape, "attention_bwd",
          "dq, dk, dv must match q, k, v");
  require(dq.dtype == dk.dtype && dk.dtype == dv.dtype, "attention_bwd", "dq, dk, dv must share one dtype");
  require_dtype(lse, DType::f32, "attention_bwd", "lse");
  if (q.numel() == 0) return;
  if (q.dtype == DType::bf16 && flash::supports_head_dim(s.hd) &&
      attention_on_cudnn(s.B, s.T, s.Hq, s.Hkv, s.hd, window, dq.dtype == DType::bf16)) {
    const auto cs = cudnn_shape(s.B, s.T, s.Hq, s.Hkv, s.hd, window);
    void* ws = scratch(ScratchSlot::attention, cudnn_attention::workspace_bytes(cs));
    cudnn_attention::backward(cs, q.as<bf16>(), k.as<bf16>(), v.as<bf16>(), out.as<bf16>(), dout.as<bf16>(),
                              lse.as<float>(), dq.as<bf16>(), dk.as<bf16>(), dv.as<bf16>(), ws, stream_);
    return;
  }
  // The own kernels need D = rowsum(dout * out) first (cuDNN's backward computes it inside).
  int64_t rows = int64_t(s.B) * s.T * s.Hq;
  auto* D = static_cast<float*>(scratch(ScratchSlot::attention, size_t(rows) * sizeof(float)));
  float scale = 1.f / std::sqrt(float(s.hd));
  if (q.dtype == DType::bf16 && flash::supports_head_dim(s.hd)) {
    flash::row_dot(out.as<bf16>(), dout.as<bf16>(), D, s.B, s.T, s.Hq, s.hd, stream_);
    flash::backward(q.as<bf16>(), k.as<bf16>(), v.as<bf16>(), dout.as<bf16>(), lse.as<float>(), D, dq.data, dk.data,
                    dv.data, dq.dtype, s.B, s.T, s.Hq, s.Hkv, s.hd, window, scale, stream_);
    return;
  }
  MOELAB_FLOAT_DISPATCH(q.dtype, T,
      attn_dot_kernel<T><<<unsigned((rows + 7) / 8), 256, 0, stream_>>>(out.as<T>(), dout.as<T>(), D, rows, s.T,
                                                                        s.Hq, s.hd));
  MOELAB_CUDA_LAUNCH_CHECK("attention_dot");
  const int W = span_of(window, s.T);
  dim3 gq(unsigned((s.T + kRows - 1) / kRows), unsigned(s.B * s.Hq));
  dim3 gk(unsigned((s.T + kRows - 1) / kRows), unsigned(s.B * s.Hkv));
  MOELAB_FLOAT_DISPATCH(q.dtype, T, MOELAB_FLOAT_DISPATCH(dq.dtype, TG, MOELAB_HD_DISPATCH(s.hd, HD, {
    attn_dq_kernel<HD, T, TG><<<gq, kThreads, 0, stream_>>>(q.as<T>(), k.as<T>(), v.as<T>(), dout.as<T>(),
                                                            lse.as<float>(), D, dq.as<TG>(), s.T, s.Hq, s.Hkv, W, scale);
    attn_dkv_kernel<HD, T, TG><<<gk, kThreads, 0, stream_>>>(q.as<T>(), k.as<T>(), v.as<T>(), dout.as<T>(),
                                                             lse.as<float>(), D, dk.as<TG>(), dv.as<TG>(), s.T, s.Hq,
                                                             s.Hkv, W, scale);
  })));
  MOELAB_CUDA_LAUNCH_CHECK("attention_bwd");
}

}  // namespace moelab
