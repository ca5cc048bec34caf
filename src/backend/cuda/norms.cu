// Parameter-free RMSNorm over the last dim, and rotary embedding followed by per-head RMSNorm
// (QK-norm), forward and backward. One warp per row: rows are short (d_model or head_dim), so a
// warp keeps the row's statistics in registers and needs no shared memory or block barriers.
// RMSNorm rows of a multiple of 8 elements, 16-byte aligned, take the vector kernels: up to 2048
// elements (nanochat's d_model through d32) each lane holds its 8-element chunks in registers, so
// x and dy are read from memory once; longer rows stream their chunks twice (the second read
// mostly from cache). Other rows take the scalar kernels.
// The backward recomputes the rotated values instead of storing them.
#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/expert_amax.cuh"

namespace moelab {
using namespace cuda_detail;

namespace {

constexpr int kWarps = 8;

template <class TX, class TY>
__global__ void rmsnorm_fwd_kernel(const TX* x, TY* y, float* rstd, int64_t rows, int d, float eps) {
  int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const TX* xr = x + row * d;
  float ss = 0.f;
  for (int i = lane; i < d; i += 32) {
    float v = to_f32(xr[i]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  float r = rsqrtf(ss / float(d) + eps);
  TY* yr = y + row * d;
  for (int i = lane; i < d; i += 32) yr[i] = from_f32<TY>(to_f32(xr[i]) * r);
  if (lane == 0) rstd[row] = r;
}

// dx = r * dy - r^3 * x * <dy, x> / d
template <class TX, class TD, class TO>
__global__ void rmsnorm_bwd_kernel(const TX* x, const float* rstd, const TD* dy, TO* dx, int64_t rows, int d,
                                   bool accumulate) {
  int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const TX* xr = x + row * d;
  const TD* dyr = dy + row * d;
  float dot = 0.f;
  for (int i = lane; i < d; i += 32) dot += to_f32(xr[i]) * to_f32(dyr[i]);
  dot = warp_sum(dot);
  float r = rstd[row];
  float c = r * r * r * dot / float(d);
  TO* dxr = dx + row * d;
  for (int i = lane; i < d; i += 32) {
    float g = r * to_f32(dyr[i]) - c * to_f32(xr[i]);
    if (accumulate) g += to_f32(dxr[i]);
    dxr[i] = from_f32<TO>(g);
  }
}

// Lane `lane` holds chunks lane, lane + 32, ... (U of them at most) of a row of d = 8 * chunks.
// With amax, the block raises it to the largest |y| written.
template <class TX, class TY, int U>
__global__ void rmsnorm_fwd_vec_kernel(const TX* x, TY* y, float* rstd, int64_t rows, int d, float eps,
                                       unsigned* amax) {
  const int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31, chunks = d / 8;
  float m = 0.f;
  if (row < rows) {
    float v[U][8];
    float ss = 0.f;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = lane + 32 * u;
      if (c >= chunks) continue;
      load8(x + row * d + c * 8, v[u]);
#pragma unroll
      for (int k = 0; k < 8; ++k) ss += v[u][k] * v[u][k];
    }
    const float r = rsqrtf(warp_sum(ss) / float(d) + eps);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = lane + 32 * u;
      if (c >= chunks) continue;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        v[u][k] *= r;
        if (amax) m = fmaxf(m, fabsf(v[u][k]));
      }
      store8(y + row * d + c * 8, v[u]);
    }
    if (lane == 0) rstd[row] = r;
  }
  if (amax) raise_block_amax(amax, stored<TY>(m));  // uniform over the grid
}

template <class T, class TO, int U>
__global__ void rmsnorm_bwd_vec_kernel(const T* x, const float* rstd, const T* dy, TO* dx, int64_t rows, int d,
                                       bool accumulate, unsigned* amax) {
  const int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31, chunks = d / 8;
  float m = 0.f;
  if (row < rows) {
    float xv[U][8], gv[U][8];
    float dot = 0.f;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = lane + 32 * u;
      if (c >= chunks) continue;
      load8(x + row * d + c * 8, xv[u]);
      load8(dy + row * d + c * 8, gv[u]);
#pragma unroll
      for (int k = 0; k < 8; ++k) dot += xv[u][k] * gv[u][k];
    }
    dot = warp_sum(dot);
    const float r = rstd[row];
    const float coef = r * r * r * dot / float(d);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = lane + 32 * u;
      if (c >= chunks) continue;
      float out[8];
      if (accumulate) load8(dx + row * d + c * 8, out);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        out[k] = r * gv[u][k] - coef * xv[u][k] + (accumulate ? out[k] : 0.f);
        if (amax) m = fmaxf(m, fabsf(out[k]));
      }
      store8(dx + row * d + c * 8, out);
    }
  }
  if (amax) raise_block_amax(amax, stored<TO>(m));  // uniform over the grid
}

