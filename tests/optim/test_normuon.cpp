// optim.muon_variant = normuon against a double-precision host reference of the seed's Muon step:
// Nesterov momentum, Polar Express orthogonalization (with its 1.02 safety factor applied as
// written, not folded), per-row (tall) or per-column (wide) variance reduction that keeps the
// update's norm, lr * sqrt(max(1, rows / cols)), and cautious weight decay that falls linearly to
// 0 over the run and is scaled by the batch. Two steps, tall and wide shapes, 2-D and a 3-D
// expert stack, f64 CPU engine.
#include <gtest/gtest.h>

#include "backend/cpu/cpu_backend.hpp"
#include "optim/newton_schulz.hpp"
#include "optim/optim_reference.hpp"
#include "optim/lr_schedule.hpp"
#include "optim/optimizer.hpp"

namespace moelab {
namespace {

using namespace testref;

// Polar Express in f64 with the scalars the Backend API carries, which are floats: the
// normalization X0 = G / (1.02 |G| + 1e-6) is G / (|G| + eps) with the 1 / 1.02 folded into the
// first step's coefficients, each rounded to f32 as the engine passes them (with the exact
// constants instead, five steps amplify those roundings to about 1e-6 on some draws).
Mat polar_express(Mat g, int64_t steps) {
  const double eps = double(NewtonSchulz::kPolarEps / NewtonSchulz::kPolarSafety);
  return newton_schulz_iterations(g, steps, eps, [](int64_t s) {
    QuinticCoefficients k{double(kPolarExpress[s].a), double(kPolarExpress[s].b), double(kPolarExpress[s].c)};
    if (s == 0) {
      const double sc = 1.0 / double(NewtonSchulz::kPolarSafety);
      k.a = double(float(k.a * sc));
      k.b = double(float(k.b * sc * sc * sc));
      k.c = double(float(k.c * sc * sc * sc * sc * sc));
    }
    return k;
  });
}

struct HostMatrix {
  Mat p, momentum;
  std::vector<double> v2;
};

// One seed step of one matrix.
void reference_step(HostMatrix& h, const Mat& grad, double lr, double mu, double wd, double beta2) {
  const int64_t m = grad.m, n = grad.n;
  Mat u(m, n);
  for (size_t i = 0; i < grad.a.size(); ++i) {
    h.momentum.a[i] = (1 - mu) * grad.a[i] + mu * h.momentum.a[i];
    u.a[i] = mu * h.momentum.a[i] + (1 - mu) * grad.a[i];
  }
  Mat x = polar_express(u, 5);
  const bool per_row = m >= n;
  const int64_t kept = per_row ? m : n, R = per_row ? n : m;
  std::vector<double> q(static_cast<size_t>(kept), 0.0), s(static_cast<size_t>(kept));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) q[size_t(per_row ? i : j)] += x.at(i, j) * x.at(i, j) / double(R);
  double norm2 = 0, scaled2 = 0;
  for (int64_t r = 0; r < kept; ++r) {
    h.v2[size_t(r)] += (1 - beta2) * (q[size_t(r)] - h.v2[size_t(r)]);
    s[size_t(r)] = 1 / std::sqrt(std::max(h.v2[size_t(r)], 1e-10));
    norm2 += q[size_t(r)] * double(R);
    scaled2 += q[size_t(r)] * double(R) * s[size_t(r)] * s[size_t(r)];
  }
  const double keep = std::sqrt(norm2) / std::max(std::sqrt(scaled2), 1e-10);
  const double lr_eff = lr * std::sqrt(std::max(1.0, double(m) / double(n)));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const double g = x.at(i, j) * s[size_t(per_row ? i : j)] * keep;
      const double p = h.p.at(i, j);
      h.p.at(i, j) = p - lr_eff * g - (g * p >= 0 ? lr_eff * wd * p : 0.0);
    }
}

