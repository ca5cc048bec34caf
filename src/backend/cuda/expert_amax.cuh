// AmaxSink per expert on the GPU (backend/ops/fp8_types.hpp): the producers of an expert-ordered operand raise each
// expert's absolute maximum as they write it, so the FP8 expert GEMM that reads it needs no amax
// pass. A row's expert is found by binary search of the offsets; maxima are atomicMax'ed as f32
// bits (non-negative floats order like their bit patterns), after combining within a warp or a
// block so an expert takes few atomics. fmaxf skips NaN, as the GEMM's own amax pass does.
#pragma once
#include <cstdint>

#include "backend/cuda/cuda_common.cuh"

namespace moelab::cuda_detail {

struct ExpertAmaxArgs {
  unsigned* amax = nullptr;  // f32 [E] as bits; null: no amax wanted
  const int32_t* offsets = nullptr;
  int E = 0;
};

// The kernels' view of an AmaxSink per expert for rows of `cols` elements of out (8-element chunks that
// never cross a row, as FP8's 16-element rows guarantee).
inline ExpertAmaxArgs expert_amax_args(const AmaxSink& m, const Tensor& out, bool vectorized, const char* op) {
  require(m.per_expert(), op, "amax must be an AmaxSink per expert (with offsets): the rows are in expert order");
  require_dtype(m.amax, DType::f32, op, "amax.amax");
  require_dtype(m.offsets, DType::i32, op, "amax.offsets");
  require(m.offsets.numel() == m.amax.numel() + 1, op,
          "amax.offsets must be [E+1] beside amax [E], got " + m.offsets.describe() + " and " + m.amax.describe());
  require(vectorized && out.cols() % 8 == 0, op,
          "an expert amax needs rows of a multiple of 8 elements, 16-byte aligned, got " + out.describe());
  ExpertAmaxArgs a;
  a.amax = m.amax.as<unsigned>();
  a.offsets = m.offsets.as<int32_t>();
  a.E = int(m.amax.numel());
  return a;
}

// Experts up to this many take a block's shared array; more go straight to global atomics.
constexpr int kSharedExperts = 256;

// The expert whose rows [offsets[e], offsets[e+1]) hold r (the last e with offsets[e] <= r, so
// empty experts are passed over), or -1 past the experts' rows (capacity dispatch's tail).
__device__ __forceinline__ int expert_of_row(int64_t r, const int32_t* offsets, int E) {
  if (r >= offsets[E]) return -1;
  int lo = 0, hi = E;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (offsets[mid] <= r) lo = mid;
    else hi = mid;
  }
  return lo;
}

__device__ __forceinline__ void raise_amax(unsigned* p, float m) {
  if (m > 0.f) atomicMax(p, __float_as_uint(m));
}

// The value v as a T output stores it.
template <class T>
__device__ __forceinline__ float stored(float v) {
  return to_f32(from_f32<T>(v));
}

// A whole tensor's amax (the dense producers): every thread of the block calls this with the
// largest |value| it wrote, and the block raises *amax once. Rounding to the output's dtype is
// monotonic and odd, so a producer may take the max in f32 and round it once (stored(max) is the
// max of the stored values). Call from uniform control flow (it synchronizes).
__device__ __forceinline__ void raise_block_amax(unsigned* amax, float m) {
  __shared__ float part[32];
  m = warp_max(m);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    float b = 0.f;
    for (int w = 0; w < int(blockDim.x >> 5); ++w) b = fmaxf(b, part[w]);
    raise_amax(amax, b);
  }
}

// The kernels' view of a tensor amax (f32 [1] on the device), null when none is wanted: a known
// amax a quantization reads, or a whole-tensor AmaxSink a producer raises.
inline unsigned* tensor_amax_arg(const Tensor* amax, const char* op) {
  if (!amax) return nullptr;
  require_dtype(*amax, DType::f32, op, "amax");
  require(amax->numel() == 1, op, "amax must be f32 [1], got " + amax->describe());
  return amax->as<unsigned>();
}
inline unsigned* tensor_amax_arg(const AmaxSink* sink, const char* op) {
  if (!sink) return nullptr;
  require(!sink->per_expert(), op, "amax must be a whole-tensor AmaxSink (no offsets)");
  return tensor_amax_arg(&sink->amax, op);
}

