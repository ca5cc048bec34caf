// Inputs of the FP8 kernel benchmarks: bf16 tensors of random normal values (never zeros, so no
// time is of a degenerate product) and FP8 operands of the right shapes to quantize into.
#pragma once
#include <vector>

#include "backend/cuda/cuda_backend.hpp"
#include "core/rng.hpp"

namespace moelab {

inline Tensor random_bf16(CudaBackend& be, Rng& rng, const Shape& shape, float scale) {
  Tensor t = be.alloc(shape, DType::bf16);
  std::vector<float> v(size_t(t.numel()));
  for (auto& x : v) x = float(rng.normal()) * scale;
  be.write(t, v);
  return t;
}

// data [rows, k] of `fmt`, scales laid out for granularity g (contents unset).
inline QuantizedOperand fp8_operand(CudaBackend& be, int64_t rows, int64_t k, Fp8Granularity g, DType fmt) {
  QuantizedOperand q;
  q.granularity = g;
  q.data = be.alloc({rows, k}, fmt);
  q.scale = be.alloc(fp8_scale_shape(g, rows, k), DType::f32);
  return q;
}

}  // namespace moelab
