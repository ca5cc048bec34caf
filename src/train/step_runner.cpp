// Step execution, eager or graph-replayed.
//
// With exec = graph, on a backend that captures (Capability::capture), the whole step runs as
// two captured graphs:
// - forward/backward: zeroing the gradients and statistics and the forward + backward of every
//   micro-batch, captured once and replayed as it is;
// - update: the optimizer, the router's end-of-step work (GptMoE::end_step: the step's expert
//   loads and the aux-loss-free bias update) and the refresh of the bf16 compute weights. Its learning rate and
//   momentum change from step to step and reach the kernels as launch arguments, so this graph
//   is recorded again every step and updated in place (cudaGraphExecUpdate). The recording
//   happens on the host while the device runs the forward/backward graph, so it costs no device
//   time, and the update's thousands of small kernels then run back to back.
// The first step runs eagerly (it sizes the backends' scratch buffers); the second captures;
// later ones replay. A step whose loss scale differs from the captured one (targets ignored with
// -1) runs eagerly.
#include "train/step_runner.hpp"

namespace moelab {

struct StepRunner::Graph {
  std::unique_ptr<CapturedGraph> graph;   // forward/backward
  std::unique_ptr<CapturedGraph> update;  // optimizer + compute-weight refresh, re-recorded each step
  float loss_scale = 0, bal_scale = 0;
  int64_t eager_steps = 0;
};

StepRunner::StepRunner(Backend& backend, GptMoE& model, const Config& cfg) : be_(backend), model_(model), cfg_(cfg) {
  for (int64_t m = 0; m < cfg.grad_accum_steps(); ++m) {
    tokens_.push_back(be_.alloc({model.tokens_per_micro_batch()}, DType::i32));
    targets_.push_back(be_.alloc({model.tokens_per_micro_batch()}, DType::i32));
  }
  if (cfg.exec == "graph" && be_.supports(Capability::capture())) {
    graph_ = std::make_unique<Graph>();
    graph_->graph = be_.make_graph();
    graph_->update = be_.make_graph();
  }
}

StepRunner::~StepRunner() = default;

void StepRunner::forward_backward_all(float loss_scale, float bal_scale) {
  model_.begin_step();
  for (size_t m = 0; m < tokens_.size(); ++m) model_.forward_backward(tokens_[m], targets_[m], loss_scale, bal_scale);
}

StepStats StepRunner::run(const std::vector<Batch>& batches, float loss_scale, float bal_scale,
                          const std::function<void()>& optimizer_step) {
  MOELAB_CHECK(batches.size() == tokens_.size(), "one batch per micro-batch");
  for (size_t m = 0; m < batches.size(); ++m) {
    be_.write_i32(tokens_[m], batches[m].inputs);
    be_.write_i32(targets_[m], batches[m].targets);
  }
  auto update = [&] {
    optimizer_step();
    model_.end_step();  // the step's loads and the aux-loss-free router bias, on the device
    model_.refresh_compute_weights();
  };
  bool replayed = false;
  if (graph_) {
    Graph& g = *graph_;
    if (!g.graph->captured() && g.eager_steps >= 1) {
      g.loss_scale = loss_scale;
      g.bal_scale = bal_scale;
      g.graph->capture([&] { forward_backward_all(loss_scale, bal_scale); });
    }
    if (g.graph->captured() && g.loss_scale == loss_scale && g.bal_scale == bal_scale) {
      g.graph->replay();
      g.update->recapture(update);  // recorded while the device runs the replay above
      g.update->replay();
      replayed = true;
    } else {
      ++g.eager_steps;
    }
  }
  if (!replayed) {
    forward_backward_all(loss_scale, bal_scale);
    update();
  }
  return model_.read_stats(int64_t(batches.size()));
}

}  // namespace moelab
