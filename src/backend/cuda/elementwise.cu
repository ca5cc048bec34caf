// Elementwise ops: fill, dtype-converting copy, axpby and ReLU^2 forward/backward. Grid-stride
// loops over flat element indices; each kernel is templated on the storage types so f32 and bf16
// tensors mix freely (the arithmetic is f32). Where every operand is 16-byte aligned and the
// length a multiple of 8, the loops move 8 elements per access (the scalar bf16 loops reach only
// part of the memory bandwidth these bandwidth-bound ops live on).
#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/expert_amax.cuh"

namespace moelab {
using namespace cuda_detail;

namespace {

template <class T>
__global__ void fill_kernel(T* p, int64_t n, float v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    p[i] = from_f32<T>(v);
}
__global__ void fill_i32_kernel(int32_t* p, int64_t n, int32_t v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    p[i] = v;
}

template <class TS, class TD>
__global__ void convert_kernel(const TS* s, TD* d, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    d[i] = from_f32<TD>(to_f32(s[i]));
}

// Counts (i32) into float statistics; exact below 2^24.
template <class TD>
__global__ void i32_to_float_kernel(const int32_t* s, TD* d, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    d[i] = from_f32<TD>(float(s[i]));
}

// Float to i32, rounding to nearest even (as the CPU's convert does).
template <class TS>
__global__ void float_to_i32_kernel(const TS* s, int32_t* d, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    d[i] = __float2int_rn(to_f32(s[i]));
}

template <class TX, class TY>
__global__ void axpby_kernel(float a, const TX* x, float b, TY* y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float r = a * to_f32(x[i]);
    if (b != 0.f) r += b * to_f32(y[i]);
    y[i] = from_f32<TY>(r);
  }
}

// The vector forms: i counts 8-element chunks, n8 = n / 8.
template <class TS, class TD>
__global__ void convert_vec_kernel(const TS* s, TD* d, int64_t n8) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n8; i += int64_t(gridDim.x) * blockDim.x) {
    float v[8];
    load8(s + 8 * i, v);
    store8(d + 8 * i, v);
  }
}

template <class TX, class TY>
__global__ void axpby_vec_kernel(float a, const TX* x, float b, TY* y, int64_t n8) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n8; i += int64_t(gridDim.x) * blockDim.x) {
    float xv[8], yv[8];
    load8(x + 8 * i, xv);
    if (b != 0.f) load8(y + 8 * i, yv);
#pragma unroll
    for (int k = 0; k < 8; ++k) yv[k] = a * xv[k] + (b != 0.f ? b * yv[k] : 0.f);
    store8(y + 8 * i, yv);
  }
}

template <class TH, class TA>
__global__ void relu2_fwd_vec_kernel(const TH* h, TA* a, int64_t n8) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n8; i += int64_t(gridDim.x) * blockDim.x) {
    float v[8];
    load8(h + 8 * i, v);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float r = fmaxf(v[k], 0.f);
      v[k] = r * r;
    }
    store8(a + 8 * i, v);
  }
}

template <class T>
__global__ void relu2_bwd_vec_kernel(const T* h, const T* da, T* dh, int64_t n8) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n8; i += int64_t(gridDim.x) * blockDim.x) {
    float hv[8], dv[8];
    load8(h + 8 * i, hv);
    load8(da + 8 * i, dv);
#pragma unroll
    for (int k = 0; k < 8; ++k) dv[k] *= 2.f * fmaxf(hv[k], 0.f);
    store8(dh + 8 * i, dv);
  }
}

// ReLU² of the experts' hidden rows (rows of cols8 8-element chunks, in expert order) that also
// raises each expert's amax of its output: each block walks a contiguous range of chunks, so a
// thread's rows stay with one expert for long stretches.
template <class TH, class TA>
__global__ void relu2_fwd_experts_kernel(const TH* h, TA* a, int64_t n8, int64_t cols8, ExpertAmaxArgs am) {
  __shared__ unsigned s_amax[kSharedExperts];
  unsigned* shared = begin_block_amax(am, s_amax);
  ExpertAmaxRun run;
  const ChunkRange range = block_chunks(n8);
  for (int64_t i = range.begin + threadIdx.x; i < range.end; i += blockDim.x) {
    float v[8], m = 0.f;
    load8(h + 8 * i, v);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float r = fmaxf(v[k], 0.f);
      v[k] = r * r;
      m = fmaxf(m, stored<TA>(v[k]));
    }
    store8(a + 8 * i, v);
    run.add(i / cols8, m, am, shared);
  }
  finish_block_amax(run, am, shared);
}

