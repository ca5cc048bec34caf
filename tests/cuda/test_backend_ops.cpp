// The CUDA backend's focused tests, beside the op table (test_op_table.cpp runs every op against
// the CPU reference): a clear error without a GPU, each weight-gradient tile width of the wgmma
// kernel, Newton-Schulz through the grouped GEMMs, CUDA graph capture and replay, and peak-memory
// tracking. Skips without a GPU.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>
#include <functional>
#include <random>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/grouped_gemm.cuh"
#include "core/rng.hpp"
#include "optim/newton_schulz.hpp"
#include "gpu_fixture.hpp"

namespace moelab {
namespace {

class CudaOps : public GpuTest {};

TEST(CudaDevice, NoGpuIsAClearError) {
  if (CudaBackend::cuda_device_available()) {
    CudaBackend b;
    EXPECT_FALSE(b.name().empty());
    EXPECT_EQ(b.act_dtype(), DType::bf16);
  } else {
    try {
      CudaBackend b;
      FAIL() << "constructing a CUDA backend without a GPU must throw";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("no CUDA GPU"), std::string::npos) << e.what();
    }
  }
}

// Every weight-gradient tile width (the backend picks one per shape) against the CPU, with
// uneven groups (one empty) and output columns that are not a multiple of the tile.
TEST_F(CudaOps, GroupedWgradEveryTileWidth) {
  const int E = 4, N = 200, K = 328;
  const std::vector<int32_t> off = {0, 70, 70, 301, 333};
  auto offsets = i32_pair({E + 1}, off);
  auto dy = rand_pair({333, N}, DType::bf16), x = rand_pair({333, K}, DType::bf16);
  for (int tile : {128, 192, 256})
    for (float beta : {0.f, 1.f}) {
      auto dw = rand_pair({E, N, K}, DType::f32);
      cpu->grouped_matmul_wgrad(dy.c, x.c, dw.c, offsets.c, beta);
      grouped_gemm::wgrad_sm90_tma(dy.g.as<__nv_bfloat16>(), x.g.as<__nv_bfloat16>(), dw.g.data, dw.g.dtype, offsets.g.as<int32_t>(), E,
                                   333, N, K, beta, gpu->stream(), tile);
      expect_close(dw, 1e-4, "wgrad tile " + std::to_string(tile) + " beta " + std::to_string(beta));
    }
  EXPECT_EQ(grouped_gemm::wgrad_tile_n(8, 1536, 768, 132), 192);  // the seed's w_fc gradient
}

// Muon's batched Newton-Schulz through the grouped GEMMs, against the CPU backend running the
// same ops in f32: router-like stacks (8 rows, inner products of size 8), wide and tall stacks.
TEST_F(CudaOps, BatchedNewtonSchulzMatchesCpu) {
  const std::vector<NewtonSchulz::StackShape> stacks = {{12, 8, 768}, {6, 64, 64}, {4, 40, 96}, {4, 96, 40}};
  NewtonSchulz ns_cpu(*cpu, stacks), ns_gpu(*gpu, stacks);
  for (const auto& st : stacks) {
    SCOPED_TRACE(std::to_string(st.count) + " x " + std::to_string(st.m) + " x " + std::to_string(st.n));
    ns_cpu.prepare_batched(st.count, st.m, st.n);
    ns_gpu.prepare_batched(st.count, st.m, st.n);
    auto g = rand_pair({st.count, st.m, st.n}, DType::f32);
    const Tensor xc = ns_cpu.run_batched(g.c, 5), xg = ns_gpu.run_batched(g.g, 5);
    // bf16 iterates on the GPU drift from the f32 ones over five steps; the result is still the
    // same near-orthogonal matrix to a few percent.
    EXPECT_LT(nerr(gpu->read(xg), cpu->read(xc)), 3e-2);
  }
}

// A captured sequence (plan -> permute -> grouped GEMM) replayed on new inputs written into the
// same buffers must match the CPU on those new inputs: the graph reads offsets on the device.
// A graph re-recorded every step with new launch arguments (the optimizer's learning rate) and
// updated in place, recorded while the stream is still busy with earlier work.
TEST_F(CudaOps, GraphRecaptureTakesNewScalars) {
  const Shape s{512, 384};
  auto x = rand_pair(s, DType::f32), y = rand_pair(s, DType::f32);
  auto a = rand_pair({1024, 1024}, DType::bf16), c = out_pair({1024, 1024}, DType::f32);
  CudaGraph graph(*gpu);
  for (int round = 0; round < 4; ++round) {
    const float alpha = 0.5f + 0.25f * float(round), beta = 1.0f - 0.1f * float(round);
    gpu->matmul(a.g, false, a.g, true, c.g);  // keeps the stream busy while the host records
    graph.recapture([&] { gpu->axpby(alpha, x.g, beta, y.g); });
    graph.replay();
    cpu->axpby(alpha, x.c, beta, y.c);
    gpu->synchronize();
    expect_close(y, kF32Tol, ("axpby round " + std::to_string(round)).c_str());
  }
}

TEST_F(CudaOps, GraphCaptureReplaysWithDeviceOffsets) {
  const int64_t T = 256, E = 4, k = 2, D = 64, Hd = 128;
  Tensor idx = gpu->alloc({T, k}, DType::i32), x = gpu->alloc({T, D}, DType::bf16);
  Tensor w = gpu->alloc({E, Hd, D}, DType::bf16);
  Tensor routed = gpu->alloc({E}, DType::i32), counts = gpu->alloc({E}, DType::i32),
         offsets = gpu->alloc({E + 1}, DType::i32), slot = gpu->alloc({T * k}, DType::i32),
         row_token = gpu->alloc({T * k}, DType::i32), xp = gpu->alloc({T * k, D}, DType::bf16),
         h = gpu->alloc({T * k, Hd}, DType::f32);
  auto body = [&] {
    gpu->moe_plan(idx, int(E), 0, routed, counts, offsets, slot, row_token);
    gpu->moe_permute(x, row_token, offsets, xp);
    gpu->grouped_matmul(xp, w, true, h, offsets);
  };
  CudaGraph graph(*gpu);
  for (int round = 0; round < 3; ++round) {
    std::vector<int32_t> iv(size_t(T * k));
    for (int64_t t = 0; t < T; ++t) {
      int32_t a = int32_t(rng->below(E)), b = int32_t((a + 1 + rng->below(E - 1)) % E);
      if (round == 2) a = 0, b = 1 + int32_t(t % 2);  // very skewed routing
      iv[size_t(t * k)] = a;
      iv[size_t(t * k + 1)] = b;
    }
    auto xv = randn(T * D), wv = randn(E * Hd * D, 0.1f);
    for (auto& f : xv) f = round_to_bf16(f);
    for (auto& f : wv) f = round_to_bf16(f);
    gpu->write_i32(idx, iv);
    gpu->write(x, xv);
    gpu->write(w, wv);
    if (round == 0) {
      body();  // warm-up: grows scratch buffers before capture
      graph.capture(body);
    }
    graph.replay();
    gpu->synchronize();
    // CPU reference
    Tensor ci = cpu->alloc({T, k}, DType::i32), cx = cpu->alloc({T, D}, DType::f32),
           cw = cpu->alloc({E, Hd, D}, DType::f32);
    cpu->write_i32(ci, iv);
    cpu->write(cx, xv);
    cpu->write(cw, wv);
    Tensor cr = cpu->alloc({E}, DType::i32), cc = cpu->alloc({E}, DType::i32), co = cpu->alloc({E + 1}, DType::i32),
           cs = cpu->alloc({T * k}, DType::i32), ct = cpu->alloc({T * k}, DType::i32),
           cxp = cpu->alloc({T * k, D}, DType::f32), chh = cpu->alloc({T * k, Hd}, DType::f32);
    cpu->moe_plan(ci, int(E), 0, cr, cc, co, cs, ct);
    cpu->moe_permute(cx, ct, co, cxp);
    cpu->grouped_matmul(cxp, cw, true, chh, co);
    EXPECT_EQ(gpu->read_i32(offsets), cpu->read_i32(co)) << "round " << round;
    EXPECT_LT(nerr(gpu->read(h), cpu->read(chh)), 1e-2) << "round " << round << " (seed " << seed << ")";
  }
}

TEST_F(CudaOps, PeakMemoryIsTracked) {
  gpu->synchronize();
  gpu->reset_peak_memory();
  size_t before = gpu->peak_memory_bytes();
  {
    Tensor big = gpu->alloc({64, 1 << 20}, DType::f32);  // 256 MiB
    EXPECT_GE(gpu->peak_memory_bytes(), before + (size_t(256) << 20));
  }
  EXPECT_LT(gpu->current_memory_bytes(), before + (size_t(1) << 20));
  EXPECT_GE(gpu->peak_memory_bytes(), before + (size_t(256) << 20));
}

}  // namespace
}  // namespace moelab