// Rows of d = 8 * chunks streamed by each warp in two passes (statistics, then output), for rows
// too long to keep in registers.
template <class TX, class TY>
__global__ void rmsnorm_fwd_stream_kernel(const TX* x, TY* y, float* rstd, int64_t rows, int d, float eps) {
  const int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31, chunks = d / 8;
  if (row >= rows) return;
  float ss = 0.f;
  for (int c = lane; c < chunks; c += 32) {
    float v[8];
    load8(x + row * d + c * 8, v);
#pragma unroll
    for (int k = 0; k < 8; ++k) ss += v[k] * v[k];
  }
  const float r = rsqrtf(warp_sum(ss) / float(d) + eps);
  for (int c = lane; c < chunks; c += 32) {
    float v[8];
    load8(x + row * d + c * 8, v);
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] *= r;
    store8(y + row * d + c * 8, v);
  }
  if (lane == 0) rstd[row] = r;
}

template <class T, class TO>
__global__ void rmsnorm_bwd_stream_kernel(const T* x, const float* rstd, const T* dy, TO* dx, int64_t rows, int d,
                                          bool accumulate) {
  const int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31, chunks = d / 8;
  if (row >= rows) return;
  float dot = 0.f;
  for (int c = lane; c < chunks; c += 32) {
    float xv[8], gv[8];
    load8(x + row * d + c * 8, xv);
    load8(dy + row * d + c * 8, gv);
#pragma unroll
    for (int k = 0; k < 8; ++k) dot += xv[k] * gv[k];
  }
  dot = warp_sum(dot);
  const float r = rstd[row];
  const float coef = r * r * r * dot / float(d);
  for (int c = lane; c < chunks; c += 32) {
    float xv[8], gv[8], out[8];
    load8(x + row * d + c * 8, xv);
    load8(dy + row * d + c * 8, gv);
    if (accumulate) load8(dx + row * d + c * 8, out);
#pragma unroll
    for (int k = 0; k < 8; ++k) out[k] = r * gv[k] - coef * xv[k] + (accumulate ? out[k] : 0.f);
    store8(dx + row * d + c * 8, out);
  }
}

// Which RMSNorm kernel a row of d elements takes.
enum class RowKernel { scalar, streamed, registers };

struct RowPlan {
  RowKernel kernel = RowKernel::scalar;
  int chunks_per_lane = 0;  // registers: 8-element chunks each lane holds (1..8)
};

constexpr int kMaxChunksPerLane = 8;  // rows of up to 8 * 32 * 8 = 2048 elements stay in registers

RowPlan plan_row(int64_t d, std::initializer_list<const void*> ptrs) {
  RowPlan p;
  if (d % 8 != 0) return p;
  for (const void* q : ptrs)
    if (!aligned16(q)) return p;
  const int64_t per_lane = (d / 8 + 31) / 32;
  if (per_lane > kMaxChunksPerLane) {
    p.kernel = RowKernel::streamed;
    return p;
  }
  p.kernel = RowKernel::registers;
  p.chunks_per_lane = int(per_lane);
  return p;
}

