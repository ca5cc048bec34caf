// Kernel lab benchmark: the warp-specialized FP8 grouped GEMM (grouped_gemm_fp8_ws.cu) against the
// engine's kernel (grouped_gemm::forward_fp8) and one cuBLASLt FP8 GEMM of the same total size, at
// the seed's expert shapes (32768 rows over 8 experts, uneven random routing; d_model 768, hidden
// 1536), rowwise scales (tensorwise with `bench_fp8_grouped_ws tensor`), operands quantized
// beforehand. The variant's output is compared with the engine's bit for bit (the same products
// in the same order). Medians of CUDA-event-timed runs.
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/grouped_gemm_fp8.cuh"
#include "bench_operands.hpp"
#include "bench_timing.hpp"
#include "core/rng.hpp"
#include "grouped_gemm_fp8_ws.cuh"

using namespace moelab;

int main(int argc, char** argv) {
  const bool tensorwise = argc > 1 && std::string(argv[1]) == "tensor";
  if (!CudaBackend::cuda_device_available()) {
    std::fprintf(stderr, "bench_fp8_grouped_ws: no CUDA GPU\n");
    return 1;
  }
  CudaBackend be;
  Rng rng(11);
  const int E = 8;
  const int64_t R = 32768;
  std::vector<int32_t> counts(E, 0);
  for (int64_t r = 0; r < R; ++r) ++counts[size_t(rng.uniform() * E) % E];
  std::vector<int32_t> off(1, 0);
  for (int32_t c : counts) off.push_back(off.back() + c);
  Tensor offsets = be.alloc({E + 1}, DType::i32);
  be.write_i32(offsets, off);
  auto median_ms = [&](const std::function<void()>& fn) { return median_event_ms(be.stream(), fn, 3, 20); };
  std::printf("# FP8 grouped GEMM variants, %s: %lld rows over %d experts, %s scales\n\n", be.name().c_str(),
              (long long)R, E, tensorwise ? "tensorwise" : "rowwise");
  std::printf("| product | A format | engine ms (TFLOP/s) | warp-specialized ms (TFLOP/s) | ws vs engine | cuBLASLt FP8 ms | ws vs cuBLASLt | differing outputs |\n");
  std::printf("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  struct Shape2 {
    const char* name;
    int64_t K, N;
  };
  for (const Shape2 s : {Shape2{"768 -> 1536 (up forward, down dgrad)", 768, 1536}, Shape2{"1536 -> 768 (down forward, up dgrad)", 1536, 768}})
    for (DType fmt : {DType::e4m3, DType::e5m2}) {
      Tensor A = random_bf16(be, rng, {R, s.K}, 1.0f), W = random_bf16(be, rng, {E * s.N, s.K}, 0.03f);
      QuantizedOperand qa = fp8_operand(be, R, s.K, Fp8Granularity::row, fmt);
      QuantizedOperand qw = fp8_operand(be, E * s.N, s.K, Fp8Granularity::row, DType::e4m3);
      be.quantize_fp8(A, false, qa);
      be.quantize_fp8(W, false, qw);
      grouped_gemm::Fp8GroupedScales sc;
      sc.mode = grouped_gemm::Fp8ScaleMode::row;
      sc.a = qa.scale.as<float>();
      sc.w = qw.scale.as<float>();
      Tensor per_expert = be.alloc({E}, DType::f32);  // tensorwise: one scale per expert and side
      be.fill(per_expert, 0.01f);
      if (tensorwise) {
        sc.mode = grouped_gemm::Fp8ScaleMode::tensor;
        sc.a = sc.w = per_expert.as<float>();
      }
      Tensor c1 = be.alloc({R, s.N}, DType::bf16), c2 = be.alloc({R, s.N}, DType::bf16);
      const double engine = median_ms([&] {
        grouped_gemm::forward_fp8(qa.data.as<uint8_t>(), fmt, qw.data.as<uint8_t>(), sc, c1.data, DType::bf16,
                                  offsets.as<int32_t>(), E, R, int(s.N), int(s.K), be.sm_count(), be.stream());
      });
      const double ws = median_ms([&] {
        grouped_gemm_lab::forward_fp8_ws(qa.data.as<uint8_t>(), fmt, qw.data.as<uint8_t>(), sc, c2.data, DType::bf16,
                                         offsets.as<int32_t>(), E, R, int(s.N), int(s.K), be.sm_count(), be.stream());
      });
      const std::vector<float> a = be.read(c1), b = be.read(c2);
      int64_t diff = 0;
      for (size_t i = 0; i < a.size(); ++i) diff += std::memcmp(&a[i], &b[i], 4) != 0;
      double lt = 0;
      if (fmt == DType::e4m3) {  // cuBLASLt of the same total size: [R, K] x [N, K]^T (expert 0's weights)
        QuantizedOperand lb = fp8_operand(be, s.N, s.K, Fp8Granularity::row, DType::e4m3);
        be.quantize_fp8(W.rows_slice(0, s.N), false, lb);
        lt = median_ms([&] { be.matmul_fp8(qa, lb, c1, 1.0f, 0.0f, true); });
      }
      const double flops = 2.0 * double(R) * double(s.K) * double(s.N);
      auto tf = [&](double ms) { return flops / (ms * 1e-3) / 1e12; };
      std::printf("| %s | %s | %.3f (%.0f) | %.3f (%.0f) | %.2fx | ", s.name, dtype_name(fmt), engine, tf(engine), ws,
                  tf(ws), engine / ws);
      if (lt > 0) std::printf("%.3f | %.2fx | %lld |\n", lt, lt / ws, (long long)diff);
      else std::printf("- | - | %lld |\n", (long long)diff);
    }
  return 0;
}