// ReLU²'s backward over the experts' rows, raising each expert's amax of dh (as above).
template <class T>
__global__ void relu2_bwd_experts_kernel(const T* h, const T* da, T* dh, int64_t n8, int64_t cols8, ExpertAmaxArgs am) {
  __shared__ unsigned s_amax[kSharedExperts];
  unsigned* shared = begin_block_amax(am, s_amax);
  ExpertAmaxRun run;
  const ChunkRange range = block_chunks(n8);
  for (int64_t i = range.begin + threadIdx.x; i < range.end; i += blockDim.x) {
    float hv[8], dv[8], m = 0.f;
    load8(h + 8 * i, hv);
    load8(da + 8 * i, dv);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      dv[k] *= 2.f * fmaxf(hv[k], 0.f);
      m = fmaxf(m, fabsf(stored<T>(dv[k])));
    }
    store8(dh + 8 * i, dv);
    run.add(i / cols8, m, am, shared);
  }
  finish_block_amax(run, am, shared);
}

template <class TH, class TA>
__global__ void relu2_fwd_kernel(const TH* h, TA* a, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float v = fmaxf(to_f32(h[i]), 0.f);
    a[i] = from_f32<TA>(v * v);
  }
}

template <class TH, class TD, class TO>
__global__ void relu2_bwd_kernel(const TH* h, const TD* da, TO* dh, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float v = fmaxf(to_f32(h[i]), 0.f);
    dh[i] = from_f32<TO>(2.f * v * to_f32(da[i]));
  }
}

constexpr int kThreads = 256;
unsigned blocks(int64_t n) { return grid_for(n, kThreads, 132 * 32); }

// True when n elements at each pointer can go through the 8-wide kernels.
bool vectorizable(int64_t n, std::initializer_list<const void*> ptrs) {
  if (n % 8 != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

void require_same_numel(const Tensor& a, const Tensor& b, const char* op) {
  require(a.numel() == b.numel(), op, "element counts differ: " + a.describe() + " vs " + b.describe());
}

}  // namespace

void CudaBackend::fill(Tensor& t, float value) {
  require_cuda(t, "fill", "t");
  int64_t n = t.numel();
  if (n == 0) return;
  if (t.dtype == DType::i32) {
    fill_i32_kernel<<<blocks(n), kThreads, 0, stream_>>>(t.as<int32_t>(), n, int32_t(value));
  } else {
    MOELAB_FLOAT_DISPATCH(t.dtype, T, fill_kernel<T><<<blocks(n), kThreads, 0, stream_>>>(t.as<T>(), n, value));
  }
  MOELAB_CUDA_LAUNCH_CHECK("fill");
}

void CudaBackend::copy(const Tensor& src, Tensor& dst) {
  require_cuda(src, "copy", "src");
  require_cuda(dst, "copy", "dst");
  require_same_numel(src, dst, "copy");
  int64_t n = src.numel();
  if (n == 0 || src.data == dst.data) return;
  if (src.dtype == dst.dtype) {
    MOELAB_CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data, src.bytes(), cudaMemcpyDeviceToDevice, stream_));
    return;
  }
  if (src.dtype == DType::i32) {
    MOELAB_FLOAT_DISPATCH(dst.dtype, TD,
        i32_to_float_kernel<TD><<<blocks(n), kThreads, 0, stream_>>>(src.as<int32_t>(), dst.as<TD>(), n));
  } else if (dst.dtype == DType::i32) {
    MOELAB_FLOAT_DISPATCH(src.dtype, TS,
        float_to_i32_kernel<TS><<<blocks(n), kThreads, 0, stream_>>>(src.as<TS>(), dst.as<int32_t>(), n));
  } else if (vectorizable(n, {src.data, dst.data})) {
    MOELAB_FLOAT_DISPATCH(src.dtype, TS, MOELAB_FLOAT_DISPATCH(dst.dtype, TD,
        convert_vec_kernel<TS, TD><<<blocks(n / 8), kThreads, 0, stream_>>>(src.as<TS>(), dst.as<TD>(), n / 8)));
  } else {
    MOELAB_FLOAT_DISPATCH(src.dtype, TS, MOELAB_FLOAT_DISPATCH(dst.dtype, TD,
        convert_kernel<TS, TD><<<blocks(n), kThreads, 0, stream_>>>(src.as<TS>(), dst.as<TD>(), n)));
  }
  MOELAB_CUDA_LAUNCH_CHECK("copy");
}

