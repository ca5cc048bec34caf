// The warp-specialized FP8 grouped GEMM (grouped_gemm_fp8_ws.cu) against the engine's kernel on the
// same quantized operands: the same products in the same order, so the outputs must agree bit for
// bit, for both scale modes and both A formats, with uneven experts (an empty one, one under a
// tile) and N not a multiple of the 256-wide tile. Fresh random inputs; skips without a GPU.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/grouped_gemm_fp8.cuh"
#include "core/rng.hpp"
#include "grouped_gemm_fp8_ws.cuh"

namespace moelab {
namespace {

TEST(Fp8GroupedWs, MatchesTheEngineKernelBitForBit) {
  if (!CudaBackend::cuda_device_available()) GTEST_SKIP() << "no CUDA GPU on this machine";
  CudaBackend be;
  Rng rng(uint64_t(std::chrono::high_resolution_clock::now().time_since_epoch().count()));
  const std::vector<int32_t> counts = {700, 0, 129, 1300, 40, 519};  // 2688 rows: quantize_fp8 needs multiples of 16
  const int E = int(counts.size());
  std::vector<int32_t> off(1, 0);
  for (int32_t c : counts) off.push_back(off.back() + c);
  const int64_t R = off.back();
  Tensor offsets = be.alloc({E + 1}, DType::i32);
  be.write_i32(offsets, off);
  auto random = [&](const Shape& s, float scale) {
    Tensor t = be.alloc(s, DType::bf16);
    std::vector<float> v(size_t(t.numel()));
    for (auto& x : v) x = float(rng.normal()) * scale;
    be.write(t, v);
    return t;
  };
  for (int64_t N : {384, 768})
    for (int64_t K : {256, 768})
      for (DType fmt : {DType::e4m3, DType::e5m2}) {
        Tensor A = random({R, K}, 1.0f), W = random({E * N, K}, 0.05f);
        QuantizedOperand qa, qw;
        qa.granularity = qw.granularity = Fp8Granularity::row;
        qa.data = be.alloc({R, K}, fmt);
        qa.scale = be.alloc({R}, DType::f32);
        qw.data = be.alloc({E * N, K}, DType::e4m3);
        qw.scale = be.alloc({E * N}, DType::f32);
        be.quantize_fp8(A, false, qa);
        be.quantize_fp8(W, false, qw);  // row scales: each expert's rows are rows of W
        Tensor tensor_scales = be.alloc({E}, DType::f32);
        be.fill(tensor_scales, 0.5f);
        for (auto mode : {grouped_gemm::Fp8ScaleMode::tensor, grouped_gemm::Fp8ScaleMode::row}) {
          grouped_gemm::Fp8GroupedScales sc;
          sc.mode = mode;
          sc.a = mode == grouped_gemm::Fp8ScaleMode::row ? qa.scale.as<float>() : tensor_scales.as<float>();
          sc.w = mode == grouped_gemm::Fp8ScaleMode::row ? qw.scale.as<float>() : tensor_scales.as<float>();
          Tensor c1 = be.alloc({R, N}, DType::bf16), c2 = be.alloc({R, N}, DType::bf16);
          be.fill(c1, 1.0f);
          be.fill(c2, -1.0f);  // every element must be written
          grouped_gemm::forward_fp8(qa.data.as<uint8_t>(), fmt, qw.data.as<uint8_t>(), sc, c1.data, DType::bf16,
                                    offsets.as<int32_t>(), E, R, int(N), int(K), be.sm_count(), be.stream());
          grouped_gemm_lab::forward_fp8_ws(qa.data.as<uint8_t>(), fmt, qw.data.as<uint8_t>(), sc, c2.data, DType::bf16,
                                           offsets.as<int32_t>(), E, R, int(N), int(K), be.sm_count(), be.stream());
          const std::vector<float> a = be.read(c1), b = be.read(c2);
          int64_t diff = 0;
          for (size_t i = 0; i < a.size(); ++i) diff += std::memcmp(&a[i], &b[i], 4) != 0;
          EXPECT_EQ(diff, 0) << "N " << N << " K " << K << " " << dtype_name(fmt)
                             << (mode == grouped_gemm::Fp8ScaleMode::row ? " row" : " tensor");
        }
      }
}

}  // namespace
}  // namespace moelab
