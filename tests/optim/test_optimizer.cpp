// The Optimizer against a double-precision host reference: two Muon steps (momentum, Nesterov
// blend, Newton-Schulz, aspect scaling, weight decay) and two AdamW steps (both groups, d_model
// lr scaling), per expert for 3-D tensors; plus its state names, resume through state(), and the
// promise that a step makes no host transfers.
#include <gtest/gtest.h>

#include <map>
#include <random>

#include "backend/cpu/cpu_backend.hpp"
#include "optim/optim_reference.hpp"
#include "optim/optimizer.hpp"

namespace moelab {
namespace {

using namespace testref;

Rng fresh_rng() {
  std::random_device rd;
  return Rng((uint64_t(rd()) << 32) ^ rd());
}

struct Spec {
  std::string name;
  ParamGroup group;
  Shape shape;
};

const std::vector<Spec>& specs() {
  static const std::vector<Spec> s = {
      {"transformer.wte.weight", ParamGroup::embedding, {50, 32}},
      {"transformer.h.0.attn.c_q.weight", ParamGroup::matrix, {48, 48}},
      {"transformer.h.0.mlp.c_fc.weight", ParamGroup::matrix, {96, 32}},    // tall: scale sqrt(3)
      {"transformer.h.0.mlp.c_proj.weight", ParamGroup::matrix, {32, 96}},  // wide: scale 1
      {"transformer.h.1.mlp.experts.w_fc", ParamGroup::matrix, {3, 40, 24}},
      {"lm_head.weight", ParamGroup::unembedding, {50, 32}},
  };
  return s;
}

// Host mirror of one parameter and its optimizer state.
struct HostParam {
  std::vector<double> value, m, v;
};

ParamTable make_table(Backend& b, Rng& rng, std::vector<HostParam>& host) {
  ParamTable t;
  host.clear();
  for (const Spec& s : specs()) {
    Param p;
    p.name = s.name;
    p.group = s.group;
    p.value = b.alloc(s.shape, b.master_dtype());
    p.grad = b.alloc(s.shape, b.master_dtype());
    p.compute = p.value;
    std::vector<float> v(size_t(p.value.numel()));
    for (auto& x : v) x = float(0.05 * rng.normal());
    b.write(p.value, v);
    b.fill(p.grad, 0.0f);
    host.push_back({{v.begin(), v.end()}, std::vector<double>(v.size(), 0.0), std::vector<double>(v.size(), 0.0)});
    t.params.push_back(p);
  }
  return t;
}

// Fresh gradients; expert e of a 3-D tensor is scaled by 10^(e-1) so that normalizing the experts
// jointly instead of one by one would visibly shrink the small ones' updates.
std::vector<std::vector<double>> random_grads(Backend& b, ParamTable& t, Rng& rng) {
  std::vector<std::vector<double>> grads;
  for (Param& p : t.params) {
    std::vector<float> g(size_t(p.grad.numel()));
    const int64_t per = p.grad.ndim() == 3 ? p.grad.numel() / p.grad.dim(0) : p.grad.numel();
    for (size_t i = 0; i < g.size(); ++i) {
      const double scale = p.grad.ndim() == 3 ? std::pow(10.0, double(int64_t(i) / per) - 1.0) : 1.0;
      g[i] = float(scale * rng.normal());
    }
    b.write(p.grad, g);
    grads.emplace_back(g.begin(), g.end());
  }
  return grads;
}

// Reference step for every parameter, mirroring nanochat in double precision.
void reference_step(const OptimConfig& o, const ModelConfig& model, std::vector<HostParam>& host,
                    std::vector<std::vector<double>>& bufs, const std::vector<std::vector<double>>& grads,
                    int64_t step, double lrm) {
  const double mu = o.muon_momentum_start +
                    (o.muon_momentum - o.muon_momentum_start) * std::min(1.0, double(step) / double(o.muon_momentum_warmup));
  const double dscale = 1.0 / std::sqrt(double(model.d_model) / 768.0);
  for (size_t i = 0; i < specs().size(); ++i) {
    const Spec& s = specs()[i];
    HostParam& h = host[i];
    const std::vector<double>& g = grads[i];
    if (s.group == ParamGroup::matrix) {
      const int64_t count = s.shape.size() == 3 ? s.shape[0] : 1;
      const int64_t rows = s.shape[s.shape.size() - 2], cols = s.shape.back();
      const double lr = o.matrix_lr * lrm;
      for (int64_t e = 0; e < count; ++e) {
        Mat u(rows, cols);
        for (int64_t k = 0; k < rows * cols; ++k) {
          const size_t j = size_t(e * rows * cols + k);
          bufs[i][j] = mu * bufs[i][j] + (1 - mu) * g[j];
          u.a[size_t(k)] = (1 - mu) * g[j] + mu * bufs[i][j];
        }
        const Mat x = newton_schulz(u, o.muon_ns_steps);
        const double scale = std::sqrt(std::max(1.0, double(rows) / double(cols)));
        for (int64_t k = 0; k < rows * cols; ++k) {
          double& p = h.value[size_t(e * rows * cols + k)];
          p = p * (1 - lr * o.weight_decay) - lr * scale * x.a[size_t(k)];
        }
      }
    } else {
      const double lr = (s.group == ParamGroup::embedding ? o.embedding_lr : o.unembedding_lr) * dscale * lrm;
      const double b1 = o.adam_beta1, b2 = o.adam_beta2, t = double(step + 1);
      for (size_t j = 0; j < g.size(); ++j) {
        h.m[j] = b1 * h.m[j] + (1 - b1) * g[j];
        h.v[j] = b2 * h.v[j] + (1 - b2) * g[j] * g[j];
        const double mhat = h.m[j] / (1 - std::pow(b1, t)), vhat = h.v[j] / (1 - std::pow(b2, t));
        h.value[j] = h.value[j] * (1 - lr * o.weight_decay) - lr * mhat / (std::sqrt(vhat) + o.adam_eps);
      }
    }
  }
}

struct Case {
  DType dtype;
  double tol;  // f64 is bounded by the f32 scalars (lr, momentum, betas) the Backend API carries
};

class OptimizerReference : public ::testing::TestWithParam<Case> {};

TEST_P(OptimizerReference, TwoStepsMatchHostReference) {
  const Case c = GetParam();
  CpuBackend b(c.dtype, 2);
  Rng rng = fresh_rng();
  OptimConfig o;
  o.weight_decay = 0.1 * rng.uniform();
  o.matrix_lr = 0.01 + 0.03 * rng.uniform();
  ModelConfig model;
  model.d_model = 192;  // AdamW lrs x 2
  std::vector<HostParam> host;
  ParamTable table = make_table(b, rng, host);
  Optimizer opt(b, table, o, model);
  EXPECT_DOUBLE_EQ(opt.embedding_lr(), 2 * o.embedding_lr);
  EXPECT_DOUBLE_EQ(opt.unembedding_lr(), 2 * o.unembedding_lr);

  std::vector<std::vector<double>> bufs;
  for (const auto& h : host) bufs.emplace_back(h.value.size(), 0.0);
  const double lrms[] = {1.0, 0.3 + 0.5 * rng.uniform()};
  for (int64_t step = 0; step < 2; ++step) {
    std::vector<std::vector<double>> before;
    for (const auto& h : host) before.push_back(h.value);
    const auto grads = random_grads(b, table, rng);
    opt.step(step, lrms[step]);
    reference_step(o, model, host, bufs, grads, step, lrms[step]);
    for (size_t i = 0; i < specs().size(); ++i) {
      SCOPED_TRACE(specs()[i].name + " step " + std::to_string(step));
      const std::vector<double> got = read_exact(b, table.params[i].value);
      // Compare the updates, not the weights: the update is small next to the weight.
      const Shape& shape = specs()[i].shape;
      const int64_t parts = shape.size() == 3 ? shape[0] : 1;
      const size_t per = got.size() / size_t(parts);
      for (int64_t e = 0; e < parts; ++e) {
        std::vector<double> d_got, d_ref;
        for (size_t j = size_t(e) * per; j < size_t(e + 1) * per; ++j) {
          d_got.push_back(double(got[j]) - before[i][j]);
          d_ref.push_back(host[i].value[j] - before[i][j]);
        }
        EXPECT_LT(rel_err(d_got, d_ref), c.tol) << "expert/part " << e;
      }
      // Keep the host mirror on the engine's values so f32 rounding does not accumulate.
      host[i].value.assign(got.begin(), got.end());
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, OptimizerReference,
                         ::testing::Values(Case{DType::f32, 5e-5}, Case{DType::f64, 5e-5}),
                         [](const auto& info) { return std::string(dtype_name(info.param.dtype)); });

TEST(Optimizer, ExpertTensorsAreOrthogonalizedPerExpert) {
  CpuBackend b(DType::f32, 2);
  Rng rng = fresh_rng();
  ParamTable t;
  Param p;
  p.name = "transformer.h.0.mlp.experts.w_proj";
  p.group = ParamGroup::matrix;
  p.value = b.alloc({4, 32, 16}, DType::f32);
  p.grad = b.alloc({4, 32, 16}, DType::f32);
  p.compute = p.value;
  b.fill(p.value, 0.0f);
  std::vector<float> g(size_t(p.grad.numel()));
  for (size_t i = 0; i < g.size(); ++i) g[i] = float(std::pow(10.0, double(i / (32 * 16)) * 2.0 - 3.0) * rng.normal());
  b.write(p.grad, g);
  t.params.push_back(p);
  OptimConfig o;
  o.weight_decay = 0;
  Optimizer opt(b, t, o, ModelConfig{});
  opt.step(0, 1.0);
  const std::vector<float> w = b.read(t.params[0].value);
  for (int64_t e = 0; e < 4; ++e) {
    SCOPED_TRACE("expert " + std::to_string(e));
    Mat upd(32, 16);
    for (int64_t k = 0; k < 32 * 16; ++k) upd.a[size_t(k)] = -double(w[size_t(e * 32 * 16 + k)]) / (o.matrix_lr * std::sqrt(2.0));
    for (double s : singular_values(upd)) {
      EXPECT_GE(s, 0.6);
      EXPECT_LE(s, 1.3);
    }
  }
}

TEST(Optimizer, StateNamesAreStableAndZeroAtStart) {
  CpuBackend b(DType::f32, 1);
  Rng rng = fresh_rng();
  std::vector<HostParam> host;
  ParamTable t1 = make_table(b, rng, host), t2 = make_table(b, rng, host);
  Optimizer o1(b, t1, OptimConfig{}, ModelConfig{}), o2(b, t2, OptimConfig{}, ModelConfig{});
  const auto s1 = o1.state(), s2 = o2.state();
  ASSERT_EQ(s1.size(), 4u + 2u * 2u);  // momentum per matrix, exp_avg + exp_avg_sq per AdamW param
  std::map<std::string, Shape> names;
  for (size_t i = 0; i < s1.size(); ++i) {
    EXPECT_EQ(s1[i].name, s2[i].name);
    names[s1[i].name] = s1[i].tensor.shape;
    for (float v : b.read(s1[i].tensor)) ASSERT_EQ(v, 0.0f) << s1[i].name;
  }
  EXPECT_EQ(names.size(), s1.size());
  EXPECT_EQ(names.at("optim/transformer.h.1.mlp.experts.w_fc/momentum"), (Shape{3, 40, 24}));
  EXPECT_EQ(names.at("optim/lm_head.weight/exp_avg_sq"), (Shape{50, 32}));
  EXPECT_TRUE(names.count("optim/transformer.wte.weight/exp_avg"));
}

TEST(Optimizer, ResumingThroughStateReproducesTheNextStep) {
  CpuBackend b(DType::f32, 1);
  Rng rng = fresh_rng();
  std::vector<HostParam> host;
  ParamTable ta = make_table(b, rng, host), tb = make_table(b, rng, host);
  OptimConfig o;
  o.weight_decay = 0.05;
  Optimizer oa(b, ta, o, ModelConfig{}), ob(b, tb, o, ModelConfig{});
  random_grads(b, ta, rng);
  oa.step(0, 1.0);
  // What a checkpoint restore does: copy weights and state into the other run's tensors.
  for (size_t i = 0; i < ta.params.size(); ++i) b.copy(ta.params[i].value, tb.params[i].value);
  auto sa = oa.state(), sb = ob.state();
  for (size_t i = 0; i < sa.size(); ++i) b.copy(sa[i].tensor, sb[i].tensor);
  for (size_t i = 0; i < ta.params.size(); ++i) {
    std::vector<float> g(size_t(ta.params[i].grad.numel()));
    for (auto& x : g) x = float(rng.normal());
    b.write(ta.params[i].grad, g);
    b.write(tb.params[i].grad, g);
  }
  oa.step(1, 0.7);
  ob.step(1, 0.7);
  for (size_t i = 0; i < ta.params.size(); ++i)
    EXPECT_EQ(b.read(ta.params[i].value), b.read(tb.params[i].value)) << ta.params[i].name;
}

TEST(Optimizer, StepMakesNoHostTransfers) {
  CpuBackend cpu(DType::f32, 1);
  CountingBackend b(cpu);
  Rng rng = fresh_rng();
  std::vector<HostParam> host;
  ParamTable t = make_table(b, rng, host);
  OptimConfig o;
  o.muon_nesterov = rng.below(2) == 0;
  Optimizer opt(b, t, o, ModelConfig{});
  random_grads(b, t, rng);
  const std::vector<float> before = cpu.read(t.params[1].value);
  b.reads = b.writes = 0;
  opt.step(0, 1.0);
  opt.step(1, 0.5);
  EXPECT_EQ(b.reads, 0);
  EXPECT_EQ(b.writes, 0);
  EXPECT_NE(cpu.read(t.params[1].value), before);  // and it did update something
}

TEST(Optimizer, RejectsParamsMuonCannotUpdate) {
  CpuBackend b(DType::f32, 1);
  ParamTable t;
  Param p;
  p.name = "transformer.h.0.norm.scale";
  p.group = ParamGroup::matrix;
  p.value = b.alloc({8}, DType::f32);
  p.grad = b.alloc({8}, DType::f32);
  t.params.push_back(p);
  try {
    Optimizer opt(b, t, OptimConfig{}, ModelConfig{});
    ADD_FAILURE() << "a 1-D matrix-group parameter was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("transformer.h.0.norm.scale"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moelab
