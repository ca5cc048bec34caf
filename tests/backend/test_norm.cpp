// RMSNorm and rotary + QK-norm: forwards against naive double references, backwards against
// central finite differences of L = sum(out * w) in f64, and the accumulate flag.
#include <cmath>
#include <functional>

#include "gradcheck.hpp"

namespace moelab::test {
namespace {

constexpr double kEps = Backend::kNormEps;

TEST(RmsNorm, ForwardMatchesNaive) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f32, 2);
  Tensor x = random_tensor(be, {3, 5, 24}, rng, 3.0);
  Tensor y = be.alloc(x.shape, DType::f32), rstd = be.alloc({15}, DType::f32);
  be.rmsnorm_fwd(x, y, rstd);
  const auto xv = values(x);
  std::vector<double> ry, rr;
  for (int64_t r = 0; r < 15; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < 24; ++i) ss += xv[size_t(r * 24 + i)] * xv[size_t(r * 24 + i)];
    const double rs = 1.0 / std::sqrt(ss / 24 + kEps);
    rr.push_back(rs);
    for (int64_t i = 0; i < 24; ++i) ry.push_back(xv[size_t(r * 24 + i)] * rs);
  }
  EXPECT_LT(normalized_error(values(y), ry), 1e-6);
  EXPECT_LT(normalized_error(values(rstd), rr), 1e-6);
}

TEST(RmsNorm, BackwardMatchesFiniteDifferencesAndAccumulates) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f64, 2);
  Tensor x = random_tensor(be, {6, 10}, rng);
  Tensor y = be.alloc(x.shape, DType::f64), rstd = be.alloc({6}, DType::f64);
  const auto w = randn(rng, x.numel());
  auto loss = [&] {
    be.rmsnorm_fwd(x, y, rstd);
    return weighted_sum(y, w);
  };
  loss();
  Tensor dy = tensor_from(be, x.shape, w);
  Tensor dx = be.alloc(x.shape, DType::f64);
  be.rmsnorm_bwd(x, rstd, dy, dx, false);
  const auto num = numeric_grad(x, loss);
  EXPECT_LT(normalized_error(values(dx), num), 1e-8);
  // accumulate adds onto what is there.
  const auto base = randn(rng, x.numel());
  set_values(dx, base);
  be.rmsnorm_bwd(x, rstd, dy, dx, true);
  std::vector<double> expect(base.size());
  for (size_t i = 0; i < base.size(); ++i) expect[i] = base[i] + num[i];
  EXPECT_LT(normalized_error(values(dx), expect), 1e-8);
}

// cos/sin tables [max_seq, hd/2] for the rotary test.
void make_tables(CpuBackend& be, int64_t max_seq, int64_t hd, DType dt, Tensor& c, Tensor& s) {
  c = be.alloc({max_seq, hd / 2}, dt);
  s = be.alloc({max_seq, hd / 2}, dt);
  std::vector<double> cv, sv;
  for (int64_t t = 0; t < max_seq; ++t)
    for (int64_t i = 0; i < hd / 2; ++i) {
      const double f = double(t) * std::pow(10000.0, -2.0 * double(i) / double(hd));
      cv.push_back(std::cos(f));
      sv.push_back(std::sin(f));
    }
  set_values(c, cv);
  set_values(s, sv);
}

TEST(RopeNorm, ForwardMatchesNaive) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f64, 2);
  const int64_t B = 2, T = 5, H = 3, hd = 8, half = hd / 2;
  Tensor x = random_tensor(be, {B, T, H, hd}, rng);
  Tensor c, s;
  make_tables(be, 16, hd, DType::f32, c, s);  // f32 tables in f64 mode, as the model passes them
  Tensor y = be.alloc(x.shape, DType::f64), rstd = be.alloc({B, T, H}, DType::f64);
  be.rope_norm_fwd(x, c, s, y, rstd);
  const auto xv = values(x), cv = values(c), sv = values(s);
  std::vector<double> ry(xv.size()), rr;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h) {
        const size_t base = size_t(((b * T + t) * H + h) * hd);
        double ss = 0;
        for (int64_t i = 0; i < half; ++i) {
          const double x1 = xv[base + size_t(i)], x2 = xv[base + size_t(i + half)];
          const double co = cv[size_t(t * half + i)], si = sv[size_t(t * half + i)];
          ry[base + size_t(i)] = x1 * co + x2 * si;
          ry[base + size_t(i + half)] = -x1 * si + x2 * co;
          ss += ry[base + size_t(i)] * ry[base + size_t(i)] +
                ry[base + size_t(i + half)] * ry[base + size_t(i + half)];
        }
        const double rs = 1.0 / std::sqrt(ss / double(hd) + kEps);
        rr.push_back(rs);
        for (int64_t i = 0; i < hd; ++i) ry[base + size_t(i)] *= rs;
      }
  EXPECT_LT(normalized_error(values(y), ry), 1e-13);
  EXPECT_LT(normalized_error(values(rstd), rr), 1e-13);
}