// For kernels whose warps each write one row: every thread of the block calls this with its
// warp's row expert e and maximum m (read from lane 0), and the block raises each expert it
// touched once. Call from uniform control flow (it synchronizes).
template <int kWarps>
__device__ void raise_rows_amax(const ExpertAmaxArgs& a, int e, float m) {
  __shared__ int s_e[kWarps];
  __shared__ float s_m[kWarps];
  const int warp = int(threadIdx.x >> 5);
  if ((threadIdx.x & 31) == 0) {
    s_e[warp] = e;
    s_m[warp] = m;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int ce = -1;
    float cm = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      if (s_e[w] != ce) {
        if (ce >= 0) raise_amax(a.amax + ce, cm);
        ce = s_e[w];
        cm = 0.f;
      }
      cm = fmaxf(cm, s_m[w]);
    }
    if (ce >= 0) raise_amax(a.amax + ce, cm);
  }
}

// For element-wise kernels whose threads walk a block's contiguous range of 8-element chunks:
// each thread keeps its current expert's running maximum and hands it to the block's shared
// array when its rows move to another expert and at the end (finish_block).
struct ExpertAmaxRun {
  int e = -1;
  float m = 0.f;
  int64_t lo = 0, hi = 0;  // the current expert's rows

  __device__ void add(int64_t row, float v, const ExpertAmaxArgs& a, unsigned* shared) {
    if (row < lo || row >= hi) {
      flush(a, shared);
      e = expert_of_row(row, a.offsets, a.E);
      lo = e < 0 ? a.offsets[a.E] : a.offsets[e];
      hi = e < 0 ? INT64_MAX : a.offsets[e + 1];
    }
    m = fmaxf(m, v);
  }
  __device__ void flush(const ExpertAmaxArgs& a, unsigned* shared) {
    if (e >= 0) raise_amax(shared ? shared + e : a.amax + e, m);
    m = 0.f;
  }
};

// This block's contiguous share [begin, end) of n8 chunks (the walk ExpertAmaxRun expects).
struct ChunkRange {
  int64_t begin, end;
};
__device__ __forceinline__ ChunkRange block_chunks(int64_t n8) {
  const int64_t per_block = (n8 + gridDim.x - 1) / gridDim.x, begin = blockIdx.x * per_block;
  return {begin, begin + per_block < n8 ? begin + per_block : n8};
}

// The block's shared maxima, zeroed (null when there are too many experts). Call from every
// thread at the start of the kernel.
__device__ __forceinline__ unsigned* begin_block_amax(const ExpertAmaxArgs& a, unsigned* s) {
  if (a.E > kSharedExperts) return nullptr;
  for (int i = int(threadIdx.x); i < a.E; i += int(blockDim.x)) s[i] = 0;
  __syncthreads();
  return s;
}

// Every thread at the end of a kernel that gathered its maxima in the block's shared array
// (begin_block_amax): the block raises the global maxima once per expert. No-op without one.
__device__ __forceinline__ void flush_block_amax(const ExpertAmaxArgs& a, unsigned* shared) {
  if (!shared) return;
  __syncthreads();
  for (int i = int(threadIdx.x); i < a.E; i += int(blockDim.x))
    if (shared[i]) atomicMax(a.amax + i, shared[i]);
}

// Every thread at the end: a warp whose lanes share one expert reduces first, then the block
// raises the global maxima once per expert.
__device__ __forceinline__ void finish_block_amax(ExpertAmaxRun& run, const ExpertAmaxArgs& a, unsigned* shared) {
  const int e0 = __shfl_sync(0xffffffffu, run.e, 0);
  if (__all_sync(0xffffffffu, run.e == e0)) {
    const float m = warp_max(run.m);
    if ((threadIdx.x & 31) == 0) {
      run.m = m;
      run.flush(a, shared);
    }
  } else {
    run.flush(a, shared);
  }
  flush_block_amax(a, shared);
}

}  // namespace moelab::cuda_detail
