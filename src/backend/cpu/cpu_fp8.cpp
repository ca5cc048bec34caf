// FP8 emulation: quantize_fp8 applies the scaling rule of backend.hpp exactly (f32 amax, f32
// scale divisions, f32 product, round to nearest even, saturation), and matmul_fp8 dequantizes
// both operands and runs the f32 GEMM. The GPU's FP8 ops are checked against these bits.
#include <cfloat>
#include <cmath>

#include "backend/cpu/convert.hpp"
#include "backend/cpu/cpu_backend.hpp"
#include "backend/cpu/cpu_common.hpp"
#include "backend/cpu/gemm.hpp"

namespace moelab {

using namespace cpu;

namespace {

const MiniFloat& format_of(DType d, const char* op) {
  if (d == DType::e4m3) return kE4M3;
  if (d == DType::e5m2) return kE5M2;
  fail(op, std::string("data must be e4m3 or e5m2, got ") + dtype_name(d));
}

// The quantization multiplier for a group's absolute maximum (backend.hpp's rule).
float quant_multiplier(float amax, float fmax) {
  float a = std::fmin(std::fmax(amax, kFp8MinAmax), FLT_MAX);
  return fmax / a;
}

void check_operand(const QuantizedOperand& q, const char* op, const char* name) {
  require_host(q.data, op, name);
  require(q.data.ndim() == 2, op, std::string(name) + ".data must be a [rows, K] matrix, got " + q.data.describe());
  (void)format_of(q.data.dtype, op);
  require(q.scale.dtype == DType::f32, op, std::string(name) + ".scale must be f32, got " + q.scale.describe());
  require_shape(q.scale, fp8_scale_shape(q.granularity, q.data.dim(0), q.data.dim(1)), op, name);
}

// Index of the scale of element (r, k) of a [rows, K] operand.
inline int64_t scale_index(Fp8Granularity g, int64_t rows, int64_t K, int64_t r, int64_t k) {
  switch (g) {
    case Fp8Granularity::tensor: return 0;
    case Fp8Granularity::row: return r;
    case Fp8Granularity::block_1x128: return (k / 128) * rows + r;
    case Fp8Granularity::block_128x128: return (r / 128) * (((K + 127) / 128 + 3) / 4 * 4) + k / 128;
  }
  return 0;
}

}  // namespace

void CpuBackend::quantize_fp8(const Tensor& x, bool transpose, QuantizedOperand& out) {
  const char* op = "quantize_fp8";
  require_host(x, op, "x");
  require(x.dtype == DType::f32 || x.dtype == DType::f64 || x.dtype == DType::bf16, op,
          "x must be f32, f64 or bf16, got " + x.describe());
  check_operand(out, op, "out");
  const int64_t xr = matrix_rows(x), xc = x.cols();
  const int64_t rows = transpose ? xc : xr, K = transpose ? xr : xc;
  require(out.data.dim(0) == rows && out.data.dim(1) == K, op,
          "out.data is " + out.data.describe() + " but x" + (transpose ? "^T" : "") + " of " + x.describe() +
              " is [" + std::to_string(rows) + ", " + std::to_string(K) + "]");
  // The operand as f32, in out's [rows, K] orientation.
  std::vector<float> v(size_t(rows * K));
  std::vector<float> src(size_t(x.numel()));
  convert_elements(x.dtype, x.data, DType::f32, src.data(), x.numel(), op);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; ++k) v[size_t(r * K + k)] = transpose ? src[size_t(k * xc + r)] : src[size_t(r * xc + k)];

  const Fp8Granularity g = out.granularity;
  const MiniFloat& f = format_of(out.data.dtype, op);
  const float fmax = fp8_max(out.data.dtype);
  const int64_t nscale = out.scale.numel();
  std::vector<float> amax(size_t(nscale), 0.0f);
  std::vector<char> used(size_t(nscale), 0);  // padding entries of the 128x128 layout stay unused
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; ++k) {
      const size_t i = size_t(scale_index(g, rows, K, r, k));
      amax[i] = std::fmax(amax[i], std::fabs(v[size_t(r * K + k)]));
      used[i] = 1;
    }
  std::vector<float> mult(static_cast<size_t>(nscale));
  float* scale = ptr<float>(out.scale);
  for (int64_t i = 0; i < nscale; ++i) {
    mult[size_t(i)] = quant_multiplier(amax[size_t(i)], fmax);
    scale[i] = used[size_t(i)] ? 1.0f / mult[size_t(i)] : 1.0f;
  }
  uint8_t* data = ptr<uint8_t>(out.data);
  pool_.parallel_for(rows, grain_for(K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t k = 0; k < K; ++k) {
        const float y = v[size_t(r * K + k)] * mult[size_t(scale_index(g, rows, K, r, k))];
        data[r * K + k] = encode_minifloat(double(y), f);
      }
  });
}