#define MOELAB_CHUNKS_DISPATCH(u, U, ...)        \
  switch (u) {                                   \
    case 1: { constexpr int U = 1; __VA_ARGS__; break; } \
    case 2: { constexpr int U = 2; __VA_ARGS__; break; } \
    case 3: { constexpr int U = 3; __VA_ARGS__; break; } \
    case 4: { constexpr int U = 4; __VA_ARGS__; break; } \
    case 5: { constexpr int U = 5; __VA_ARGS__; break; } \
    case 6: { constexpr int U = 6; __VA_ARGS__; break; } \
    case 7: { constexpr int U = 7; __VA_ARGS__; break; } \
    default: { constexpr int U = 8; __VA_ARGS__; break; } \
  }

// x [B, T, H, hd]; position of row (b, t, h) is t. hd <= 256 so a lane holds at most 4 pairs.
template <class TX, class TY>
__global__ void rope_norm_fwd_kernel(const TX* x, const float* cos_t, const float* sin_t, TY* y, float* rstd,
                                     int64_t rows, int T, int H, int hd, float eps) {
  int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  int lane = threadIdx.x & 31;
  if (row >= rows) return;
  int t = int((row / H) % T), half = hd / 2;
  const TX* xr = x + row * hd;
  float y1[4], y2[4];
  float ss = 0.f;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    int i = lane + 32 * u;
    y1[u] = y2[u] = 0.f;
    if (i < half) {
      float c = cos_t[t * half + i], s = sin_t[t * half + i];
      float x1 = to_f32(xr[i]), x2 = to_f32(xr[i + half]);
      y1[u] = x1 * c + x2 * s;
      y2[u] = -x1 * s + x2 * c;
      ss += y1[u] * y1[u] + y2[u] * y2[u];
    }
  }
  ss = warp_sum(ss);
  float r = rsqrtf(ss / float(hd) + eps);
  TY* yr = y + row * hd;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    int i = lane + 32 * u;
    if (i < half) {
      yr[i] = from_f32<TY>(y1[u] * r);
      yr[i + half] = from_f32<TY>(y2[u] * r);
    }
  }
  if (lane == 0) rstd[row] = r;
}

template <class TX, class TD, class TO>
__global__ void rope_norm_bwd_kernel(const TX* x, const float* cos_t, const float* sin_t, const float* rstd,
                                     const TD* dy, TO* dx, int64_t rows, int T, int H, int hd) {
  int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  int lane = threadIdx.x & 31;
  if (row >= rows) return;
  int t = int((row / H) % T), half = hd / 2;
  const TX* xr = x + row * hd;
  const TD* dyr = dy + row * hd;
  float y1[4], y2[4], c_[4], s_[4];
  float dot = 0.f;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    int i = lane + 32 * u;
    y1[u] = y2[u] = c_[u] = s_[u] = 0.f;
    if (i < half) {
      c_[u] = cos_t[t * half + i];
      s_[u] = sin_t[t * half + i];
      float x1 = to_f32(xr[i]), x2 = to_f32(xr[i + half]);
      y1[u] = x1 * c_[u] + x2 * s_[u];
      y2[u] = -x1 * s_[u] + x2 * c_[u];
      dot += y1[u] * to_f32(dyr[i]) + y2[u] * to_f32(dyr[i + half]);
    }
  }
  dot = warp_sum(dot);
  float r = rstd[row];
  float c = r * r * r * dot / float(hd);
  TO* dxr = dx + row * hd;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    int i = lane + 32 * u;
    if (i < half) {
      float g1 = r * to_f32(dyr[i]) - c * y1[u];
      float g2 = r * to_f32(dyr[i + half]) - c * y2[u];
      dxr[i] = from_f32<TO>(g1 * c_[u] - g2 * s_[u]);
      dxr[i + half] = from_f32<TO>(g1 * s_[u] + g2 * c_[u]);
    }
  }
}

