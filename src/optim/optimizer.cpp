// Parameter routing and learning rates; the updates live in muon.cpp and adamw.cpp.
#include "optim/optimizer.hpp"

#include <algorithm>
#include <cmath>
#include <map>

#include "core/error.hpp"
#include "optim/lr_schedule.hpp"

namespace moelab {

Optimizer::Optimizer(Backend& backend, ParamTable& params, const OptimConfig& cfg, const ModelConfig& model)
    : cfg_(cfg) {
  if (cfg.weight_decay_schedule != "constant" || cfg.weight_decay_ref_batch > 0 || cfg.weight_decay_ref_horizon > 0)
    throw Error("optimizer: optim.weight_decay_schedule / optim.weight_decay_ref_* need the run's steps and batch; "
                "construct the optimizer from the whole Config");
  build(backend, params, model);
}

Optimizer::Optimizer(Backend& backend, ParamTable& params, const Config& cfg)
    : cfg_(cfg.optim),
      steps_(cfg.train.steps),
      tokens_per_step_(cfg.grad_accum_steps() * cfg.train.batch_size * cfg.train.seq_len) {
  build(backend, params, cfg.model);
}

Optimizer::Optimizer(Backend& backend, ParamTable& params, const Config& cfg, Communicator* shard,
                     const std::vector<Tensor>& arenas)
    : cfg_(cfg.optim),
      steps_(cfg.train.steps),
      tokens_per_step_(cfg.grad_accum_steps() * cfg.train.batch_size * cfg.train.seq_len) {
  if (shard && shard->world() > 1) {
    shard_ = shard;
    // State elements per parameter element: Muon keeps a momentum, AdamW two moments.
    const bool muon = cfg_.matrix_optimizer != "adamw";
    std::vector<std::pair<int64_t, size_t>> sizes;
    for (size_t i = 0; i < params.params.size(); ++i) {
      const Param& p = params.params[i];
      if (p.group == ParamGroup::buffer) continue;
      if (p.value_amax.data)
        throw Error("optimizer: optim.shard_state with FP8 weight scaling ('" + p.name + "') is not built yet");
      sizes.push_back({p.value.numel() * ((p.group == ParamGroup::matrix && muon) ? 1 : 2), i});
    }
    // Largest first (ties by table order), each to the least loaded rank (ties: the lowest).
    std::stable_sort(sizes.begin(), sizes.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    owners_.assign(params.params.size(), -1);
    std::vector<int64_t> load(size_t(shard->world()), 0);
    for (const auto& [n, i] : sizes) {
      const int r = int(std::min_element(load.begin(), load.end()) - load.begin());
      owners_[i] = r;
      load[size_t(r)] += n;
    }
    assign_by_arenas(backend, params, arenas);
  }
  build(backend, params, cfg.model);
}

double Optimizer::muon_weight_decay(int64_t step) const {
  double wd = cfg_.weight_decay;
  if (cfg_.weight_decay_ref_batch > 0) wd *= std::sqrt(double(tokens_per_step_) / double(cfg_.weight_decay_ref_batch));
  if (cfg_.weight_decay_ref_horizon > 0) wd *= cfg_.weight_decay_ref_horizon / (double(tokens_per_step_) * double(steps_));
  if (cfg_.weight_decay_schedule == "linear" && steps_ > 0) wd *= 1.0 - double(step) / double(steps_);
  return wd;
}

void Optimizer::build(Backend& backend, ParamTable& params, const ModelConfig& model) {
  const OptimConfig& cfg = cfg_;
  // nanochat tuned the AdamW rates at d_model 768 and scales them by 1/sqrt(d_model / 768).
  const double scale = cfg.scale_lr_by_dmodel ? std::pow(double(model.d_model) / 768.0, -0.5) : 1.0;
  matrix_lr_ = cfg.matrix_lr;
  embedding_lr_ = cfg.embedding_lr * scale;
  unembedding_lr_ = cfg.unembedding_lr * scale;

  std::vector<Param*> matrices;
  adamw_ = std::make_unique<AdamW>(backend, cfg);
  params_ = &params;
  backend_ = &backend;
  for (size_t i = 0; i < params.params.size(); ++i) {
    Param& p = params.params[i];
    if (shard_ && owners_[i] != shard_->rank()) continue;  // another rank keeps its state
    if (p.value.dtype != backend.master_dtype())
      throw Error("optimizer: parameter '" + p.name + "' is " + p.value.describe() + " but the backend's master dtype is " +
                  dtype_name(backend.master_dtype()));
    switch (p.group) {
      case ParamGroup::matrix:
        if (cfg.matrix_optimizer == "adamw") adamw_->add(&p, cfg.matrix_adamw_lr);
        else matrices.push_back(&p);
        break;
      case ParamGroup::embedding: adamw_->add(&p, embedding_lr_); break;
      case ParamGroup::unembedding: adamw_->add(&p, unembedding_lr_); break;
      case ParamGroup::value_embedding: adamw_->add(&p, cfg.value_embedding_lr * scale); break;
      // nanochat's scalar groups: resid lambdas at scalar_lr * 0.01, x0 lambdas at scalar_lr with
      // beta1 0.96; neither is decayed.
      case ParamGroup::scalar:
        if (p.name == "x0_lambdas") adamw_->add(&p, cfg.scalar_lr, AdamW::Overrides{0.96, 0.0});
        else adamw_->add(&p, cfg.scalar_lr * 0.01, AdamW::Overrides{-1, 0.0});
        break;
      case ParamGroup::buffer: break;  // updated by its owner (GptMoE::end_step), not by a gradient
    }
  }
  if (!matrices.empty()) muon_ = std::make_unique<Muon>(backend, std::move(matrices), cfg);
}

void Optimizer::step(int64_t step, double lr_multiplier) {
  if (muon_) muon_->step(matrix_lr_ * lr_multiplier, muon_momentum_at(cfg_, step), muon_weight_decay(step));
  adamw_->step(step, lr_multiplier);
  if (shard_) {
    // Every parameter from the rank that updated it, in table order (the same on every rank).
    for (size_t i = 0; i < params_->params.size(); ++i)
      if (owners_[i] >= 0) shard_->broadcast(params_->params[i].value, owners_[i]);
  }
}

void Optimizer::assign_by_arenas(Backend& backend, ParamTable& params, const std::vector<Tensor>& arenas) {
  if (arenas.empty()) return;
  const int world = shard_->world();
  // Each parameter's (arena, first element); every one must lie inside an arena.
  std::vector<std::vector<std::pair<int64_t, size_t>>> members(arenas.size());
  for (size_t i = 0; i < params.params.size(); ++i) {
    if (owners_[i] < 0) continue;
    const Tensor& g = params.params[i].grad;
    bool found = false;
    for (size_t a = 0; a < arenas.size() && !found; ++a) {
      const char* base = static_cast<const char*>(arenas[a].data);
      const char* at = static_cast<const char*>(g.data);
      if (arenas[a].dtype != g.dtype || at < base || at + g.bytes() > base + arenas[a].bytes()) continue;
      members[a].push_back({int64_t(at - base) / int64_t(dtype_size(g.dtype)), i});
      found = true;
    }
    if (!found) return;  // keep the size-balanced owners and all-reduce whole arenas
  }
  std::vector<int> owners = owners_;
  std::vector<std::vector<int64_t>> cuts(arenas.size());
  int64_t chunk = 0;
  for (size_t a = 0; a < arenas.size(); ++a) {
    std::sort(members[a].begin(), members[a].end());
    const int64_t n = arenas[a].numel();
    cuts[a].assign(size_t(world) + 1, n);
    cuts[a][0] = 0;
    // A parameter goes to the rank whose even share of the arena holds its middle element; the
    // cuts fall at parameter boundaries (the first parameter of each rank's range).
    int prev = 0;
    for (const auto& [off, i] : members[a]) {
      const int64_t mid = off + params.params[i].grad.numel() / 2;
      const int r = std::max(prev, int(std::min<int64_t>(world - 1, mid * world / std::max<int64_t>(n, 1))));
      for (int q = prev + 1; q <= r; ++q) cuts[a][size_t(q)] = off;
      prev = r;
      owners[i] = r;
    }
    for (int r = 0; r < world; ++r) chunk = std::max(chunk, cuts[a][size_t(r) + 1] - cuts[a][size_t(r)]);
  }
  owners_ = owners;
  cuts_ = cuts;
  scatter_in_ = backend.alloc({chunk * world, 1}, backend.master_dtype());
  scatter_out_ = backend.alloc({chunk, 1}, backend.master_dtype());
}

void Optimizer::reduce_gradients(std::vector<Tensor>& arenas) {
  if (!shard_ || cuts_.empty()) {
    if (shard_)
      for (Tensor& g : arenas) shard_->all_reduce_sum(g);
    return;
  }
  MOELAB_CHECK(arenas.size() == cuts_.size(), "optimizer: the gradient arenas changed since the optimizer was built");
  const int world = shard_->world(), me = shard_->rank();
  const int64_t chunk = scatter_out_.numel();
  for (size_t a = 0; a < arenas.size(); ++a) {
    const std::vector<int64_t>& c = cuts_[a];
    Tensor flat = arenas[a].view({arenas[a].numel(), 1});
    backend_->fill(scatter_in_, 0.0f);  // the padding of the shorter ranges
    for (int r = 0; r < world; ++r) {
      if (c[size_t(r) + 1] == c[size_t(r)]) continue;
      Tensor dst = scatter_in_.rows_slice(r * chunk, r * chunk + (c[size_t(r) + 1] - c[size_t(r)]));
      backend_->copy(flat.rows_slice(c[size_t(r)], c[size_t(r) + 1]), dst);
    }
    shard_->reduce_scatter_sum(scatter_in_, scatter_out_);
    if (c[size_t(me) + 1] > c[size_t(me)]) {
      Tensor dst = flat.rows_slice(c[size_t(me)], c[size_t(me) + 1]);
      backend_->copy(scatter_out_.rows_slice(0, c[size_t(me) + 1] - c[size_t(me)]), dst);
    }
  }
}

int Optimizer::owner_of_state(const std::string& name) const {
  if (!shard_) return 0;
  const size_t slash = name.rfind('/');
  MOELAB_CHECK(name.rfind("optim/", 0) == 0 && slash != std::string::npos && slash > 6,
               "optimizer: state name '" + name + "' is not optim/<param>/<slot>");
  const std::string param = name.substr(6, slash - 6);
  for (size_t i = 0; i < params_->params.size(); ++i)
    if (params_->params[i].name == param) return owners_[i];
  throw Error("optimizer: state '" + name + "' names no parameter of the model");
}

void Optimizer::gather_state(const std::vector<NamedTensor>& full) {
  std::map<std::string, Tensor> mine;
  for (const NamedTensor& t : state()) mine[t.name] = t.tensor;
  for (const NamedTensor& f : full) {
    const int owner = owner_of_state(f.name);
    if (!shard_ || owner == shard_->rank()) {
      auto it = mine.find(f.name);
      MOELAB_CHECK(it != mine.end(), "optimizer: this rank lacks the state '" + f.name + "' it owns");
      Tensor dst = f.tensor;
      backend_->copy(it->second, dst);
    }
    if (shard_) {
      Tensor t = f.tensor;
      shard_->broadcast(t, owner);
    }
  }
}

void Optimizer::scatter_state(const std::vector<NamedTensor>& full) {
  std::map<std::string, Tensor> all;
  for (const NamedTensor& t : full) all[t.name] = t.tensor;
  for (const NamedTensor& t : state()) {
    auto it = all.find(t.name);
    MOELAB_CHECK(it != all.end(), "optimizer: the full state lacks '" + t.name + "'");
    Tensor dst = t.tensor;
    backend_->copy(it->second, dst);
  }
}

int64_t Optimizer::state_bytes() const {
  int64_t n = 0;
  for (const NamedTensor& t : state()) n += t.tensor.bytes();
  return n;
}

std::vector<NamedTensor> Optimizer::state() const {
  std::vector<NamedTensor> out;
  if (muon_) muon_->append_state(out);
  adamw_->append_state(out);
  return out;
}

}  // namespace moelab
