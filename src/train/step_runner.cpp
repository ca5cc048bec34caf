// Step execution, eager or graph-replayed.
#include "train/step_runner.hpp"

namespace moelab {

struct StepRunner::Graph {};

StepRunner::StepRunner(Backend& backend, GptMoE& model, const Config& cfg) : be_(backend), model_(model), cfg_(cfg) {
  for (int64_t m = 0; m < cfg.train.grad_accum; ++m) {
    tokens_.push_back(be_.alloc({model.tokens_per_micro_batch()}, DType::i32));
    targets_.push_back(be_.alloc({model.tokens_per_micro_batch()}, DType::i32));
  }
}

StepRunner::~StepRunner() = default;

void StepRunner::device_work(float loss_scale, float bal_scale, const std::function<void()>& optimizer_step) {
  model_.begin_step();
  for (size_t m = 0; m < tokens_.size(); ++m) model_.forward_backward(tokens_[m], targets_[m], loss_scale, bal_scale);
  optimizer_step();
  model_.refresh_compute_weights();
}

StepStats StepRunner::run(const std::vector<Batch>& batches, float loss_scale, float bal_scale,
                          const std::function<void()>& optimizer_step) {
  MOELAB_CHECK(batches.size() == tokens_.size(), "one batch per micro-batch");
  for (size_t m = 0; m < batches.size(); ++m) {
    be_.write_i32(tokens_[m], batches[m].inputs);
    be_.write_i32(targets_[m], batches[m].targets);
  }
  device_work(loss_scale, bal_scale, optimizer_step);
  return model_.read_stats(int64_t(batches.size()));
}

}  // namespace moelab
