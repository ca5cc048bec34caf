// Causal grouped-query attention, full and sliding-window: forward and lse against a naive softmax
// in double, backward against central finite differences of L = sum(out * w) in f64.
#include <cmath>

#include "gradcheck.hpp"

namespace moelab::test {
namespace {

struct Dims {
  int64_t B, T, Hq, Hkv, hd;
  int64_t window = 0;  // 0: full causal; else query t sees keys t - window .. t
};

// Naive reference: out [B, T, Hq, hd] and lse [B, Hq, T].
void naive_attention(const Dims& d, const std::vector<double>& q, const std::vector<double>& k,
                     const std::vector<double>& v, std::vector<double>& out,
                     std::vector<double>& lse) {
  out.assign(size_t(d.B * d.T * d.Hq * d.hd), 0.0);
  lse.assign(size_t(d.B * d.Hq * d.T), 0.0);
  const double scale = 1.0 / std::sqrt(double(d.hd));
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < d.Hq; ++h) {
      const int64_t hk = h / (d.Hq / d.Hkv);
      for (int64_t t = 0; t < d.T; ++t) {
        const int64_t j0 = d.window > 0 ? std::max<int64_t>(0, t - d.window) : 0;
        std::vector<double> s(size_t(t + 1), -INFINITY);  // -inf outside the window
        double m = -INFINITY;
        for (int64_t j = j0; j <= t; ++j) {
          double acc = 0;
          for (int64_t i = 0; i < d.hd; ++i)
            acc += q[size_t(((b * d.T + t) * d.Hq + h) * d.hd + i)] *
                   k[size_t(((b * d.T + j) * d.Hkv + hk) * d.hd + i)];
          s[size_t(j)] = acc * scale;
          m = std::max(m, s[size_t(j)]);
        }
        double z = 0;
        for (double x : s) z += std::exp(x - m);
        lse[size_t((b * d.Hq + h) * d.T + t)] = m + std::log(z);
        for (int64_t j = j0; j <= t; ++j)
          for (int64_t i = 0; i < d.hd; ++i)
            out[size_t(((b * d.T + t) * d.Hq + h) * d.hd + i)] +=
                std::exp(s[size_t(j)] - m) / z * v[size_t(((b * d.T + j) * d.Hkv + hk) * d.hd + i)];
      }
    }
}

void check_forward(DType dt, const Dims& d, double tol) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(dt, 2);
  Tensor q = random_tensor(be, {d.B, d.T, d.Hq, d.hd}, rng);
  Tensor k = random_tensor(be, {d.B, d.T, d.Hkv, d.hd}, rng);
  Tensor v = random_tensor(be, {d.B, d.T, d.Hkv, d.hd}, rng);
  Tensor out = be.alloc(q.shape, dt), lse = be.alloc({d.B, d.Hq, d.T}, dt);
  be.fill(out, std::nanf(""));  // every element must be written
  be.attention_fwd(q, k, v, out, lse, int(d.window));
  std::vector<double> ro, rl;
  naive_attention(d, values(q), values(k), values(v), ro, rl);
  EXPECT_LT(normalized_error(values(out), ro), tol);
  EXPECT_LT(normalized_error(values(lse), rl), tol);
}

TEST(Attention, ForwardMatchesNaiveMultiHead) { check_forward(DType::f64, {2, 7, 3, 3, 8}, 1e-13); }
TEST(Attention, ForwardMatchesNaiveGroupedQuery) {
  check_forward(DType::f64, {2, 9, 6, 2, 4}, 1e-13);
  check_forward(DType::f32, {1, 33, 4, 1, 16}, 1e-5);
}

TEST(Attention, ForwardMatchesNaiveSlidingWindow) {
  check_forward(DType::f64, {2, 11, 4, 2, 8, 3}, 1e-13);
  check_forward(DType::f64, {1, 9, 2, 1, 4, 1}, 1e-13);    // each query sees itself and one key
  check_forward(DType::f64, {1, 6, 2, 2, 4, 100}, 1e-13);  // window past T: full causal
  check_forward(DType::f32, {1, 70, 4, 2, 128, 35}, 1e-5);
}
TEST(Attention, ForwardMatchesNaiveEveryHeadDim) {
  for (int64_t hd : {32, 64, 96, 128, 256}) check_forward(DType::f32, {1, 19, 2, 1, hd, 0}, 1e-5);
}

void check_backward(const Dims& d) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " window " + std::to_string(d.window));
  Rng rng(seed);
  CpuBackend be(DType::f64, 2);
  Tensor q = random_tensor(be, {d.B, d.T, d.Hq, d.hd}, rng);
  Tensor k = random_tensor(be, {d.B, d.T, d.Hkv, d.hd}, rng);
  Tensor v = random_tensor(be, {d.B, d.T, d.Hkv, d.hd}, rng);
  Tensor out = be.alloc(q.shape, DType::f64), lse = be.alloc({d.B, d.Hq, d.T}, DType::f64);
  const auto w = randn(rng, out.numel());
  auto loss = [&] {
    be.attention_fwd(q, k, v, out, lse, int(d.window));
    return weighted_sum(out, w);
  };
  loss();
  Tensor dout = tensor_from(be, out.shape, w);
  Tensor dq = be.alloc(q.shape, DType::f64), dk = be.alloc(k.shape, DType::f64),
         dv = be.alloc(v.shape, DType::f64);
  be.fill(dk, std::nanf(""));  // the backward must overwrite, not accumulate
  be.attention_bwd(q, k, v, out, lse, dout, dq, dk, dv, int(d.window));
  EXPECT_LT(normalized_error(values(dq), numeric_grad(q, loss)), 1e-8);
  EXPECT_LT(normalized_error(values(dk), numeric_grad(k, loss)), 1e-8);
  EXPECT_LT(normalized_error(values(dv), numeric_grad(v, loss)), 1e-8);
}

TEST(Attention, BackwardMatchesFiniteDifferences) { check_backward({2, 5, 4, 2, 4}); }
TEST(Attention, BackwardMatchesFiniteDifferencesSlidingWindow) {
  check_backward({2, 8, 4, 2, 4, 2});
  check_backward({1, 7, 2, 1, 8, 1});
}

TEST(Attention, RejectsHeadCountNotDivisible) {
  CpuBackend be(DType::f32, 1);
  Tensor q = be.alloc({1, 4, 3, 8}, DType::f32), k = be.alloc({1, 4, 2, 8}, DType::f32);
  Tensor out = be.alloc(q.shape, DType::f32), lse = be.alloc({1, 3, 4}, DType::f32);
  EXPECT_THROW(be.attention_fwd(q, k, k, out, lse), Error);
}

}  // namespace
}  // namespace moelab::test