// Rope + QK-norm with LPR = head_dim / 16 lanes per row (head_dim 32..256): lane l of a row holds
// elements 8l..8l+7 of both halves, so a warp works on 32 / LPR rows at once and reduces each
// row's statistic over its own lane group (xor shuffles below LPR stay inside the group).
template <int LPR>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = LPR / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class TX, class TY, int LPR>
__global__ void rope_norm_fwd_vec_kernel(const TX* x, const float* cos_t, const float* sin_t, TY* y, float* rstd,
                                         int64_t rows, int T, int H, float eps) {
  constexpr int hd = 16 * LPR, half = hd / 2;
  const int lane = threadIdx.x & 31;
  const int64_t row = (blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5)) * (32 / LPR) + lane / LPR;
  const bool active = row < rows;  // inactive lanes still join the shuffles
  const int i = (lane % LPR) * 8;
  float y1[8] = {}, y2[8] = {}, ss = 0.f;
  if (active) {
    const int t = int((row / H) % T);
    float x1[8], x2[8], c[8], s[8];
    load8(x + row * hd + i, x1);
    load8(x + row * hd + half + i, x2);
    load8(cos_t + t * half + i, c);
    load8(sin_t + t * half + i, s);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      y1[k] = x1[k] * c[k] + x2[k] * s[k];
      y2[k] = -x1[k] * s[k] + x2[k] * c[k];
      ss += y1[k] * y1[k] + y2[k] * y2[k];
    }
  }
  const float r = rsqrtf(group_sum<LPR>(ss) / float(hd) + eps);
  if (!active) return;
#pragma unroll
  for (int k = 0; k < 8; ++k) y1[k] *= r, y2[k] *= r;
  store8(y + row * hd + i, y1);
  store8(y + row * hd + half + i, y2);
  if (lane % LPR == 0) rstd[row] = r;
}

template <class T, class TO, int LPR>
__global__ void rope_norm_bwd_vec_kernel(const T* x, const float* cos_t, const float* sin_t, const float* rstd,
                                         const T* dy, TO* dx, int64_t rows, int Tn, int H, unsigned* amax) {
  constexpr int hd = 16 * LPR, half = hd / 2;
  const int lane = threadIdx.x & 31;
  const int64_t row = (blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5)) * (32 / LPR) + lane / LPR;
  const bool active = row < rows;
  const int i = (lane % LPR) * 8;
  float y1[8] = {}, y2[8] = {}, d1[8] = {}, d2[8] = {}, c[8] = {}, s[8] = {}, dot = 0.f;
  if (active) {
    const int t = int((row / H) % Tn);
    float x1[8], x2[8];
    load8(x + row * hd + i, x1);
    load8(x + row * hd + half + i, x2);
    load8(dy + row * hd + i, d1);
    load8(dy + row * hd + half + i, d2);
    load8(cos_t + t * half + i, c);
    load8(sin_t + t * half + i, s);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      y1[k] = x1[k] * c[k] + x2[k] * s[k];
      y2[k] = -x1[k] * s[k] + x2[k] * c[k];
      dot += y1[k] * d1[k] + y2[k] * d2[k];
    }
  }
  dot = group_sum<LPR>(dot);
  float m = 0.f;
  if (active) {
    const float r = rstd[row];
    const float coef = r * r * r * dot / float(hd);
    float o1[8], o2[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float g1 = r * d1[k] - coef * y1[k], g2 = r * d2[k] - coef * y2[k];
      o1[k] = g1 * c[k] - g2 * s[k];
      o2[k] = g1 * s[k] + g2 * c[k];
      if (amax) m = fmaxf(m, fmaxf(fabsf(o1[k]), fabsf(o2[k])));
    }
    store8(dx + row * hd + i, o1);
    store8(dx + row * hd + half + i, o2);
  }
  if (amax) raise_block_amax(amax, stored<TO>(m));  // uniform over the grid
}

