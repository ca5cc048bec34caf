// Residual-stream mixing with learned scalars (y = a x + b x0, nanochat's per-layer lambdas) and
// the gated value embedding added to the attention's values, with their backwards. The scalars
// and gate weights are read on the device, so nothing returns to the host; their gradients are
// reduced through per-block partials summed in a fixed order (deterministic, no atomics).
#include <algorithm>
#include <initializer_list>

#include "backend/cuda/cuda_common.cuh"

namespace moelab {
using namespace cuda_detail;

namespace {

constexpr int kThreads = 256;
constexpr int kMixBlocks = 512;

template <class T>
__global__ void lambda_mix_fwd_kernel(const float* a, const T* x, const float* b, const T* x0, T* y, int64_t n) {
  const float av = a[0], bv = b[0];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = from_f32<T>(av * to_f32(x[i]) + bv * to_f32(x0[i]));
}

// Each element is read and written by one thread, so dx may alias dy.
template <class T>
__global__ void lambda_mix_bwd_kernel(const float* a, const T* x, const float* b, const T* x0, const T* dy, T* dx,
                                      T* dx0, int64_t n, float* partials) {
  __shared__ float shm[32];
  const float av = a[0], bv = b[0];
  float sa = 0.f, sb = 0.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float g = to_f32(dy[i]);
    sa += to_f32(x[i]) * g;
    sb += to_f32(x0[i]) * g;
    dx0[i] = from_f32<T>(to_f32(dx0[i]) + bv * g);
    dx[i] = from_f32<T>(av * g);
  }
  sa = block_sum(sa, shm);
  sb = block_sum(sb, shm);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = sa;
    partials[gridDim.x + blockIdx.x] = sb;
  }
}

__global__ void lambda_mix_final_kernel(const float* partials, int parts, float* da, float* db) {
  __shared__ float shm[32];
  float sa = 0.f, sb = 0.f;
  for (int i = threadIdx.x; i < parts; i += blockDim.x) {
    sa += partials[i];
    sb += partials[parts + i];
  }
  sa = block_sum(sa, shm);
  sb = block_sum(sb, shm);
  if (threadIdx.x == 0) {
    da[0] += sa;
    db[0] += sb;
  }
}

// One warp per (token n, head h): the gate logit over C channels, then the gated add over hd.
template <class T, class TG>
__global__ void value_gate_fwd_kernel(const T* x, const T* w, const T* ve, T* v, TG* gate, int N, int D, int H,
                                      int C, int hd) {
  const int warp = int((blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5), lane = threadIdx.x & 31;
  if (warp >= N * H) return;
  const int n = warp / H, h = warp - n * H;
  float z = 0.f;
  for (int c = lane; c < C; c += 32) z += to_f32(x[int64_t(n) * D + c]) * to_f32(w[int64_t(h) * C + c]);
  z = warp_sum(z);
  const float g = 2.f / (1.f + expf(-z));
  if (lane == 0) gate[warp] = from_f32<TG>(g);
  const int64_t o = int64_t(warp) * hd;
  for (int d = lane; d < hd; d += 32) v[o + d] = from_f32<T>(to_f32(v[o + d]) + g * to_f32(ve[o + d]));
}

// Pass 1, one warp per (n, h): dve = gate dv, and dz = <dv, ve> gate (1 - gate / 2) into scratch.
template <class T, class TG>
__global__ void value_gate_dz_kernel(const T* ve, const TG* gate, const T* dv, T* dve, float* dz, int NH, int hd) {
  const int warp = int((blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5), lane = threadIdx.x & 31;
  if (warp >= NH) return;
  const float g = to_f32(gate[warp]);
  const int64_t o = int64_t(warp) * hd;
  float dg = 0.f;
  for (int d = lane; d < hd; d += 32) {
    const float dvv = to_f32(dv[o + d]);
    dg += dvv * to_f32(ve[o + d]);
    dve[o + d] = from_f32<T>(g * dvv);
  }
  dg = warp_sum(dg);
  if (lane == 0) dz[warp] = dg * g * (1.f - 0.5f * g);
}

// Pass 2, one thread per (n, c): dx[n, c] += sum_h dz[n, h] w[h, c].
template <class T>
__global__ void value_gate_dx_kernel(const T* w, const float* dz, T* dx, int N, int D, int H, int C) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= int64_t(N) * C) return;
  const int n = int(i / C), c = int(i - int64_t(n) * C);
  float acc = 0.f;
  for (int h = 0; h < H; ++h) acc += dz[int64_t(n) * H + h] * to_f32(w[int64_t(h) * C + c]);
  dx[int64_t(n) * D + c] = from_f32<T>(to_f32(dx[int64_t(n) * D + c]) + acc);
}

