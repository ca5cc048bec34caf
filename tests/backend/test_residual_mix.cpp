// The residual-mix ops of the seed's recipe against finite differences in f64: the per-layer
// scalar mix y = a x + b x0 (dx may alias dy, dx0 and the scalar gradients accumulate) and the
// gated value embedding v += 2 sigmoid(x[:, :C] w^T) * ve (dve written, dw and dx accumulate),
// plus bit-identical results for 1 and 3 threads.
#include "gradcheck.hpp"

namespace moelab::test {
namespace {

TEST(LambdaMix, ForwardAndBackwardMatchFiniteDifferences) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f64, 2);
  const int64_t N = 7, D = 9;
  Tensor a = random_tensor(be, {1}, rng), b = random_tensor(be, {1}, rng);
  // dx = a dy and dx0 = b dy: a scalar near zero would leave the finite differences' absolute
  // rounding (~1e-10) as a large share of a tiny gradient, so keep |a|, |b| >= 0.5.
  for (Tensor* s : {&a, &b}) {
    const double v = values(*s)[0];
    set_values(*s, {std::copysign(0.5 + std::fabs(v), v)});
  }
  Tensor x = random_tensor(be, {N, D}, rng), x0 = random_tensor(be, {N, D}, rng);
  Tensor y = be.alloc({N, D}, DType::f64);
  const std::vector<double> w = randn(rng, N * D);
  auto loss = [&] {
    be.lambda_mix_fwd(a, x, b, x0, y);
    return weighted_sum(y, w);
  };
  loss();
  const std::vector<double> yv = values(y), xv = values(x), x0v = values(x0);
  for (int64_t i = 0; i < N * D; ++i)
    EXPECT_NEAR(yv[size_t(i)], values(a)[0] * xv[size_t(i)] + values(b)[0] * x0v[size_t(i)], 1e-14);
  const std::vector<double> na = numeric_grad(a, loss), nb = numeric_grad(b, loss);
  const std::vector<double> nx = numeric_grad(x, loss), nx0 = numeric_grad(x0, loss);

  // Backward with accumulating outputs pre-filled, and dx aliasing dy.
  Tensor dy = tensor_from(be, {N, D}, w);
  const std::vector<double> dx0_start = randn(rng, N * D), da_start = randn(rng, 1), db_start = randn(rng, 1);
  Tensor dx0 = tensor_from(be, {N, D}, dx0_start), da = tensor_from(be, {1}, da_start), db = tensor_from(be, {1}, db_start);
  be.lambda_mix_bwd(a, x, b, x0, dy, dy, dx0, da, db);
  std::vector<double> got_dx0 = values(dx0);
  for (size_t i = 0; i < got_dx0.size(); ++i) got_dx0[i] -= dx0_start[i];
  EXPECT_LT(normalized_error(values(dy), nx), 1e-8) << "dx (in place of dy)";
  EXPECT_LT(normalized_error(got_dx0, nx0), 1e-8) << "dx0 accumulates";
  EXPECT_NEAR(values(da)[0] - da_start[0], na[0], 1e-7 * (1 + std::fabs(na[0])));
  EXPECT_NEAR(values(db)[0] - db_start[0], nb[0], 1e-7 * (1 + std::fabs(nb[0])));
}

TEST(ValueGate, ForwardAndBackwardMatchFiniteDifferences) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f64, 2);
  const int64_t N = 6, D = 10, H = 3, C = 4, hd = 5;  // the gate reads 4 of 10 channels
  Tensor x = random_tensor(be, {N, D}, rng), w = random_tensor(be, {H, C}, rng, 0.7);
  Tensor ve = random_tensor(be, {N, H * hd}, rng);
  const std::vector<double> v0 = randn(rng, N * H * hd);
  Tensor v = be.alloc({N, H * hd}, DType::f64), gate = be.alloc({N, H}, DType::f64);
  const std::vector<double> wts = randn(rng, N * H * hd);
  auto loss = [&] {
    set_values(v, v0);
    be.value_gate_fwd(x, w, ve, v, gate);
    return weighted_sum(v, wts);
  };
  loss();
  // The gate by hand for one (n, h).
  {
    double z = 0;
    for (int64_t c = 0; c < C; ++c) z += values(x)[size_t(2 * D + c)] * values(w)[size_t(1 * C + c)];
    EXPECT_NEAR(values(gate)[size_t(2 * H + 1)], 2.0 / (1.0 + std::exp(-z)), 1e-14);
  }
  const std::vector<double> nx = numeric_grad(x, loss), nw = numeric_grad(w, loss), nve = numeric_grad(ve, loss);
  Tensor dv = tensor_from(be, {N, H * hd}, wts);
  Tensor dve = be.alloc({N, H * hd}, DType::f64);
  be.fill(dve, NAN);  // written, not accumulated
  const std::vector<double> dw_start = randn(rng, H * C), dx_start = randn(rng, N * D);
  Tensor dw = tensor_from(be, {H, C}, dw_start), dx = tensor_from(be, {N, D}, dx_start);
  be.value_gate_bwd(x, w, ve, gate, dv, dve, dw, dx);
  std::vector<double> gdw = values(dw), gdx = values(dx);
  for (size_t i = 0; i < gdw.size(); ++i) gdw[i] -= dw_start[i];
  for (size_t i = 0; i < gdx.size(); ++i) gdx[i] -= dx_start[i];
  EXPECT_LT(normalized_error(values(dve), nve), 1e-8) << "dve";
  EXPECT_LT(normalized_error(gdw, nw), 1e-8) << "dw";
  EXPECT_LT(normalized_error(gdx, nx), 1e-8) << "dx (columns past C get no gradient)";
}

TEST(ValueGate, SameBitsForAnyThreadCount) {
  Rng rng(fresh_seed());
  const int64_t N = 300, D = 64, H = 4, C = 32, hd = 16;
  std::vector<std::vector<double>> outs;
  for (int threads : {1, 3}) {
    CpuBackend be(DType::f32, threads);
    Rng r = rng;  // same inputs for both
    Tensor x = random_tensor(be, {N, D}, r), w = random_tensor(be, {H, C}, r), ve = random_tensor(be, {N, H * hd}, r);
    Tensor v = random_tensor(be, {N, H * hd}, r), gate = be.alloc({N, H}, DType::f32);
    be.value_gate_fwd(x, w, ve, v, gate);
    Tensor dv = random_tensor(be, {N, H * hd}, r), dve = be.alloc({N, H * hd}, DType::f32);
    Tensor dw = random_tensor(be, {H, C}, r), dx = random_tensor(be, {N, D}, r);
    be.value_gate_bwd(x, w, ve, gate, dv, dve, dw, dx);
    Tensor a = random_tensor(be, {1}, r), b = random_tensor(be, {1}, r), da = random_tensor(be, {1}, r);
    Tensor db = random_tensor(be, {1}, r), dx0 = random_tensor(be, {N, D}, r);
    be.lambda_mix_bwd(a, x, b, ve.view({N, D}), dx, dx, dx0, da, db);
    std::vector<double> all;
    for (const Tensor* t : {&v, &gate, &dve, &dw, &dx, &dx0, &da, &db}) {
      auto vals = values(*t);
      all.insert(all.end(), vals.begin(), vals.end());
    }
    outs.push_back(all);
  }
  EXPECT_EQ(outs[0], outs[1]);
}

}  // namespace
}  // namespace moelab::test
