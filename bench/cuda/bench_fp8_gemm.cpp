// FP8 GEMM benchmark at the seed's linear shapes (16384 tokens: the attention projections
// 768 -> 768, the dense MLP 768 <-> 3072, lm_head 768 -> 32768 in 1024-row chunks, and the
// experts' total size as one GEMM, 32768 rows x 768 -> 1536): for each GEMM of a linear
// (forward, data gradient, weight gradient) the BF16 cuBLASLt time against each FP8 recipe's
// time, with and without its quantization passes (LinearGemms's sequence: quantize both
// operands, transposed where the backward needs it, then matmul_fp8). Each FP8 result is checked
// against the BF16 one on the same random inputs (normalized error), so no timing is of
// garbage. Prints one markdown table (median of CUDA-event-timed runs).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_check.hpp"
#include "core/rng.hpp"
#include "bench_check.hpp"
#include "bench_operands.hpp"
#include "bench_timing.hpp"

using namespace moelab;

namespace {

double median_ms(CudaBackend& be, const std::function<void()>& fn) { return median_event_ms(be.stream(), fn, 3, 30); }

struct Recipe {
  const char* name;
  Fp8Granularity act, weight;
};

}  // namespace

int main() {
  if (!CudaBackend::cuda_device_available()) {
    std::fprintf(stderr, "bench_fp8_gemm: no CUDA GPU\n");
    return 1;
  }
  CudaBackend be;
  Rng rng(1);
  auto rand = [&](const Shape& s, float scale) { return random_bf16(be, rng, s, scale); };
  struct Linear {
    const char* name;
    int64_t tokens, out, in;
  };
  const Linear linears[] = {{"attn 768->768", 16384, 768, 768},
                            {"mlp 768->3072", 16384, 3072, 768},
                            {"mlp 3072->768", 16384, 768, 3072},
                            {"head chunk 768->32768", 1024, 32768, 768},
                            {"experts total 768->1536", 32768, 1536, 768},
                            {"experts total 1536->768", 32768, 768, 1536}};
  const Recipe recipes[] = {{"tensorwise", Fp8Granularity::tensor, Fp8Granularity::tensor},
                            {"rowwise", Fp8Granularity::row, Fp8Granularity::row},
                            {"blockwise", Fp8Granularity::block_1x128, Fp8Granularity::block_128x128}};
  std::printf("| linear | gemm | bf16 ms | recipe | fp8 gemm ms | fp8 + quant ms | speedup (with quant) | TFLOP/s fp8 gemm | nerr vs bf16 |\n");
  std::printf("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |\n");
  for (const Linear& L : linears) {
    Tensor x = rand({L.tokens, L.in}, 1.0f), w = rand({L.out, L.in}, 0.03f), dy = rand({L.tokens, L.out}, 1e-3f);
    Tensor y = be.alloc({L.tokens, L.out}, DType::bf16), dx = be.alloc({L.tokens, L.in}, DType::bf16);
    Tensor dw = be.alloc({L.out, L.in}, DType::f32);
    const double flops = 2.0 * double(L.tokens) * double(L.out) * double(L.in);
    for (int g = 0; g < 3; ++g) {
      const char* gname = g == 0 ? "fwd" : g == 1 ? "dgrad" : "wgrad";
      std::function<void()> bf16;
      if (g == 0) bf16 = [&] { be.matmul(x, false, w, true, y); };
      if (g == 1) bf16 = [&] { be.matmul(dy, false, w, false, dx); };
      if (g == 2) bf16 = [&] { be.fill(dw, 0.0f); be.matmul(dy, true, x, false, dw, 1.0f, 1.0f); };
      const double t_bf16 = median_ms(be, bf16);
      bf16();
      Tensor& res = g == 0 ? y : g == 1 ? dx : dw;
      const std::vector<float> ref = be.read(res);
      for (const Recipe& r : recipes) {
        QuantizedOperand qa, qb;
        std::function<void()> quant;
        if (g == 0) {
          qa = fp8_operand(be, L.tokens, L.in, r.act, DType::e4m3);
          qb = fp8_operand(be, L.out, L.in, r.weight, DType::e4m3);
          quant = [&] { be.quantize_fp8(x, false, qa); be.quantize_fp8(w, false, qb); };
        } else if (g == 1) {
          qa = fp8_operand(be, L.tokens, L.out, r.act, DType::e5m2);
          qb = fp8_operand(be, L.in, L.out, r.weight, DType::e4m3);
          quant = [&] { be.quantize_fp8(dy, false, qa); be.quantize_fp8(w, true, qb); };
        } else {
          qa = fp8_operand(be, L.out, L.tokens, r.act, DType::e5m2);
          qb = fp8_operand(be, L.in, L.tokens, r.act, DType::e4m3);
          quant = [&] { be.quantize_fp8(dy, true, qa); be.quantize_fp8(x, true, qb); };
        }
        std::function<void()> gemm = [&] {
          if (g == 2) be.fill(dw, 0.0f);
          be.matmul_fp8(qa, qb, res, 1.0f, g == 2 ? 1.0f : 0.0f, g == 0);
        };
        std::string err = "";
        double t_gemm = NAN, t_all = NAN, e = NAN;
        try {
          quant();
          gemm();
          e = nerr(be.read(res), ref);
          t_gemm = median_ms(be, gemm);
          t_all = median_ms(be, [&] { quant(); gemm(); });
        } catch (const std::exception& ex) {
          err = ex.what();
        }
        if (!err.empty()) {
          std::printf("| %s | %s | %.3f | %s | failed: %s | | | | |\n", L.name, gname, t_bf16, r.name, err.c_str());
          continue;
        }
        std::printf("| %s | %s | %.3f | %s | %.3f | %.3f | %.2fx | %.0f | %.4f |\n", L.name, gname, t_bf16, r.name, t_gemm,
                    t_all, t_bf16 / t_all, flops / (t_gemm * 1e-3) / 1e12, e);
      }
    }
  }
  return 0;
}