// Lanes per row for the vector rope kernels, 0 where they do not apply.
int rope_lanes_per_row(int64_t hd, std::initializer_list<const void*> ptrs) {
  if (hd != 32 && hd != 64 && hd != 128 && hd != 256) return 0;
  for (const void* p : ptrs)
    if (!aligned16(p)) return 0;
  return int(hd / 16);
}

#define MOELAB_LPR_DISPATCH(l, LPR, ...)                   \
  switch (l) {                                             \
    case 2: { constexpr int LPR = 2; __VA_ARGS__; break; }   \
    case 4: { constexpr int LPR = 4; __VA_ARGS__; break; }   \
    case 8: { constexpr int LPR = 8; __VA_ARGS__; break; }   \
    default: { constexpr int LPR = 16; __VA_ARGS__; break; } \
  }

void check_rope(const Tensor& x, const Tensor& cos, const Tensor& sin, const char* op) {
  require_float(x, op, "x");
  require(x.ndim() == 4, op, "x must be [B, T, H, hd], got " + x.describe());
  require_dtype(cos, DType::f32, op, "cos");
  require_dtype(sin, DType::f32, op, "sin");
  int64_t hd = x.dim(3);
  require(hd % 2 == 0 && hd <= 256, op, "head_dim must be even and at most 256");
  require(cos.cols() == hd / 2 && sin.cols() == hd / 2 && cos.rows() >= x.dim(1) && sin.rows() >= x.dim(1), op,
          "cos/sin must be [max_seq >= T, hd/2], got " + cos.describe());
}

}  // namespace

void CudaBackend::rmsnorm_fwd(const Tensor& x, Tensor& y, Tensor& rstd, const AmaxSink* amax) {
  unsigned* am = tensor_amax_arg(amax, "rmsnorm_fwd");
  require_float(x, "rmsnorm_fwd", "x");
  require_float(y, "rmsnorm_fwd", "y");
  require_dtype(rstd, DType::f32, "rmsnorm_fwd", "rstd");
  require(x.numel() == y.numel() && rstd.numel() == x.rows(), "rmsnorm_fwd", "shapes differ: " + x.describe() +
          ", " + y.describe() + ", " + rstd.describe());
  int64_t rows = x.rows();
  if (rows == 0) return;
  unsigned nb = unsigned((rows + kWarps - 1) / kWarps);
  const RowPlan plan = plan_row(x.cols(), {x.data, y.data});
  if (plan.kernel == RowKernel::registers) {
    MOELAB_FLOAT_DISPATCH(x.dtype, TX, MOELAB_FLOAT_DISPATCH(y.dtype, TY, MOELAB_CHUNKS_DISPATCH(plan.chunks_per_lane, U,
        rmsnorm_fwd_vec_kernel<TX, TY, U><<<nb, 32 * kWarps, 0, stream_>>>(x.as<TX>(), y.as<TY>(), rstd.as<float>(),
                                                                          rows, int(x.cols()), kNormEps, am))));
    am = nullptr;  // raised
  } else if (plan.kernel == RowKernel::streamed) {
    MOELAB_FLOAT_DISPATCH(x.dtype, TX, MOELAB_FLOAT_DISPATCH(y.dtype, TY,
        rmsnorm_fwd_stream_kernel<TX, TY><<<nb, 32 * kWarps, 0, stream_>>>(x.as<TX>(), y.as<TY>(), rstd.as<float>(),
                                                                           rows, int(x.cols()), kNormEps)));
  } else {
    MOELAB_FLOAT_DISPATCH(x.dtype, TX, MOELAB_FLOAT_DISPATCH(y.dtype, TY,
        rmsnorm_fwd_kernel<TX, TY><<<nb, 32 * kWarps, 0, stream_>>>(x.as<TX>(), y.as<TY>(), rstd.as<float>(), rows,
                                                                    int(x.cols()), kNormEps)));
  }
  MOELAB_CUDA_LAUNCH_CHECK("rmsnorm_fwd");
  if (am) raise_amax_by_pass(y, amax->amax);
}