TEST(NorMuon, TwoStepsMatchTheSeedsUpdate) {
  Rng rng = fresh_rng();
  CpuBackend be(DType::f64, 2);
  Config cfg;
  cfg.train.steps = 4;
  cfg.train.batch_size = 2;
  cfg.train.seq_len = 8;
  cfg.train.total_batch_tokens = 64;  // 4 micro-batches
  cfg.optim.muon_variant = "normuon";
  cfg.optim.cautious_weight_decay = true;
  cfg.optim.weight_decay = 0.4;
  cfg.optim.weight_decay_schedule = "linear";
  cfg.optim.weight_decay_ref_batch = 16;  // wd * sqrt(64 / 16) = 2 wd
  cfg.optim.matrix_lr = 0.05;
  cfg.optim.muon_momentum_start = 0.85;
  cfg.optim.muon_momentum = 0.95;
  cfg.optim.muon_momentum_warmup = 2;
  validate_config(cfg);
  // Tall, wide, square; a 3-D stack of wide experts; two same-shape matrices (one group).
  const std::vector<std::pair<std::string, Shape>> shapes = {
      {"transformer.h.0.mlp.c_fc.weight", {40, 16}},
      {"transformer.h.0.mlp.c_proj.weight", {16, 40}},
      {"transformer.h.0.attn.c_q.weight", {16, 16}},
      {"transformer.h.1.attn.c_q.weight", {16, 16}},
      {"transformer.h.0.mlp.experts.w_proj", {3, 8, 24}},
      {"transformer.h.0.attn.ve_gate.weight", {2, 8}},
  };
  ParamTable table;
  std::vector<std::vector<HostMatrix>> host;
  for (auto& [name, shape] : shapes) {
    Param p;
    p.name = name;
    p.group = ParamGroup::matrix;
    p.value = be.alloc(shape, DType::f64);
    p.grad = be.alloc(shape, DType::f64);
    p.compute = p.value;
    const int64_t count = shape.size() == 3 ? shape[0] : 1, m = shape[shape.size() - 2], n = shape.back();
    std::vector<float> init;
    std::vector<HostMatrix> hm;
    for (int64_t e = 0; e < count; ++e) {
      HostMatrix h{random_mat(rng, m, n, 0.3), Mat(m, n), std::vector<double>(size_t(m >= n ? m : n), 0.0)};
      auto f = to_floats(h.p);
      init.insert(init.end(), f.begin(), f.end());
      hm.push_back(h);
    }
    be.write(p.value, init);
    table.params.push_back(p);
    host.push_back(hm);
  }
  Optimizer opt(be, table, cfg);
  for (int64_t step = 0; step < 2; ++step) {
    const double mu = muon_momentum_at(cfg.optim, step), wd = 0.4 * 2.0 * (1.0 - double(step) / 4.0);
    EXPECT_NEAR(opt.muon_weight_decay(step), wd, 1e-12);
    const double lrm = 0.7;
    for (size_t pi = 0; pi < table.params.size(); ++pi) {
      Param& p = table.params[pi];
      std::vector<float> g;
      for (HostMatrix& h : host[pi]) {
        const Mat grad = random_mat(rng, h.p.m, h.p.n);
        auto f = to_floats(grad);
        g.insert(g.end(), f.begin(), f.end());
        reference_step(h, grad, 0.05 * lrm, mu, wd, 0.95);
      }
      be.write(p.grad, g);
    }
    opt.step(step, lrm);
    for (size_t pi = 0; pi < table.params.size(); ++pi) {
      std::vector<double> ref;
      for (const HostMatrix& h : host[pi]) ref.insert(ref.end(), h.p.a.begin(), h.p.a.end());
      EXPECT_LT(rel_err(read_exact(be, table.params[pi].value), ref), 1e-6)
          << table.params[pi].name << " after step " << step;
    }
  }
  // The second moments are checkpointed state.
  int second = 0;
  for (const NamedTensor& t : opt.state()) second += t.name.ends_with("/second_moment");
  EXPECT_EQ(second, int(shapes.size()));
}

TEST(NorMuon, PolarExpressOrthogonalizes) {
  Rng rng = fresh_rng();
  CpuBackend be(DType::f64, 1);
  for (auto [m, n] : {std::pair<int64_t, int64_t>{24, 40}, {40, 24}}) {
    NewtonSchulz ns(be, m * n, std::min(m, n));
    ns.use_polar_express(true);
    const Mat g = random_mat(rng, m, n);
    Tensor t = be.alloc({m, n}, DType::f64);
    be.write(t, to_floats(g));
    const Tensor x = ns.run(t, 5);
    const std::vector<double> out = read_exact(be, x);
    EXPECT_LT(rel_err(out, polar_express(g, 5).a), 1e-6);
    Mat xm(m, n);
    xm.a = out;
    for (double sv : singular_values(xm)) {
      EXPECT_GT(sv, 0.6);  // all pushed near 1 in five steps
      EXPECT_LT(sv, 1.25);
    }
  }
}

}  // namespace
}  // namespace moelab
