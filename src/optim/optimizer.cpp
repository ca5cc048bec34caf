// Parameter routing and learning rates; the updates live in muon.cpp and adamw.cpp.
#include "optim/optimizer.hpp"

#include <cmath>

#include "core/error.hpp"
#include "optim/lr_schedule.hpp"

namespace moelab {

Optimizer::Optimizer(Backend& backend, ParamTable& params, const OptimConfig& cfg, const ModelConfig& model)
    : cfg_(cfg) {
  // nanochat tuned the AdamW rates at d_model 768 and scales them by 1/sqrt(d_model / 768).
  const double scale = cfg.scale_lr_by_dmodel ? std::pow(double(model.d_model) / 768.0, -0.5) : 1.0;
  matrix_lr_ = cfg.matrix_lr;
  embedding_lr_ = cfg.embedding_lr * scale;
  unembedding_lr_ = cfg.unembedding_lr * scale;

  std::vector<Param*> matrices;
  adamw_ = std::make_unique<AdamW>(backend, cfg);
  for (Param& p : params.params) {
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
    }
  }
  if (!matrices.empty()) muon_ = std::make_unique<Muon>(backend, std::move(matrices), cfg);
}

void Optimizer::step(int64_t step, double lr_multiplier) {
  if (muon_) muon_->step(matrix_lr_ * lr_multiplier, muon_momentum_at(cfg_, step));
  adamw_->step(step, lr_multiplier);
}

std::vector<NamedTensor> Optimizer::state() const {
  std::vector<NamedTensor> out;
  if (muon_) muon_->append_state(out);
  adamw_->append_state(out);
  return out;
}

}  // namespace moelab