void CpuBackend::matmul_fp8(const QuantizedOperand& A, const QuantizedOperand& B, Tensor& C, float alpha,
                            float beta, bool /*fast_accum*/) {
  const char* op = "matmul_fp8";
  check_operand(A, op, "A");
  check_operand(B, op, "B");
  require_host(C, op, "C");
  require_float(C, op, "C");
  const int64_t M = A.data.dim(0), N = B.data.dim(0), K = A.data.dim(1);
  require(B.data.dim(1) == K, op, "A.data " + A.data.describe() + " and B.data " + B.data.describe() + " differ in K");
  require(matrix_rows(C) == M && C.cols() == N, op,
          "C is " + C.describe() + " but A B^T is [" + std::to_string(M) + ", " + std::to_string(N) + "]");
  const bool pair_ok = A.granularity == B.granularity ? A.granularity != Fp8Granularity::block_128x128
                                                      : (A.granularity == Fp8Granularity::block_1x128 ||
                                                         B.granularity == Fp8Granularity::block_1x128) &&
                                                            (A.granularity == Fp8Granularity::block_128x128 ||
                                                             B.granularity == Fp8Granularity::block_128x128);
  require(pair_ok, op,
          std::string("granularity pair (") + fp8_granularity_name(A.granularity) + ", " +
              fp8_granularity_name(B.granularity) + ") is not a supported recipe");
  require(A.data.dtype == DType::e4m3 || B.data.dtype == DType::e4m3, op,
          "at most one operand may be e5m2 (as on the GPU's tensor cores)");
  with_float(C.dtype, [&](auto te) {
    using T = decltype(te);
    auto dequant = [&](const QuantizedOperand& q) {
      const int64_t rows = q.data.dim(0);
      const MiniFloat& f = format_of(q.data.dtype, op);
      const uint8_t* d = ptr<uint8_t>(q.data);
      const float* s = ptr<float>(q.scale);
      std::vector<T> out(size_t(rows * K));
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < K; ++k)
          out[size_t(r * K + k)] = T(float(decode_minifloat(d[r * K + k], f)) * s[scale_index(q.granularity, rows, K, r, k)]);
      return out;
    };
    std::vector<T> a = dequant(A), b = dequant(B);
    gemm<T>(pool_, M, N, K, a.data(), false, b.data(), true, ptr<T>(C), T(alpha), T(beta));
  });
}

namespace {

// Expert offsets on the host, checked (E+1 non-decreasing values within rows).
std::vector<int64_t> host_offsets(const Tensor& offsets, int64_t experts, int64_t rows, const char* op) {
  require_i32(offsets, op, "offsets");
  require_numel(offsets, experts + 1, op, "offsets");
  std::vector<int64_t> out(size_t(experts + 1));
  for (int64_t e = 0; e <= experts; ++e) {
    out[size_t(e)] = ptr<int32_t>(offsets)[e];
    require(out[size_t(e)] >= 0 && out[size_t(e)] <= rows && (e == 0 || out[size_t(e)] >= out[size_t(e - 1)]), op,
            "offsets are out of order or past the rows; pass the offsets written by moe_plan");
  }
  return out;
}

}  // namespace

