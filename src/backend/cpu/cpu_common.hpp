// Helpers shared by the CPU ops: argument checks that throw moelab::Error naming the op and the
// argument, dispatch from a runtime float dtype (f32/f64) to a kernel template, and a reduction
// whose chunking is fixed so its result is the same for every thread count.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "backend/cpu/thread_pool.hpp"
#include "core/error.hpp"
#include "core/tensor.hpp"

namespace moelab::cpu {

[[noreturn]] inline void fail(const char* op, const std::string& msg) {
  throw Error(std::string("cpu backend, ") + op + ": " + msg);
}

inline void require(bool cond, const char* op, const std::string& msg) {
  if (!cond) fail(op, msg);
}

inline void require_host(const Tensor& t, const char* op, const char* name) {
  require(t.device == Device::cpu, op, std::string(name) + " is " + t.describe() +
                                           "; move it to the host before calling the CPU backend");
  require(t.data != nullptr || t.numel() == 0, op,
          std::string(name) + " has no memory; allocate it with the backend first");
}

// t must be an f32 or f64 host tensor.
inline void require_float(const Tensor& t, const char* op, const char* name) {
  require_host(t, op, name);
  require(t.dtype == DType::f32 || t.dtype == DType::f64, op,
          std::string(name) + " is " + t.describe() + " but must be f32 or f64");
}

// t must have the same float dtype as ref (the CPU keeps activations, weights and stats in one).
inline void require_like(const Tensor& ref, const Tensor& t, const char* op, const char* name) {
  require_host(t, op, name);
  require(t.dtype == ref.dtype, op,
          std::string(name) + " is " + t.describe() + " but must be " + dtype_name(ref.dtype) +
              " like the op's other float arguments");
}

inline void require_i32(const Tensor& t, const char* op, const char* name) {
  require_host(t, op, name);
  require(t.dtype == DType::i32, op, std::string(name) + " is " + t.describe() + " but must be i32");
}

inline void require_numel(const Tensor& t, int64_t n, const char* op, const char* name) {
  require(t.numel() == n, op,
          std::string(name) + " is " + t.describe() + " but must hold " + std::to_string(n) +
              " elements");
}

inline void require_shape(const Tensor& t, const Shape& s, const char* op, const char* name) {
  require(t.shape == s, op,
          std::string(name) + " is " + t.describe() + " but must have shape " + shape_str(s));
}

// Calls f(T{}) with T = float or double matching dtype.
template <class F>
decltype(auto) with_float(DType dtype, F&& f) {
  if (dtype == DType::f64) return f(double{});
  return f(float{});
}

// Rows of the matrix view: product of the leading dims (Tensor::rows() is 0 when cols is 0,
// which would lose the shape of a [M, 0] operand).
inline int64_t matrix_rows(const Tensor& t) {
  int64_t r = 1;
  for (int i = 0; i + 1 < t.ndim(); ++i) r *= t.shape[size_t(i)];
  return r;
}

template <class T>
T* ptr(const Tensor& t) {
  return static_cast<T*>(t.data);
}

// Sum of term(i) over [0, n) in double: fixed chunks summed in parallel, then the chunk sums in
// order, so the bits do not depend on how many threads there are.
template <class F>
double fixed_chunk_sum(ThreadPool& pool, int64_t n, F&& term) {
  constexpr int64_t kChunk = 4096;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(size_t(chunks > 0 ? chunks : 0), 0.0);
  pool.parallel_for(chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t end = (c + 1) * kChunk < n ? (c + 1) * kChunk : n;
      double s = 0;
      for (int64_t i = c * kChunk; i < end; ++i) s += double(term(i));
      partial[size_t(c)] = s;
    }
  });
  double s = 0;
  for (double p : partial) s += p;
  return s;
}

// Grain sizes (items per parallel range) that keep tiny ops on the calling thread.
inline int64_t grain_for(int64_t work_per_item) {
  constexpr int64_t kMinWork = 16384;
  if (work_per_item < 1) work_per_item = 1;
  int64_t g = kMinWork / work_per_item;
  return g < 1 ? 1 : g;
}

}  // namespace moelab::cpu