void CudaBackend::rmsnorm_bwd(const Tensor& x, const Tensor& rstd, const Tensor& dy, Tensor& dx, bool accumulate,
                              const AmaxSink* amax) {
  unsigned* am = tensor_amax_arg(amax, "rmsnorm_bwd");
  require_float(x, "rmsnorm_bwd", "x");
  require_float(dy, "rmsnorm_bwd", "dy");
  require_float(dx, "rmsnorm_bwd", "dx");
  require_dtype(rstd, DType::f32, "rmsnorm_bwd", "rstd");
  require(x.numel() == dy.numel() && x.numel() == dx.numel() && rstd.numel() == x.rows(), "rmsnorm_bwd",
          "shapes differ");
  require(x.dtype == dy.dtype, "rmsnorm_bwd", "x and dy must share one dtype");
  int64_t rows = x.rows();
  if (rows == 0) return;
  unsigned nb = unsigned((rows + kWarps - 1) / kWarps);
  const RowPlan plan = plan_row(x.cols(), {x.data, dy.data, dx.data});
  if (plan.kernel == RowKernel::registers) {
    MOELAB_FLOAT_DISPATCH(x.dtype, T, MOELAB_FLOAT_DISPATCH(dx.dtype, TO, MOELAB_CHUNKS_DISPATCH(plan.chunks_per_lane, U,
        rmsnorm_bwd_vec_kernel<T, TO, U><<<nb, 32 * kWarps, 0, stream_>>>(x.as<T>(), rstd.as<float>(), dy.as<T>(),
                                                                          dx.as<TO>(), rows, int(x.cols()),
                                                                          accumulate, am))));
    am = nullptr;  // raised
  } else if (plan.kernel == RowKernel::streamed) {
    MOELAB_FLOAT_DISPATCH(x.dtype, T, MOELAB_FLOAT_DISPATCH(dx.dtype, TO,
        rmsnorm_bwd_stream_kernel<T, TO><<<nb, 32 * kWarps, 0, stream_>>>(x.as<T>(), rstd.as<float>(), dy.as<T>(),
                                                                          dx.as<TO>(), rows, int(x.cols()),
                                                                          accumulate)));
  } else {
    MOELAB_FLOAT_DISPATCH(x.dtype, T, MOELAB_FLOAT_DISPATCH(dx.dtype, TO,
        rmsnorm_bwd_kernel<T, T, TO><<<nb, 32 * kWarps, 0, stream_>>>(x.as<T>(), rstd.as<float>(), dy.as<T>(),
                                                                      dx.as<TO>(), rows, int(x.cols()), accumulate)));
  }
  MOELAB_CUDA_LAUNCH_CHECK("rmsnorm_bwd");
  if (am) raise_amax_by_pass(dx, amax->amax);
}