// Expert by expert: the weights quantized (each expert its own scales), then the product below.
void CpuBackend::grouped_matmul_fp8(const Tensor& A, DType a_format, Fp8Granularity a_gran, const Tensor& W,
                                    bool trans_w, Fp8Granularity w_gran, Tensor& C, const Tensor& offsets) {
  const char* op = "grouped_matmul_fp8";
  require(W.ndim() == 3, op, "W must be [E, N, K] or [E, K, N], got " + W.describe());
  const int64_t E = W.dim(0), N = trans_w ? W.dim(1) : W.dim(2), K = trans_w ? W.dim(2) : W.dim(1);
  QuantizedExperts qw;
  qw.granularity = w_gran;
  qw.data = alloc({E, N, K}, DType::e4m3);
  int64_t per = 1;
  for (int64_t d : fp8_scale_shape(w_gran, N, K)) per *= d;
  qw.scale = alloc({E, per}, DType::f32);
  quantize_experts_fp8(W, !trans_w, qw);
  grouped_matmul_fp8(A, a_format, a_gran, qw, C, offsets);
}

// Expert by expert: quantize that expert's rows (its own scales), then the FP8 GEMM with its weights.
void CpuBackend::grouped_matmul_fp8(const Tensor& A, DType a_format, Fp8Granularity a_gran, const QuantizedExperts& W,
                                    Tensor& C, const Tensor& offsets) {
  const char* op = "grouped_matmul_fp8";
  require_host(A, op, "A");
  require(W.data.ndim() == 3 && W.scale.ndim() == 2 && W.scale.dim(0) == W.data.dim(0), op,
          "W must be a QuantizedExperts of data [E, N, K] and scale [E, n], got " + W.data.describe() + " and " +
              W.scale.describe());
  const int64_t E = W.experts(), N = W.data.dim(1), K = A.cols(), R = matrix_rows(A);
  require(W.data.dim(2) == K, op, "W " + W.data.describe() + " does not match A " + A.describe());
  require(matrix_rows(C) == R && C.cols() == N, op, "C is " + C.describe() + ", expected [" + std::to_string(R) + ", " + std::to_string(N) + "]");
  const std::vector<int64_t> o = host_offsets(offsets, E, R, op);
  const Tensor A2 = A.view({R, K});
  Tensor C2 = C.view({R, N});
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = o[size_t(e)], r1 = o[size_t(e + 1)];
    if (r1 == r0) continue;
    QuantizedOperand qa;
    qa.granularity = a_gran;
    qa.data = alloc({r1 - r0, K}, a_format);
    qa.scale = alloc(fp8_scale_shape(a_gran, r1 - r0, K), DType::f32);
    quantize_fp8(A2.rows_slice(r0, r1), false, qa);
    Tensor c = C2.rows_slice(r0, r1);
    matmul_fp8(qa, W.expert(e), c);
  }
}

void CpuBackend::grouped_matmul_wgrad_fp8(const Tensor& dY, DType dy_format, const Tensor& X, Fp8Granularity gran,
                                          Tensor& dW, const Tensor& offsets) {
  const char* op = "grouped_matmul_wgrad_fp8";
  require_host(dY, op, "dY");
  require(dW.ndim() == 3, op, "dW must be [E, N, K], got " + dW.describe());
  const int64_t E = dW.dim(0), N = dW.dim(1), K = dW.dim(2), R = matrix_rows(dY);
  require(dY.cols() == N && X.cols() == K && matrix_rows(X) == R, op,
          "dY " + dY.describe() + " and X " + X.describe() + " do not match dW " + dW.describe());
  const std::vector<int64_t> o = host_offsets(offsets, E, R, op);
  const Tensor dY2 = dY.view({R, N}), X2 = X.view({R, K});
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = o[size_t(e)], r1 = o[size_t(e + 1)], re = r1 - r0;
    if (re == 0) continue;
    QuantizedOperand qa, qb;  // dY_e^T [N, re] and X_e^T [K, re]: K-major along the expert's tokens
    qa.granularity = qb.granularity = gran;
    qa.data = alloc({N, re}, dy_format);
    qa.scale = alloc(fp8_scale_shape(gran, N, re), DType::f32);
    qb.data = alloc({K, re}, DType::e4m3);
    qb.scale = alloc(fp8_scale_shape(gran, K, re), DType::f32);
    quantize_fp8(dY2.rows_slice(r0, r1), true, qa);
    quantize_fp8(X2.rows_slice(r0, r1), true, qb);
    Tensor dw = dW.index(e);
    matmul_fp8(qa, qb, dw, 1.0f, 1.0f);
  }
}

}  // namespace moelab