TEST(RopeNorm, BackwardMatchesFiniteDifferences) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f64, 2);
  const int64_t B = 2, T = 4, H = 2, hd = 6;
  Tensor x = random_tensor(be, {B, T, H, hd}, rng);
  Tensor c, s;
  make_tables(be, 8, hd, DType::f64, c, s);
  Tensor y = be.alloc(x.shape, DType::f64), rstd = be.alloc({B, T, H}, DType::f64);
  const auto w = randn(rng, x.numel());
  auto loss = [&] {
    be.rope_norm_fwd(x, c, s, y, rstd);
    return weighted_sum(y, w);
  };
  loss();
  Tensor dy = tensor_from(be, x.shape, w), dx = be.alloc(x.shape, DType::f64);
  be.rope_norm_bwd(x, c, s, rstd, dy, dx);
  EXPECT_LT(normalized_error(values(dx), numeric_grad(x, loss)), 1e-8);
}

// The dense producers of FP8 operands (RMSNorm forward and backward, the RoPE norm's backward, the
// loss's dlogits) raise a tensor amax to the largest |value| they wrote, never lowering it, and
// write the same values as without one.
TEST(DenseProducers, RaiseTheirOutputsAmax) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f32, 2);
  auto max_abs = [](const Tensor& t) {
    double m = 0;
    for (double v : values(t)) m = std::max(m, std::fabs(v));
    return m;
  };
  // op(amax) writes out; its values without an amax are `plain`.
  auto check = [&](const std::function<void(const AmaxSink*)>& op, const Tensor& out, const std::string& what) {
    op(nullptr);
    const std::vector<double> plain = values(out);
    for (const double start : {0.0, 1e9}) {  // from zero, and from above: raised, never lowered
      Tensor amax = tensor_from(be, {1}, {start});
      const AmaxSink sink{amax, {}};
      op(&sink);
      EXPECT_EQ(values(out), plain) << what;
      EXPECT_EQ(values(amax)[0], std::max(start, max_abs(out))) << what << " from " << start;
    }
    EXPECT_GT(max_abs(out), 0.0) << what;
  };
  Tensor x = random_tensor(be, {6, 40}, rng, 3.0), y = be.alloc(x.shape, DType::f32), rstd = be.alloc({6}, DType::f32);
  check([&](const AmaxSink* a) { be.rmsnorm_fwd(x, y, rstd, a); }, y, "rmsnorm_fwd");
  Tensor dy = random_tensor(be, x.shape, rng), dx = be.alloc(x.shape, DType::f32);
  check([&](const AmaxSink* a) { be.rmsnorm_bwd(x, rstd, dy, dx, false, a); }, dx, "rmsnorm_bwd");
  const int64_t B = 2, T = 4, H = 2, hd = 8;
  Tensor q = random_tensor(be, {B, T, H, hd}, rng), c, sn;
  make_tables(be, 8, hd, DType::f32, c, sn);
  Tensor qy = be.alloc(q.shape, DType::f32), qr = be.alloc({B, T, H}, DType::f32);
  be.rope_norm_fwd(q, c, sn, qy, qr);
  Tensor dqy = random_tensor(be, q.shape, rng), dq = be.alloc(q.shape, DType::f32);
  check([&](const AmaxSink* a) { be.rope_norm_bwd(q, c, sn, qr, dqy, dq, a); }, dq, "rope_norm_bwd");
  Tensor logits = random_tensor(be, {5, 30}, rng, 5.0), losses = be.alloc({5}, DType::f32);
  Tensor targets = i32_tensor(be, {5}, {1, -1, 29, 0, 7}), dl = be.alloc(logits.shape, DType::f32);
  check([&](const AmaxSink* a) { be.softcap_xent(logits, targets, 15.f, 0.5f, losses, dl, a); }, dl, "softcap_xent");
}

TEST(RopeNorm, RejectsSequenceLongerThanTable) {
  CpuBackend be(DType::f32, 1);
  Tensor x = be.alloc({1, 9, 1, 4}, DType::f32), c, s;
  make_tables(be, 8, 4, DType::f32, c, s);
  Tensor y = be.alloc(x.shape, DType::f32), rstd = be.alloc({1, 9, 1}, DType::f32);
  EXPECT_THROW(be.rope_norm_fwd(x, c, s, y, rstd), Error);
}

}  // namespace
}  // namespace moelab::test
