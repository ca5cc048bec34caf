// The Optimizer against a double-precision host reference: two Muon steps (momentum, Nesterov
// blend, Newton-Schulz, aspect scaling, weight decay) and two AdamW steps (both groups, d_model
// lr scaling), per expert for 3-D tensors, with same-shape matrices of several layers (2-D, 3-D,
// tall, wide, and a shape the batched pass cannot take) so that Muon's shape groups are exercised;
// plus its state names, momentum stacks as views, the single-op path for gradients and weights
// that lie contiguously, resume through state(), and the promise that a step makes no host
// transfers.
#include <gtest/gtest.h>

#include <map>
#include <random>

#include "backend/cpu/cpu_backend.hpp"
#include "optim/optim_reference.hpp"
#include "optim/optimizer.hpp"

namespace moelab {
namespace {

using namespace testref;

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
      // Same shapes across layers: Muon stacks them into one group each.
      {"transformer.h.1.attn.c_q.weight", ParamGroup::matrix, {48, 48}},
      {"transformer.h.1.attn.c_k.weight", ParamGroup::matrix, {48, 48}},
      {"transformer.h.1.mlp.router.weight", ParamGroup::matrix, {8, 48}},  // wide
      {"transformer.h.2.mlp.router.weight", ParamGroup::matrix, {8, 48}},
      {"transformer.h.2.mlp.experts.w_fc", ParamGroup::matrix, {3, 40, 24}},     // tall, with h.1's
      {"transformer.h.2.mlp.experts.w_proj", ParamGroup::matrix, {3, 24, 40}},   // wide stack
      {"transformer.h.3.mlp.experts.w_proj", ParamGroup::matrix, {2, 12, 20}},   // not batchable
      {"lm_head.weight", ParamGroup::unembedding, {50, 32}},
  };
  return s;
}

size_t count_matrices() {
  size_t n = 0;
  for (const Spec& s : specs()) n += s.group == ParamGroup::matrix;
  return n;
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
    if (s.group == ParamGroup::matrix && o.matrix_optimizer == "muon") {
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
      const double lr = s.group == ParamGroup::matrix ? o.matrix_adamw_lr * lrm
                        : (s.group == ParamGroup::embedding ? o.embedding_lr : o.unembedding_lr) * dscale * lrm;
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
  std::string matrix_optimizer;
};

class OptimizerReference : public ::testing::TestWithParam<Case> {};

TEST_P(OptimizerReference, TwoStepsMatchHostReference) {
  const Case c = GetParam();
  CpuBackend b(c.dtype, 2);
  Rng rng = fresh_rng();
  OptimConfig o;
  o.weight_decay = 0.1 * rng.uniform();
  o.matrix_lr = 0.01 + 0.03 * rng.uniform();
  o.matrix_optimizer = c.matrix_optimizer;
  o.matrix_adamw_lr = 0.001 + 0.003 * rng.uniform();
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
                         ::testing::Values(Case{DType::f32, 5e-5, "muon"}, Case{DType::f64, 5e-5, "muon"},
                                           Case{DType::f32, 5e-5, "adamw"}, Case{DType::f64, 5e-5, "adamw"}),
                         [](const auto& info) {
                           return std::string(dtype_name(info.param.dtype)) + "_" + info.param.matrix_optimizer;
                         });

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
    expect_near_orthogonal(upd);
  }
}