// Pass 3, one block per (h, c): dw[h, c] += sum_n dz[n, h] x[n, c], in a fixed order.
template <class T, class TW>
__global__ void value_gate_dw_kernel(const T* x, const float* dz, TW* dw, int N, int D, int H, int C) {
  __shared__ float shm[32];
  const int h = blockIdx.x / C, c = blockIdx.x - h * C;
  float acc = 0.f;
  for (int n = threadIdx.x; n < N; n += blockDim.x) acc += dz[int64_t(n) * H + h] * to_f32(x[int64_t(n) * D + c]);
  acc = block_sum(acc, shm);
  if (threadIdx.x == 0) dw[blockIdx.x] = from_f32<TW>(to_f32(dw[blockIdx.x]) + acc);
}

struct GateDims {
  int N, D, H, C, hd;
};

GateDims gate_dims(const Tensor& x, const Tensor& w, const Tensor& ve, const Tensor& gate, const char* op) {
  require(x.ndim() == 2 && w.ndim() == 2, op, "x must be [N, D] and w [H, C], got " + x.describe() + ", " + w.describe());
  GateDims d{int(x.dim(0)), int(x.dim(1)), int(w.dim(0)), int(w.dim(1)), 0};
  require(d.C > 0 && d.C <= d.D, op, "w " + w.describe() + " reads more columns than x " + x.describe() + " has");
  require(d.H > 0 && ve.numel() > 0 && ve.numel() % (int64_t(d.N) * d.H) == 0, op,
          "ve " + ve.describe() + " is not [N, H * hd]");
  d.hd = int(ve.numel() / (int64_t(d.N) * d.H));
  require(gate.numel() == int64_t(d.N) * d.H, op, "gate must be [N, H], got " + gate.describe());
  require(x.dtype == w.dtype && x.dtype == ve.dtype, op, "x, w and ve must share the act dtype");
  return d;
}

}  // namespace

void CudaBackend::lambda_mix_fwd(const Tensor& a, const Tensor& x, const Tensor& b, const Tensor& x0, Tensor& y) {
  const char* op = "lambda_mix_fwd";
  require_dtype(a, DType::f32, op, "a");
  require_dtype(b, DType::f32, op, "b");
  require_float(x, op, "x");
  require(x0.dtype == x.dtype && y.dtype == x.dtype && x0.numel() == x.numel() && y.numel() == x.numel(), op,
          "x, x0 and y must share dtype and size");
  const int64_t n = x.numel();
  if (n == 0) return;
  MOELAB_FLOAT_DISPATCH(x.dtype, T,
                        lambda_mix_fwd_kernel<T><<<grid_for(n, kThreads, 4096), kThreads, 0, stream_>>>(
                            a.as<float>(), x.as<T>(), b.as<float>(), x0.as<T>(), y.as<T>(), n));
  MOELAB_CUDA_LAUNCH_CHECK("lambda_mix_fwd");
}

