// matmul against a naive triple loop in double: all transpose combinations,
// alpha/beta, beta = 0 over NaN, awkward sizes that cross the kernel's tile edges, and a
// throughput figure at 512^3.
#include <chrono>
#include <cstdio>

#include "gradcheck.hpp"

namespace moelab::test {
namespace {

// C = alpha * op(A) op(B) + beta * C0, in double.
std::vector<double> naive_matmul(const std::vector<double>& A, bool ta, const std::vector<double>& B,
                                 bool tb, const std::vector<double>& C0, int64_t M, int64_t N,
                                 int64_t K, double alpha, double beta) {
  std::vector<double> C(size_t(M * N));
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k)
        s += (ta ? A[size_t(k * M + i)] : A[size_t(i * K + k)]) *
             (tb ? B[size_t(j * K + k)] : B[size_t(k * N + j)]);
      C[size_t(i * N + j)] = alpha * s + (beta == 0 ? 0.0 : beta * C0[size_t(i * N + j)]);
    }
  return C;
}

void check_matmul(DType dt, int64_t M, int64_t N, int64_t K, bool ta, bool tb, float alpha,
                  float beta, double tol) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " M N K " + std::to_string(M) + " " +
               std::to_string(N) + " " + std::to_string(K) + " ta " + std::to_string(ta) +
               " tb " + std::to_string(tb));
  Rng rng(seed);
  CpuBackend be(dt, 2);
  Tensor A = random_tensor(be, ta ? Shape{K, M} : Shape{M, K}, rng);
  Tensor B = random_tensor(be, tb ? Shape{N, K} : Shape{K, N}, rng);
  Tensor C = random_tensor(be, {M, N}, rng);
  const auto c0 = values(C);
  be.matmul(A, ta, B, tb, C, alpha, beta);
  const auto ref = naive_matmul(values(A), ta, values(B), tb, c0, M, N, K, alpha, beta);
  EXPECT_LT(normalized_error(values(C), ref), tol);
}

TEST(Matmul, AllTransposesF64) {
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) check_matmul(DType::f64, 37, 29, 53, ta, tb, 1.0f, 0.0f, 1e-13);
}

TEST(Matmul, AllTransposesF32AcrossBlockEdges) {
  // Sizes past one MC x NC x KC block with ragged edges in every dimension.
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) check_matmul(DType::f32, 101, 263, 301, ta, tb, 1.0f, 0.0f, 1e-5);
}

TEST(Matmul, AlphaBeta) {
  check_matmul(DType::f64, 13, 17, 19, false, true, 0.5f, 2.0f, 1e-13);
  check_matmul(DType::f64, 13, 17, 300, true, false, -1.5f, 1.0f, 1e-13);
  check_matmul(DType::f32, 64, 48, 32, false, false, 1.0f, -0.25f, 1e-5);
}

TEST(Matmul, TinyAndDegenerateShapes) {
  check_matmul(DType::f64, 1, 1, 1, false, false, 1.0f, 0.0f, 1e-14);
  check_matmul(DType::f64, 1, 40, 7, true, true, 1.0f, 0.0f, 1e-14);
  check_matmul(DType::f64, 40, 1, 7, false, true, 1.0f, 1.0f, 1e-14);
}

TEST(Matmul, BetaZeroIgnoresNaN) {
  CpuBackend be(DType::f32, 2);
  Rng rng(fresh_seed());
  Tensor A = random_tensor(be, {20, 30}, rng), B = random_tensor(be, {30, 10}, rng);
  Tensor C = be.alloc({20, 10}, DType::f32);
  be.fill(C, std::nanf(""));
  be.matmul(A, false, B, false, C, 1.0f, 0.0f);
  for (float v : be.read(C)) ASSERT_FALSE(std::isnan(v));
  EXPECT_LT(normalized_error(values(C), naive_matmul(values(A), false, values(B), false, {}, 20, 10,
                                                     30, 1.0, 0.0)),
            1e-5);
}

TEST(Matmul, ZeroDepthScalesC) {
  CpuBackend be(DType::f64, 2);
  Tensor A = be.alloc({4, 0}, DType::f64), B = be.alloc({0, 3}, DType::f64);
  Tensor C = be.alloc({4, 3}, DType::f64);
  be.fill(C, 2.0f);
  be.matmul(A, false, B, false, C, 1.0f, 0.5f);
  for (float v : be.read(C)) EXPECT_EQ(v, 1.0f);
  be.fill(C, std::nanf(""));
  be.matmul(A, false, B, false, C, 1.0f, 0.0f);
  for (float v : be.read(C)) EXPECT_EQ(v, 0.0f);
}

TEST(Matmul, RejectsMismatchedShapes) {
  CpuBackend be(DType::f32, 1);
  Tensor A = be.alloc({4, 5}, DType::f32), B = be.alloc({6, 3}, DType::f32);
  Tensor C = be.alloc({4, 3}, DType::f32);
  EXPECT_THROW(be.matmul(A, false, B, false, C), Error);
  Tensor Bd = be.alloc({5, 3}, DType::f64);
  EXPECT_THROW(be.matmul(A, false, Bd, false, C), Error);
}

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