void CudaBackend::rope_norm_fwd(const Tensor& x, const Tensor& cos, const Tensor& sin, Tensor& y, Tensor& rstd) {
  check_rope(x, cos, sin, "rope_norm_fwd");
  require_float(y, "rope_norm_fwd", "y");
  require_dtype(rstd, DType::f32, "rope_norm_fwd", "rstd");
  require(y.numel() == x.numel() && rstd.numel() == x.rows(), "rope_norm_fwd", "y or rstd has the wrong size");
  int64_t rows = x.rows();
  if (rows == 0) return;
  if (int lpr = rope_lanes_per_row(x.dim(3), {x.data, y.data, cos.data, sin.data})) {
    const int64_t per_block = int64_t(kWarps) * (32 / lpr);
    const unsigned nbv = unsigned((rows + per_block - 1) / per_block);
    MOELAB_FLOAT_DISPATCH(x.dtype, TX, MOELAB_FLOAT_DISPATCH(y.dtype, TY, MOELAB_LPR_DISPATCH(lpr, LPR,
        rope_norm_fwd_vec_kernel<TX, TY, LPR><<<nbv, 32 * kWarps, 0, stream_>>>(
            x.as<TX>(), cos.as<float>(), sin.as<float>(), y.as<TY>(), rstd.as<float>(), rows, int(x.dim(1)),
            int(x.dim(2)), kNormEps))));
    MOELAB_CUDA_LAUNCH_CHECK("rope_norm_fwd");
    return;
  }
  unsigned nb = unsigned((rows + kWarps - 1) / kWarps);
  MOELAB_FLOAT_DISPATCH(x.dtype, TX, MOELAB_FLOAT_DISPATCH(y.dtype, TY,
      rope_norm_fwd_kernel<TX, TY><<<nb, 32 * kWarps, 0, stream_>>>(
          x.as<TX>(), cos.as<float>(), sin.as<float>(), y.as<TY>(), rstd.as<float>(), rows, int(x.dim(1)),
          int(x.dim(2)), int(x.dim(3)), kNormEps)));
  MOELAB_CUDA_LAUNCH_CHECK("rope_norm_fwd");
}

void CudaBackend::rope_norm_bwd(const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& rstd,
                                const Tensor& dy, Tensor& dx, const AmaxSink* amax) {
  unsigned* am = tensor_amax_arg(amax, "rope_norm_bwd");
  check_rope(x, cos, sin, "rope_norm_bwd");
  require_float(dy, "rope_norm_bwd", "dy");
  require_float(dx, "rope_norm_bwd", "dx");
  require(x.dtype == dy.dtype, "rope_norm_bwd", "x and dy must share one dtype");
  require(dy.numel() == x.numel() && dx.numel() == x.numel() && rstd.numel() == x.rows(), "rope_norm_bwd",
          "shapes differ");
  int64_t rows = x.rows();
  if (rows == 0) return;
  if (int lpr = rope_lanes_per_row(x.dim(3), {x.data, dy.data, dx.data, cos.data, sin.data})) {
    const int64_t per_block = int64_t(kWarps) * (32 / lpr);
    const unsigned nbv = unsigned((rows + per_block - 1) / per_block);
    MOELAB_FLOAT_DISPATCH(x.dtype, T, MOELAB_FLOAT_DISPATCH(dx.dtype, TO, MOELAB_LPR_DISPATCH(lpr, LPR,
        rope_norm_bwd_vec_kernel<T, TO, LPR><<<nbv, 32 * kWarps, 0, stream_>>>(
            x.as<T>(), cos.as<float>(), sin.as<float>(), rstd.as<float>(), dy.as<T>(), dx.as<TO>(), rows,
            int(x.dim(1)), int(x.dim(2)), am))));
    MOELAB_CUDA_LAUNCH_CHECK("rope_norm_bwd");
    return;
  }
  unsigned nb = unsigned((rows + kWarps - 1) / kWarps);
  MOELAB_FLOAT_DISPATCH(x.dtype, T, MOELAB_FLOAT_DISPATCH(dx.dtype, TO,
      rope_norm_bwd_kernel<T, T, TO><<<nb, 32 * kWarps, 0, stream_>>>(
          x.as<T>(), cos.as<float>(), sin.as<float>(), rstd.as<float>(), dy.as<T>(), dx.as<TO>(), rows,
          int(x.dim(1)), int(x.dim(2)), int(x.dim(3)))));
  MOELAB_CUDA_LAUNCH_CHECK("rope_norm_bwd");
  if (am) raise_amax_by_pass(dx, amax->amax);
}

}  // namespace moelab