void CudaBackend::axpby(float a, const Tensor& x, float b, Tensor& y) {
  require_float(x, "axpby", "x");
  require_float(y, "axpby", "y");
  require_same_numel(x, y, "axpby");
  int64_t n = x.numel();
  if (n == 0) return;
  if (vectorizable(n, {x.data, y.data})) {
    MOELAB_FLOAT_DISPATCH(x.dtype, TX, MOELAB_FLOAT_DISPATCH(y.dtype, TY,
        axpby_vec_kernel<TX, TY><<<blocks(n / 8), kThreads, 0, stream_>>>(a, x.as<TX>(), b, y.as<TY>(), n / 8)));
  } else {
    MOELAB_FLOAT_DISPATCH(x.dtype, TX, MOELAB_FLOAT_DISPATCH(y.dtype, TY,
        axpby_kernel<TX, TY><<<blocks(n), kThreads, 0, stream_>>>(a, x.as<TX>(), b, y.as<TY>(), n)));
  }
  MOELAB_CUDA_LAUNCH_CHECK("axpby");
}


void CudaBackend::relu2_fwd(const Tensor& h, Tensor& a, const AmaxSink* amax) {
  require_float(h, "relu2_fwd", "h");
  require_float(a, "relu2_fwd", "a");
  require_same_numel(h, a, "relu2_fwd");
  int64_t n = h.numel();
  if (n == 0) return;
  if (amax) {
    const ExpertAmaxArgs am = expert_amax_args(*amax, a, vectorizable(n, {h.data, a.data}), "relu2_fwd");
    MOELAB_FLOAT_DISPATCH(h.dtype, TH, MOELAB_FLOAT_DISPATCH(a.dtype, TA,
        relu2_fwd_experts_kernel<TH, TA><<<blocks(n / 8), kThreads, 0, stream_>>>(h.as<TH>(), a.as<TA>(), n / 8,
                                                                                  a.cols() / 8, am)));
  } else if (vectorizable(n, {h.data, a.data})) {
    MOELAB_FLOAT_DISPATCH(h.dtype, TH, MOELAB_FLOAT_DISPATCH(a.dtype, TA,
        relu2_fwd_vec_kernel<TH, TA><<<blocks(n / 8), kThreads, 0, stream_>>>(h.as<TH>(), a.as<TA>(), n / 8)));
  } else {
    MOELAB_FLOAT_DISPATCH(h.dtype, TH, MOELAB_FLOAT_DISPATCH(a.dtype, TA,
        relu2_fwd_kernel<TH, TA><<<blocks(n), kThreads, 0, stream_>>>(h.as<TH>(), a.as<TA>(), n)));
  }
  MOELAB_CUDA_LAUNCH_CHECK("relu2_fwd");
}

void CudaBackend::relu2_bwd(const Tensor& h, const Tensor& da, Tensor& dh, const AmaxSink* amax) {
  require_float(h, "relu2_bwd", "h");
  require_float(da, "relu2_bwd", "da");
  require_float(dh, "relu2_bwd", "dh");
  require_same_numel(h, da, "relu2_bwd");
  require_same_numel(h, dh, "relu2_bwd");
  int64_t n = h.numel();
  if (n == 0) return;
  require(h.dtype == da.dtype && da.dtype == dh.dtype, "relu2_bwd", "h, da and dh must share one dtype");
  if (amax) {
    const ExpertAmaxArgs am =
        expert_amax_args(*amax, dh, vectorizable(n, {h.data, da.data, dh.data}), "relu2_bwd");
    MOELAB_FLOAT_DISPATCH(h.dtype, T,
        relu2_bwd_experts_kernel<T><<<blocks(n / 8), kThreads, 0, stream_>>>(h.as<T>(), da.as<T>(), dh.as<T>(), n / 8,
                                                                          dh.cols() / 8, am));
  } else if (vectorizable(n, {h.data, da.data, dh.data})) {
    MOELAB_FLOAT_DISPATCH(h.dtype, T,
        relu2_bwd_vec_kernel<T><<<blocks(n / 8), kThreads, 0, stream_>>>(h.as<T>(), da.as<T>(), dh.as<T>(), n / 8));
  } else {
    MOELAB_FLOAT_DISPATCH(h.dtype, T,
        relu2_bwd_kernel<T, T, T><<<blocks(n), kThreads, 0, stream_>>>(h.as<T>(), da.as<T>(), dh.as<T>(), n));
  }
  MOELAB_CUDA_LAUNCH_CHECK("relu2_bwd");
}

}  // namespace moelab
