// NorMuon's tail after orthogonalization: per-row (or per-column) mean squares of each matrix of
// a stack, their EMA, the variance-normalized update rescaled to keep the matrix's norm, and the
// parameter update with cautious weight decay. Three kernels: statistics, one block per matrix
// for the EMA and the two norms (fixed-order sums), then the elementwise update.
#include <algorithm>

#include "backend/cuda/cuda_common.cuh"

namespace moelab {
using namespace cuda_detail;

namespace {

constexpr int kThreads = 256;

// Per row (m >= n): one warp per row, lanes over its n columns.
template <class T>
__global__ void row_meansq_kernel(const T* x, int64_t rows, int n, float* q) {
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= rows) return;
  const T* r = x + warp * n;
  float s = 0.f;
  for (int j = lane; j < n; j += 32) {
    const float v = to_f32(r[j]);
    s += v * v;
  }
  s = warp_sum(s);
  if (lane == 0) q[warp] = s / float(n);
}

// Per column (m < n): one thread per (matrix, column), walking the m rows (coalesced across threads).
template <class T>
__global__ void col_meansq_kernel(const T* x, int G, int m, int n, float* q) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= int64_t(G) * n) return;
  const int64_t g = i / n, j = i - g * n;
  const T* xg = x + g * int64_t(m) * n;
  float s = 0.f;
  for (int r = 0; r < m; ++r) {
    const float v = to_f32(xg[int64_t(r) * n + j]);
    s += v * v;
  }
  q[i] = s / float(m);
}

// One block per matrix: v2 = lerp(v2, q, 1 - beta2); q <- s = rsqrt(max(v2, 1e-10));
// keep[g] = sqrt(sum q R) / max(sqrt(sum q R s^2), 1e-10).
__global__ void normuon_stats_kernel(float* q, float* v2, int kept, int R, float beta2, float* keep) {
  __shared__ float shm[32];
  float* qg = q + int64_t(blockIdx.x) * kept;
  float* vg = v2 + int64_t(blockIdx.x) * kept;
  float norm2 = 0.f, scaled2 = 0.f;
  for (int r = threadIdx.x; r < kept; r += blockDim.x) {
    const float qr = qg[r];
    const float v = vg[r] + (1.f - beta2) * (qr - vg[r]);
    vg[r] = v;
    const float s = rsqrtf(fmaxf(v, 1e-10f));
    norm2 += qr * float(R);
    scaled2 += qr * float(R) * s * s;
    qg[r] = s;
  }
  norm2 = block_sum(norm2, shm);
  scaled2 = block_sum(scaled2, shm);
  if (threadIdx.x == 0) keep[blockIdx.x] = sqrtf(norm2) / fmaxf(sqrtf(scaled2), 1e-10f);
}

template <class T>
__global__ void normuon_apply_kernel(const T* x, float* p, const float* s, const float* keep, int G, int m, int n,
                                     bool per_row, float lr, float wd, bool cautious) {
  const int64_t total = int64_t(G) * m * n;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t g = i / (int64_t(m) * n), within = i - g * int64_t(m) * n;
    const int64_t r = per_row ? within / n : within % n;
    const float u = to_f32(x[i]) * s[g * (per_row ? m : n) + r] * keep[g];
    const float pv = p[i];
    const bool decay = !cautious || u * pv >= 0.f;
    p[i] = pv - lr * u - (decay ? lr * wd * pv : 0.f);
  }
}

}  // namespace

void CudaBackend::normuon_update(const Tensor& x, Tensor& second_moment, Tensor& param, const NorMuonStep& st) {
  const char* op = "normuon_update";
  require_float(x, op, "x");
  require_dtype(second_moment, DType::f32, op, "second_moment");
  require_dtype(param, DType::f32, op, "param");
  require(x.ndim() == 3 && param.shape == x.shape, op, "x and param must be one [G, m, n] stack");
  const int G = int(x.dim(0)), m = int(x.dim(1)), n = int(x.dim(2));
  const bool per_row = m >= n;
  const int kept = per_row ? m : n, R = per_row ? n : m;
  require(second_moment.numel() == int64_t(G) * kept, op, "second_moment must hold one value per kept row/column");
  if (int64_t(G) * m * n == 0) return;
  auto* q = static_cast<float*>(scratch(ScratchSlot::normuon, (size_t(G) * kept + size_t(G)) * sizeof(float)));
  float* keep = q + int64_t(G) * kept;
  MOELAB_FLOAT_DISPATCH(x.dtype, T, {
    if (per_row)
      row_meansq_kernel<T><<<grid_for(int64_t(G) * m * 32, kThreads), kThreads, 0, stream_>>>(x.as<T>(), int64_t(G) * m,
                                                                                             n, q);
    else
      col_meansq_kernel<T><<<grid_for(int64_t(G) * n, kThreads), kThreads, 0, stream_>>>(x.as<T>(), G, m, n, q);
    MOELAB_CUDA_LAUNCH_CHECK("normuon_meansq");
    normuon_stats_kernel<<<G, 512, 0, stream_>>>(q, second_moment.as<float>(), kept, R, st.beta2, keep);
    MOELAB_CUDA_LAUNCH_CHECK("normuon_stats");
    normuon_apply_kernel<T><<<grid_for(int64_t(G) * m * n, kThreads, 4096), kThreads, 0, stream_>>>(
        x.as<T>(), param.as<float>(), q, keep, G, m, n, per_row, st.lr, st.weight_decay, st.cautious);
    MOELAB_CUDA_LAUNCH_CHECK("normuon_apply");
  });
}

}  // namespace moelab
