// FP8 grouped GEMM benchmark at the seed's expert shapes (16384 tokens routed top-2 to 8 experts:
// 32768 rows, d_model 768, expert hidden 1536; uneven random routing). For each expert GEMM
// (up and down projection: forward, data gradient, weight gradient) it times
//   - the BF16 grouped op (grouped_matmul / grouped_matmul_wgrad, what precision = bf16 runs),
//   - the FP8 grouped kernel alone on operands quantized beforehand (rowwise scales),
//   - one cuBLASLt FP8 GEMM of the same total size (rowwise), and one cuBLASLt BF16 GEMM,
//   - the whole FP8 op per recipe, quantization of both operands included (what a step runs).
// Every FP8 output is checked against the BF16 op's on the same inputs (normalized error), so no
// time is of garbage. Prints markdown tables (medians of CUDA-event-timed runs).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/grouped_gemm_fp8.cuh"
#include "bench_check.hpp"
#include "bench_operands.hpp"
#include "bench_timing.hpp"
#include "core/rng.hpp"

using namespace moelab;

namespace {

double median_ms(CudaBackend& be, const std::function<void()>& fn) { return median_event_ms(be.stream(), fn, 3, 20); }

double tflops(double flops, double ms) { return flops / (ms * 1e-3) / 1e12; }

}  // namespace

