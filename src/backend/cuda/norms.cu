// Parameter-free RMSNorm over the last dim, and rotary embedding followed by per-head RMSNorm
// (QK-norm), forward and backward. One warp per row: rows are short (d_model or head_dim), so a
// warp keeps the row's statistics in registers and needs no shared memory or block barriers.
// The backward recomputes the rotated values instead of storing them.
#include "backend/cuda/cuda_common.cuh"

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

void CudaBackend::rmsnorm_fwd(const Tensor& x, Tensor& y, Tensor& rstd) {
  require_float(x, "rmsnorm_fwd", "x");
  require_float(y, "rmsnorm_fwd", "y");
  require_dtype(rstd, DType::f32, "rmsnorm_fwd", "rstd");
  require(x.numel() == y.numel() && rstd.numel() == x.rows(), "rmsnorm_fwd", "shapes differ: " + x.describe() +
          ", " + y.describe() + ", " + rstd.describe());
  int64_t rows = x.rows();
  if (rows == 0) return;
  unsigned nb = unsigned((rows + kWarps - 1) / kWarps);
  MOELAB_FLOAT_DISPATCH(x.dtype, TX, MOELAB_FLOAT_DISPATCH(y.dtype, TY,
      rmsnorm_fwd_kernel<TX, TY><<<nb, 32 * kWarps, 0, stream_>>>(x.as<TX>(), y.as<TY>(), rstd.as<float>(), rows,
                                                                  int(x.cols()), kNormEps)));
  MOELAB_CUDA_LAUNCH_CHECK("rmsnorm_fwd");
}

void CudaBackend::rmsnorm_bwd(const Tensor& x, const Tensor& rstd, const Tensor& dy, Tensor& dx, bool accumulate) {
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
  MOELAB_FLOAT_DISPATCH(x.dtype, T, MOELAB_FLOAT_DISPATCH(dx.dtype, TO,
      rmsnorm_bwd_kernel<T, T, TO><<<nb, 32 * kWarps, 0, stream_>>>(x.as<T>(), rstd.as<float>(), dy.as<T>(),
                                                                    dx.as<TO>(), rows, int(x.cols()), accumulate)));
  MOELAB_CUDA_LAUNCH_CHECK("rmsnorm_bwd");
}

void CudaBackend::rope_norm_fwd(const Tensor& x, const Tensor& cos, const Tensor& sin, Tensor& y, Tensor& rstd) {
  check_rope(x, cos, sin, "rope_norm_fwd");
  require_float(y, "rope_norm_fwd", "y");
  require_dtype(rstd, DType::f32, "rope_norm_fwd", "rstd");
  require(y.numel() == x.numel() && rstd.numel() == x.rows(), "rope_norm_fwd", "y or rstd has the wrong size");
  int64_t rows = x.rows();
  if (rows == 0) return;
  unsigned nb = unsigned((rows + kWarps - 1) / kWarps);
  MOELAB_FLOAT_DISPATCH(x.dtype, TX, MOELAB_FLOAT_DISPATCH(y.dtype, TY,
      rope_norm_fwd_kernel<TX, TY><<<nb, 32 * kWarps, 0, stream_>>>(
          x.as<TX>(), cos.as<float>(), sin.as<float>(), y.as<TY>(), rstd.as<float>(), rows, int(x.dim(1)),
          int(x.dim(2)), int(x.dim(3)), kNormEps)));
  MOELAB_CUDA_LAUNCH_CHECK("rope_norm_fwd");
}

void CudaBackend::rope_norm_bwd(const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& rstd,
                                const Tensor& dy, Tensor& dx) {
  check_rope(x, cos, sin, "rope_norm_bwd");
  require_float(dy, "rope_norm_bwd", "dy");
  require_float(dx, "rope_norm_bwd", "dx");
  require(x.dtype == dy.dtype, "rope_norm_bwd", "x and dy must share one dtype");
  require(dy.numel() == x.numel() && dx.numel() == x.numel() && rstd.numel() == x.rows(), "rope_norm_bwd",
          "shapes differ");
  int64_t rows = x.rows();
  if (rows == 0) return;
  unsigned nb = unsigned((rows + kWarps - 1) / kWarps);
  MOELAB_FLOAT_DISPATCH(x.dtype, T, MOELAB_FLOAT_DISPATCH(dx.dtype, TO,
      rope_norm_bwd_kernel<T, T, TO><<<nb, 32 * kWarps, 0, stream_>>>(
          x.as<T>(), cos.as<float>(), sin.as<float>(), rstd.as<float>(), dy.as<T>(), dx.as<TO>(), rows,
          int(x.dim(1)), int(x.dim(2)), int(x.dim(3)))));
  MOELAB_CUDA_LAUNCH_CHECK("rope_norm_bwd");
}

}  // namespace moelab