void CudaBackend::lambda_mix_bwd(const Tensor& a, const Tensor& x, const Tensor& b, const Tensor& x0, const Tensor& dy,
                                 Tensor& dx, Tensor& dx0, Tensor& da, Tensor& db) {
  const char* op = "lambda_mix_bwd";
  for (const Tensor* t : std::initializer_list<const Tensor*>{&a, &b, &da, &db}) require_dtype(*t, DType::f32, op, "scalar");
  require_float(x, op, "x");
  const int64_t n = x.numel();
  for (const Tensor* t : std::initializer_list<const Tensor*>{&x0, &dy, &dx, &dx0})
    require(t->dtype == x.dtype && t->numel() == n, op, "x, x0, dy, dx and dx0 must share dtype and size");
  auto* partials = static_cast<float*>(scratch(ScratchSlot::reduce, (2 * kMixBlocks + 32) * sizeof(float)));
  const int nb = int(std::min<int64_t>(kMixBlocks, std::max<int64_t>(1, (n + kThreads - 1) / kThreads)));
  MOELAB_FLOAT_DISPATCH(x.dtype, T,
                        lambda_mix_bwd_kernel<T><<<nb, kThreads, 0, stream_>>>(
                            a.as<float>(), x.as<T>(), b.as<float>(), x0.as<T>(), dy.as<T>(), dx.as<T>(), dx0.as<T>(),
                            n, partials));
  MOELAB_CUDA_LAUNCH_CHECK("lambda_mix_bwd");
  lambda_mix_final_kernel<<<1, 512, 0, stream_>>>(partials, nb, da.as<float>(), db.as<float>());
  MOELAB_CUDA_LAUNCH_CHECK("lambda_mix_final");
}

void CudaBackend::value_gate_fwd(const Tensor& x, const Tensor& w, const Tensor& ve, Tensor& v, Tensor& gate) {
  const char* op = "value_gate_fwd";
  require_float(x, op, "x");
  require_dtype(gate, DType::f32, op, "gate");
  const GateDims d = gate_dims(x, w, ve, gate, op);
  require(v.dtype == x.dtype && v.numel() == ve.numel(), op, "v must be like ve");
  const int64_t warps = int64_t(d.N) * d.H;
  if (warps == 0) return;
  MOELAB_FLOAT_DISPATCH(x.dtype, T,
                        value_gate_fwd_kernel<T, float><<<grid_for(warps * 32, kThreads), kThreads, 0, stream_>>>(
                            x.as<T>(), w.as<T>(), ve.as<T>(), v.as<T>(), gate.as<float>(), d.N, d.D, d.H, d.C, d.hd));
  MOELAB_CUDA_LAUNCH_CHECK("value_gate_fwd");
}

void CudaBackend::value_gate_bwd(const Tensor& x, const Tensor& w, const Tensor& ve, const Tensor& gate,
                                 const Tensor& dv, Tensor& dve, Tensor& dw, Tensor& dx) {
  const char* op = "value_gate_bwd";
  require_float(x, op, "x");
  require_dtype(gate, DType::f32, op, "gate");
  require_dtype(dw, DType::f32, op, "dw");
  const GateDims d = gate_dims(x, w, ve, gate, op);
  require(dv.dtype == x.dtype && dve.dtype == x.dtype && dv.numel() == ve.numel() && dve.numel() == ve.numel(), op,
          "dv and dve must be like ve");
  require(dw.shape == w.shape && dx.dtype == x.dtype && dx.shape == x.shape, op, "dw must be like w and dx like x");
  const int64_t NH = int64_t(d.N) * d.H;
  if (NH == 0) return;
  auto* dz = static_cast<float*>(scratch(ScratchSlot::value_gate, size_t(NH) * sizeof(float)));
  MOELAB_FLOAT_DISPATCH(x.dtype, T, {
    value_gate_dz_kernel<T, float><<<grid_for(NH * 32, kThreads), kThreads, 0, stream_>>>(
        ve.as<T>(), gate.as<float>(), dv.as<T>(), dve.as<T>(), dz, int(NH), d.hd);
    MOELAB_CUDA_LAUNCH_CHECK("value_gate_dz");
    value_gate_dx_kernel<T><<<grid_for(int64_t(d.N) * d.C, kThreads), kThreads, 0, stream_>>>(
        w.as<T>(), dz, dx.as<T>(), d.N, d.D, d.H, d.C);
    MOELAB_CUDA_LAUNCH_CHECK("value_gate_dx");
    value_gate_dw_kernel<T, float><<<d.H * d.C, kThreads, 0, stream_>>>(x.as<T>(), dz, dw.as<float>(), d.N, d.D,
                                                                         d.H, d.C);
    MOELAB_CUDA_LAUNCH_CHECK("value_gate_dw");
  });
}

}  // namespace moelab