int main() {
  if (!CudaBackend::cuda_device_available()) {
    std::fprintf(stderr, "bench_fp8_grouped_gemm: no CUDA GPU\n");
    return 1;
  }
  CudaBackend be;
  Rng rng(7);
  const int E = 8;
  const int64_t R = 32768, D = 768, H = 1536;
  auto rand = [&](const Shape& s, float scale) { return random_bf16(be, rng, s, scale); };
  // Uneven routing: each row to a uniformly drawn expert.
  std::vector<int32_t> counts(E, 0);
  for (int64_t r = 0; r < R; ++r) ++counts[size_t(rng.uniform() * E) % E];
  std::vector<int32_t> off(1, 0);
  for (int32_t c : counts) off.push_back(off.back() + c);
  Tensor offsets = be.alloc({E + 1}, DType::i32);
  be.write_i32(offsets, off);
  std::printf("# FP8 grouped GEMM, %s: %lld rows over %d experts (counts", be.name().c_str(), (long long)R, E);
  for (int32_t c : counts) std::printf(" %d", c);
  std::printf("), d_model %lld, hidden %lld\n\n", (long long)D, (long long)H);

  struct Gemm {
    const char* name;
    int64_t K, N;  // C [R, N] = A [R, K] op(W); weight gradient dW [E, N, K]
    bool trans_w;  // forward (W [E, N, K]) or data gradient (W [E, K, N])
    bool wgrad;
  };
  const Gemm gemms[] = {{"up forward", D, H, true, false},   {"down forward", H, D, true, false},
                        {"up dgrad", H, D, false, false},    {"down dgrad", D, H, false, false},
                        {"up wgrad", D, H, true, true},      {"down wgrad", H, D, true, true}};

  std::printf("| GEMM | BF16 grouped ms | FP8 grouped kernel ms (TFLOP/s) | cuBLASLt FP8 same size ms | kernel vs cuBLASLt FP8 | kernel vs BF16 grouped | cuBLASLt BF16 same size ms | nerr vs BF16 |\n");
  std::printf("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  struct Whole {
    std::string name;
    double ms[3];
    double err[3];
  };
  std::vector<Whole> whole;
  const Fp8Granularity acts[3] = {Fp8Granularity::tensor, Fp8Granularity::row, Fp8Granularity::block_1x128};
  const Fp8Granularity wts[3] = {Fp8Granularity::tensor, Fp8Granularity::row, Fp8Granularity::block_128x128};
  for (const Gemm& g : gemms) {
    const double flops = 2.0 * double(R) * double(g.K) * double(g.N);
    double bf16_ms = 0, kernel_ms = 0, lt_fp8_ms = 0, lt_bf16_ms = 0, err = 0;
    Whole w{g.name, {0, 0, 0}, {0, 0, 0}};
    if (!g.wgrad) {
      Tensor A = rand({R, g.K}, 1.0f);
      Tensor W = rand(g.trans_w ? Shape{E, g.N, g.K} : Shape{E, g.K, g.N}, 0.03f);
      Tensor C = be.alloc({R, g.N}, DType::bf16), Cf = be.alloc({R, g.N}, DType::bf16);
      bf16_ms = median_ms(be, [&] { be.grouped_matmul(A, W, g.trans_w, C, offsets); });
      const std::vector<float> ref = be.read(C);
      // The kernel alone: operands quantized once (rowwise; W^T expert by expert for the dgrad).
      QuantizedOperand qa = fp8_operand(be, R, g.K, Fp8Granularity::row, DType::e4m3);
      QuantizedOperand qw = fp8_operand(be, E * g.N, g.K, Fp8Granularity::row, DType::e4m3);
      be.quantize_fp8(A, false, qa);
      for (int e = 0; e < E; ++e) {
        QuantizedOperand qe;
        qe.granularity = Fp8Granularity::row;
        qe.data = qw.data.rows_slice(e * g.N, (e + 1) * g.N);
        qe.scale = qw.scale.view({E, g.N}).index(e);  // expert e's row scales
        be.quantize_fp8(W.index(e), !g.trans_w, qe);
      }
      grouped_gemm::Fp8GroupedScales sc;
      sc.mode = grouped_gemm::Fp8ScaleMode::row;
      sc.a = qa.scale.as<float>();
      sc.w = qw.scale.as<float>();
      kernel_ms = median_ms(be, [&] {
        grouped_gemm::forward_fp8(qa.data.as<uint8_t>(), DType::e4m3, qw.data.as<uint8_t>(), sc, Cf.data, DType::bf16,
                                  offsets.as<int32_t>(), E, R, int(g.N), int(g.K), be.sm_count(), be.stream());
      });
      err = nerr(be.read(Cf), ref);
      // cuBLASLt of the same total size: [R, K] x [N, K]^T.
      QuantizedOperand lb = fp8_operand(be, g.N, g.K, Fp8Granularity::row, DType::e4m3);
      be.quantize_fp8(W.index(0), !g.trans_w, lb);
      lt_fp8_ms = median_ms(be, [&] { be.matmul_fp8(qa, lb, Cf, 1.0f, 0.0f, true); });
      Tensor W0 = W.index(0);
      lt_bf16_ms = median_ms(be, [&] { be.matmul(A, false, W0, g.trans_w, C, 1.0f, 0.0f); });
      for (int r = 0; r < 3; ++r) {
        w.ms[r] = median_ms(be, [&] { be.grouped_matmul_fp8(A, DType::e4m3, acts[r], W, g.trans_w, wts[r], Cf, offsets); });
        w.err[r] = nerr(be.read(Cf), ref);
      }
    } else {
      Tensor dY = rand({R, g.N}, 1.0f), X = rand({R, g.K}, 1.0f);
      Tensor dW = be.alloc({E, g.N, g.K}, DType::f32), dWf = be.alloc({E, g.N, g.K}, DType::f32);
      be.fill(dW, 0.0f);
      be.grouped_matmul_wgrad(dY, X, dW, offsets, 0.0f);
      const std::vector<float> ref = be.read(dW);
      bf16_ms = median_ms(be, [&] { be.grouped_matmul_wgrad(dY, X, dW, offsets, 1.0f); });
      // The kernel alone, on the padded transposed copies (rowwise).
      const int64_t Rp = grouped_gemm::padded_rows_bound(R, E);
      Tensor padded = be.alloc({E + 1}, DType::i32);
      Tensor qdy = be.alloc({g.N, Rp}, DType::e5m2), qx = be.alloc({g.K, Rp}, DType::e4m3);
      Tensor sdy = be.alloc({E * g.N}, DType::f32), sx = be.alloc({E * g.K}, DType::f32);
      Tensor amax = be.alloc({E * std::max(g.N, g.K)}, DType::f32);
      grouped_gemm::padded_offsets(offsets.as<int32_t>(), E, padded.as<int32_t>(), be.stream());
      grouped_gemm::quantize_segments_transposed(dY.data, int(g.N), offsets.as<int32_t>(), padded.as<int32_t>(), E, Rp,
                                                 grouped_gemm::Fp8ScaleMode::row, DType::e5m2, qdy.as<uint8_t>(),
                                                 sdy.as<float>(), static_cast<unsigned*>(amax.data), be.stream());
      grouped_gemm::quantize_segments_transposed(X.data, int(g.K), offsets.as<int32_t>(), padded.as<int32_t>(), E, Rp,
                                                 grouped_gemm::Fp8ScaleMode::row, DType::e4m3, qx.as<uint8_t>(),
                                                 sx.as<float>(), static_cast<unsigned*>(amax.data), be.stream());
      grouped_gemm::Fp8GroupedScales sc;
      sc.mode = grouped_gemm::Fp8ScaleMode::row;
      sc.a = sdy.as<float>();
      sc.w = sx.as<float>();
      auto kernel = [&] {
        grouped_gemm::wgrad_fp8(qdy.as<uint8_t>(), DType::e5m2, qx.as<uint8_t>(), sc, dWf.data, DType::f32,
                                padded.as<int32_t>(), E, Rp, int(g.N), int(g.K), be.stream());
      };
      be.fill(dWf, 0.0f);
      kernel();
      err = nerr(be.read(dWf), ref);
      kernel_ms = median_ms(be, kernel);
      // cuBLASLt of the same total size: dY^T [N, R] x X^T [K, R]^T.
      QuantizedOperand la = fp8_operand(be, g.N, R, Fp8Granularity::row, DType::e5m2);
      QuantizedOperand lb = fp8_operand(be, g.K, R, Fp8Granularity::row, DType::e4m3);
      be.quantize_fp8(dY, true, la);
      be.quantize_fp8(X, true, lb);
      Tensor dW0 = dWf.index(0);
      lt_fp8_ms = median_ms(be, [&] { be.matmul_fp8(la, lb, dW0, 1.0f, 1.0f); });
      lt_bf16_ms = median_ms(be, [&] { be.matmul(dY, true, X, false, dW0, 1.0f, 1.0f); });
      for (int r = 0; r < 3; ++r) {
        be.fill(dWf, 0.0f);
        be.grouped_matmul_wgrad_fp8(dY, DType::e5m2, X, acts[r], dWf, offsets);
        w.err[r] = nerr(be.read(dWf), ref);
        w.ms[r] = median_ms(be, [&] { be.grouped_matmul_wgrad_fp8(dY, DType::e5m2, X, acts[r], dWf, offsets); });
      }
    }
    std::printf("| %s [%lld x %lld -> %lld] | %.3f | %.3f (%.0f) | %.3f | %.2fx | %.2fx | %.3f | %.1e |\n", g.name,
                (long long)R, (long long)g.K, (long long)g.N, bf16_ms, kernel_ms, tflops(flops, kernel_ms), lt_fp8_ms,
                lt_fp8_ms / kernel_ms, bf16_ms / kernel_ms, lt_bf16_ms, err);
    whole.push_back(w);
  }
  std::printf("\nThe whole FP8 op, quantization of both operands included (ms; in brackets nerr vs BF16):\n\n");
  std::printf("| GEMM | tensorwise | rowwise | blockwise |\n| --- | ---: | ---: | ---: |\n");
  for (const Whole& w : whole)
    std::printf("| %s | %.3f (%.1e) | %.3f (%.1e) | %.3f (%.1e) |\n", w.name.c_str(), w.ms[0], w.err[0], w.ms[1], w.err[1],
                w.ms[2], w.err[2]);
  return 0;
}
