// Muon's per-matrix update on Backend ops; see muon.hpp.
#include "optim/muon.hpp"

#include <algorithm>
#include <cmath>

#include "core/error.hpp"

namespace moelab {

// 3-D tensors count per expert.
Muon::MatrixSizes Muon::max_sizes(const std::vector<Param*>& params) {
  MatrixSizes s;
  for (const Param* p : params) {
    const Tensor& v = p->value;
    if (v.ndim() != 2 && v.ndim() != 3)
      throw Error("Muon: parameter '" + p->name + "' is " + v.describe() +
                  "; only 2-D matrices and 3-D [experts, rows, cols] tensors can be in the matrix group");
    const int64_t rows = v.dim(-2), cols = v.dim(-1);
    s.numel = std::max(s.numel, rows * cols);
    s.side = std::max(s.side, std::min(rows, cols));
    s.batch = std::max(s.batch, v.ndim() == 3 ? v.dim(0) : int64_t(1));
  }
  return s;
}

Muon::Muon(Backend& backend, std::vector<Param*> params, const OptimConfig& cfg)
    : Muon(backend, params, cfg, max_sizes(params)) {}

Muon::Muon(Backend& backend, const std::vector<Param*>& params, const OptimConfig& cfg, const MatrixSizes& sizes)
    : backend_(backend), params_(params), cfg_(cfg), ns_(backend, sizes.numel, sizes.side, sizes.batch) {
  if (cfg.muon_ns_steps < 1)
    throw Error("optim.muon_ns_steps = " + std::to_string(cfg.muon_ns_steps) + " must be at least 1");
  for (Param* p : params_) {
    MOELAB_CHECK(p->grad.shape == p->value.shape && p->grad.dtype == p->value.dtype,
                 "Muon: gradient of '" + p->name + "' is " + p->grad.describe() + ", value " + p->value.describe());
    if (p->value.ndim() == 3) ns_.prepare_batched(p->value.dim(0), p->value.dim(1), p->value.dim(2));
    Tensor buf = backend.alloc(p->value.shape, p->value.dtype);
    backend.fill(buf, 0.0f);
    momentum_.push_back(buf);
  }
  blend_ = backend.alloc({std::max<int64_t>(sizes.numel * sizes.batch, 1), 1}, backend.master_dtype());
}

void Muon::update_matrix(Tensor value, Tensor grad, Tensor buf, float lr, float mu) {
  backend_.axpby(1.0f - mu, grad, mu, buf);  // buf = lerp(buf, g, 1 - mu)
  Tensor u = buf;
  if (cfg_.muon_nesterov) {
    u = blend_.prefix(value.shape);
    backend_.copy(grad, u);
    backend_.axpby(mu, buf, 1.0f - mu, u);  // u = lerp(g, buf, mu)
  }
  // A 3-D expert stack is orthogonalized per expert, all experts in one batched pass.
  const Tensor x = value.ndim() == 3 ? ns_.run_batched(u, cfg_.muon_ns_steps) : ns_.run(u, cfg_.muon_ns_steps);
  const double aspect = std::sqrt(std::max(1.0, double(value.dim(-2)) / double(value.dim(-1))));
  backend_.axpby(float(-double(lr) * aspect), x, float(1.0 - double(lr) * cfg_.weight_decay), value);
}

void Muon::step(double lr, double momentum) {
  for (size_t i = 0; i < params_.size(); ++i) {
    Param& p = *params_[i];
    update_matrix(p.value, p.grad, momentum_[i], float(lr), float(momentum));
  }
}

void Muon::append_state(std::vector<NamedTensor>& out) const {
  for (size_t i = 0; i < params_.size(); ++i) out.push_back({"optim/" + params_[i]->name + "/momentum", momentum_[i]});
}

}  // namespace moelab