TEST(Optimizer, StateNamesAreStableAndZeroAtStart) {
  CpuBackend b(DType::f32, 1);
  Rng rng = fresh_rng();
  std::vector<HostParam> host;
  ParamTable t1 = make_table(b, rng, host), t2 = make_table(b, rng, host);
  Optimizer o1(b, t1, OptimConfig{}, ModelConfig{}), o2(b, t2, OptimConfig{}, ModelConfig{});
  const auto s1 = o1.state(), s2 = o2.state();
  // momentum per matrix, exp_avg + exp_avg_sq per AdamW param
  ASSERT_EQ(s1.size(), count_matrices() + 2u * (specs().size() - count_matrices()));
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

TEST(Optimizer, AdamwMatricesKeepAdamStateAndNoMomentum) {
  CpuBackend b(DType::f32, 1);
  Rng rng = fresh_rng();
  std::vector<HostParam> host;
  ParamTable t = make_table(b, rng, host);
  OptimConfig o;
  o.matrix_optimizer = "adamw";
  Optimizer opt(b, t, o, ModelConfig{});
  std::map<std::string, Shape> names;
  for (const auto& s : opt.state()) names[s.name] = s.tensor.shape;
  EXPECT_EQ(names.size(), specs().size() * 2u);
  EXPECT_EQ(names.at("optim/transformer.h.1.mlp.experts.w_fc/exp_avg_sq"), (Shape{3, 40, 24}));
  EXPECT_FALSE(names.count("optim/transformer.h.1.mlp.experts.w_fc/momentum"));
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

// Same-shape matrices share one momentum stack: each parameter's momentum is a view of its
// group's allocation, laid out in parameter order, with the parameter's own shape.
TEST(Optimizer, SameShapeMomentaAreViewsOfOneStack) {
  CpuBackend b(DType::f32, 1);
  Rng rng = fresh_rng();
  std::vector<HostParam> host;
  ParamTable t = make_table(b, rng, host);
  Optimizer opt(b, t, OptimConfig{}, ModelConfig{});
  std::map<std::string, Tensor> state;
  for (const auto& s : opt.state()) state[s.name] = s.tensor;
  auto momentum = [&](const std::string& param) { return state.at("optim/" + param + "/momentum"); };
  const std::vector<std::vector<std::string>> families = {
      {"transformer.h.0.attn.c_q.weight", "transformer.h.1.attn.c_q.weight", "transformer.h.1.attn.c_k.weight"},
      {"transformer.h.1.mlp.router.weight", "transformer.h.2.mlp.router.weight"},
      {"transformer.h.1.mlp.experts.w_fc", "transformer.h.2.mlp.experts.w_fc"}};
  for (const auto& family : families) {
    for (size_t k = 0; k < family.size(); ++k) {
      const Tensor m = momentum(family[k]);
      const auto it = std::find_if(t.params.begin(), t.params.end(), [&](const Param& p) { return p.name == family[k]; });
      ASSERT_NE(it, t.params.end()) << family[k];
      EXPECT_EQ(m.shape, it->value.shape) << family[k];
      if (k == 0) continue;
      const Tensor prev = momentum(family[k - 1]);
      EXPECT_EQ(m.storage.get(), prev.storage.get()) << family[k];
      EXPECT_EQ(m.data, static_cast<const void*>(prev.as<const char>() + prev.bytes())) << family[k];
    }
  }
  // Different shapes never share a stack.
  EXPECT_NE(momentum("transformer.h.0.mlp.c_fc.weight").storage.get(),
            momentum("transformer.h.0.mlp.c_proj.weight").storage.get());
}

// Gradients and weights that already lie back to back (one allocation per shape) take the
// single-op path instead of the per-parameter gather; both paths must give the same steps.
TEST(Optimizer, ContiguousGradientsAndWeightsGiveTheSameSteps) {
  for (DType dt : {DType::f32, DType::f64}) {
    for (bool nesterov : {true, false}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + (nesterov ? " nesterov" : " plain"));
      CpuBackend b(dt, 1);
      Rng rng = fresh_rng();
      struct Family {
        Shape matrix;
        int64_t per_param, params;
      };
      const Family families[] = {{{48, 32}, 1, 3}, {{40, 24}, 3, 2}, {{24, 40}, 2, 2}};
      ParamTable apart, together;
      for (const Family& f : families) {
        const int64_t m = f.matrix[0], n = f.matrix[1];
        Tensor vstack = b.alloc({f.params * f.per_param * m, n}, dt), gstack = b.alloc({f.params * f.per_param * m, n}, dt);
        for (int64_t i = 0; i < f.params; ++i) {
          const Shape shape = f.per_param == 1 ? Shape{m, n} : Shape{f.per_param, m, n};
          Param p;
          p.name = "transformer.h." + std::to_string(i) + ".w" + std::to_string(m) + "x" + std::to_string(n);
          p.group = ParamGroup::matrix;
          p.value = b.alloc(shape, dt);
          p.grad = b.alloc(shape, dt);
          p.compute = p.value;
          std::vector<float> v(size_t(p.value.numel()));
          for (auto& x : v) x = float(0.05 * rng.normal());
          b.write(p.value, v);
          Param q = p;
          q.value = vstack.rows_slice(i * f.per_param * m, (i + 1) * f.per_param * m).view(shape);
          q.grad = gstack.rows_slice(i * f.per_param * m, (i + 1) * f.per_param * m).view(shape);
          q.compute = q.value;
          b.write(q.value, v);
          apart.params.push_back(p);
          together.params.push_back(q);
        }
      }
      OptimConfig o;
      o.weight_decay = 0.1 * rng.uniform();
      o.muon_nesterov = nesterov;
      Optimizer oa(b, apart, o, ModelConfig{}), ot(b, together, o, ModelConfig{});
      for (int64_t step = 0; step < 2; ++step) {
        for (size_t i = 0; i < apart.params.size(); ++i) {
          std::vector<float> g(size_t(apart.params[i].grad.numel()));
          for (auto& x : g) x = float(rng.normal());
          b.write(apart.params[i].grad, g);
          b.write(together.params[i].grad, g);
        }
        oa.step(step, 1.0);
        ot.step(step, 1.0);
      }
      for (size_t i = 0; i < apart.params.size(); ++i) {
        const std::vector<double> a = read_exact(b, apart.params[i].value), t = read_exact(b, together.params[i].value);
        for (double x : t) ASSERT_FALSE(std::isnan(x)) << together.params[i].name;
        EXPECT_LT(rel_err(t, a), dt == DType::f64 ? 1e-12 : 1e-6) << apart.params[i].name;
      }
    }
  }
}

}  // namespace
}  // namespace moelab
