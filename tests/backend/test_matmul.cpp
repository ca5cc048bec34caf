// matmul's throughput at 512^3 (a gross-regression guard). Its values against a naive product,
// every transpose, alpha/beta, NaN under beta = 0 and degenerate shapes are rows of the op table.
#include <chrono>
#include <cstdio>

#include "gradcheck.hpp"

namespace moelab::test {
namespace {

TEST(Matmul, ThroughputF32At512) {
  CpuBackend be(DType::f32, 0);
  Rng rng(fresh_seed());
  const int64_t n = 512;
  Tensor A = random_tensor(be, {n, n}, rng), B = random_tensor(be, {n, n}, rng);
  Tensor C = be.alloc({n, n}, DType::f32);
  be.matmul(A, false, B, true, C);  // warm up packing buffers and threads
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    be.matmul(A, false, B, true, C);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  const double gflops = 2.0 * n * n * n / best * 1e-9;
  std::printf("matmul f32 512^3 (A B^T) on %s: %.1f GFLOP/s (best of 5: %.2f ms)\n",
              be.name().c_str(), gflops, best * 1e3);
  EXPECT_GT(gflops, 0.5);  // a gross-regression guard only; the machine is shared
}

}  // namespace
}  // namespace moelab::test
