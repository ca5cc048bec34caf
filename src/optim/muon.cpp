// Muon's grouped update on Backend ops; see muon.hpp for the grouping and why.
#include "optim/muon.hpp"

#include <algorithm>
#include <cmath>

#include "core/error.hpp"

namespace moelab {

namespace {

// The parts as one [count, m, n] tensor when they lie back to back, in order, in one allocation
// (then a single op covers them all); an undefined tensor otherwise.
Tensor as_one_stack(const std::vector<Tensor>& parts, const Shape& shape) {
  if (parts.empty()) return {};
  const char* next = static_cast<const char*>(parts[0].data);
  for (const Tensor& t : parts) {
    if (t.data != next || t.storage.get() != parts[0].storage.get() || t.dtype != parts[0].dtype) return {};
    next += t.bytes();
  }
  Tensor stack = parts[0];
  stack.shape = shape;
  return stack;
}

// Matrices [first, first + count) of a [G, m, n] stack, as a [count * m, n] view.
Tensor stack_part(const Tensor& stack, int64_t first, int64_t count) {
  const int64_t m = stack.dim(1), n = stack.dim(2);
  return stack.view({stack.dim(0) * m, n}).rows_slice(first * m, (first + count) * m);
}

}  // namespace

std::vector<Muon::Group> Muon::make_groups(const std::vector<Param*>& params) {
  std::vector<Group> groups;
  for (Param* p : params) {
    const Tensor& v = p->value;
    if (v.ndim() != 2 && v.ndim() != 3)
      throw Error("Muon: parameter '" + p->name + "' is " + v.describe() +
                  "; only 2-D matrices and 3-D [experts, rows, cols] tensors can be in the matrix group");
    MOELAB_CHECK(p->grad.shape == v.shape && p->grad.dtype == v.dtype,
                 "Muon: gradient of '" + p->name + "' is " + p->grad.describe() + ", value " + v.describe());
    const int64_t m = v.dim(-2), n = v.dim(-1), count = v.ndim() == 3 ? v.dim(0) : 1;
    // The newest group of this shape takes it unless that would pass the size cap.
    auto it = std::find_if(groups.rbegin(), groups.rend(), [&](const Group& g) { return g.m == m && g.n == n; });
    if (it == groups.rend() || (it->count + count) * m * n > kMaxGroupElems) {
      groups.push_back(Group{m, n, 0, {}, {}, {}, {}, {}, false});
      it = groups.rbegin();
    }
    it->members.push_back(Member{p, it->count, count});
    it->count += count;
  }
  for (Group& g : groups) g.batched = g.count >= 2 && NewtonSchulz::batchable(g.m, g.n);
  return groups;
}

std::vector<NewtonSchulz::StackShape> Muon::stack_shapes(const std::vector<Group>& groups) {
  std::vector<NewtonSchulz::StackShape> shapes;
  for (const Group& g : groups) shapes.push_back({g.batched ? g.count : 1, g.m, g.n});
  return shapes;
}

Muon::Muon(Backend& backend, std::vector<Param*> params, const OptimConfig& cfg)
    : Muon(backend, params, cfg, make_groups(params)) {}

Muon::Muon(Backend& backend, std::vector<Param*> params, const OptimConfig& cfg, std::vector<Group> groups)
    : backend_(backend),
      params_(std::move(params)),
      cfg_(cfg),
      groups_(std::move(groups)),
      ns_(backend, stack_shapes(groups_)) {
  if (cfg.muon_ns_steps < 1)
    throw Error("optim.muon_ns_steps = " + std::to_string(cfg.muon_ns_steps) + " must be at least 1");
  if (normuon()) ns_.use_polar_express(true);
  int64_t largest = 1, largest_gathered = 0;
  momentum_.resize(params_.size());
  second_moment_.resize(params_.size());
  for (Group& g : groups_) {
    const Shape stack{g.count, g.m, g.n};
    largest = std::max(largest, g.count * g.m * g.n);
    if (g.batched) ns_.prepare_batched(g.count, g.m, g.n);
    g.momentum = backend.alloc(stack, backend.master_dtype());
    backend.fill(g.momentum, 0.0f);
    if (normuon()) {
      g.second_moment = backend.alloc({g.count, kept_dim(g)}, backend.master_dtype());
      backend.fill(g.second_moment, 0.0f);
    }
    std::vector<Tensor> grads, values;
    for (const Member& mb : g.members) {
      grads.push_back(mb.param->grad);
      values.push_back(mb.param->value);
      const size_t i = size_t(std::find(params_.begin(), params_.end(), mb.param) - params_.begin());
      momentum_[i] = stack_part(g.momentum, mb.first, mb.count).view(mb.param->value.shape);
      if (normuon()) {
        const Shape state = mb.param->value.ndim() == 3 ? Shape{mb.count, kept_dim(g)} : Shape{kept_dim(g)};
        second_moment_[i] = g.second_moment.rows_slice(mb.first, mb.first + mb.count).view(state);
      }
    }
    g.grads = as_one_stack(grads, stack);
    g.values = as_one_stack(values, stack);
    if (!g.grads.data) largest_gathered = std::max(largest_gathered, g.count * g.m * g.n);
  }
  // Gradients that do not lie back to back are gathered first; the model's parameter arenas
  // make that rare, so the buffer is only as large as the groups that need it.
  if (largest_gathered > 0) gathered_ = backend.alloc({largest_gathered, 1}, backend.master_dtype());
  blend_ = backend.alloc({largest, 1}, backend.act_dtype());
}

void Muon::apply_update(Group& g, const Tensor& x, Tensor& values, int64_t first, int64_t count, float lr, float wd) {
  const double aspect = std::sqrt(std::max(1.0, double(g.m) / double(g.n)));
  if (normuon()) {
    NorMuonStep st;
    st.lr = float(double(lr) * aspect);
    st.weight_decay = wd;
    st.beta2 = float(cfg_.muon_beta2);
    st.cautious = cfg_.cautious_weight_decay;
    Tensor v2 = g.second_moment.rows_slice(first, first + count);
    Tensor p = values.view({count, g.m, g.n});
    backend_.normuon_update(x.view({count, g.m, g.n}), v2, p, st);
    return;
  }
  const float scale = float(-double(lr) * aspect), decay = float(1.0 - double(lr) * double(wd));
  backend_.axpby(scale, x, decay, values);
}

void Muon::update_group(Group& g, float lr, float mu, float wd) {
  const Shape shape{g.count, g.m, g.n};
  Tensor grads = g.grads;
  if (!grads.data) {  // gather: one copy per parameter, so that what follows is one op each
    grads = gathered_.prefix(shape);
    for (const Member& mb : g.members) {
      Tensor dst = stack_part(grads, mb.first, mb.count);
      backend_.copy(mb.param->grad, dst);
    }
  }
  // Momentum, Nesterov blend and the rounding to the act dtype in one pass.
  Tensor ns_in = blend_.prefix(shape);
  backend_.muon_momentum(grads, g.momentum, ns_in, mu, cfg_.muon_nesterov);
  if (g.batched) {
    const Tensor x = ns_.run_batched(ns_in, cfg_.muon_ns_steps);
    if (g.values.data) {
      apply_update(g, x, g.values, 0, g.count, lr, wd);
    } else {
      for (const Member& mb : g.members)
        apply_update(g, stack_part(x, mb.first, mb.count), mb.param->value, mb.first, mb.count, lr, wd);
    }
    return;
  }
  for (const Member& mb : g.members) {
    for (int64_t j = 0; j < mb.count; ++j) {
      const Tensor x = ns_.run(ns_in.index(mb.first + j), cfg_.muon_ns_steps);
      Tensor value = mb.param->value.ndim() == 3 ? mb.param->value.index(j) : mb.param->value;
      apply_update(g, x, value, mb.first + j, 1, lr, wd);
    }
  }
}

void Muon::step(double lr, double momentum) { step(lr, momentum, cfg_.weight_decay); }

void Muon::step(double lr, double momentum, double weight_decay) {
  for (Group& g : groups_) update_group(g, float(lr), float(momentum), float(weight_decay));
}

void Muon::append_state(std::vector<NamedTensor>& out) const {
  for (size_t i = 0; i < params_.size(); ++i) {
    out.push_back({"optim/" + params_[i]->name + "/momentum", momentum_[i]});
    if (second_moment_[i].data) out.push_back({"optim/" + params_[i]->name + "/second_moment", second_moment_[i]});
  }
}

}  // namespace moelab
