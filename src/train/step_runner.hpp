// Runs one optimizer step on the backend: upload the micro-batches, zero grads, forward/backward
// each micro-batch, optimizer update, refresh of the compute weights, then the statistics
// read-back. With exec = graph on CUDA, the step's device work runs as CUDA graphs
// (step_runner.cpp says how the optimizer's per-step scalars get in); otherwise, and on the CPU,
// the ops launch one by one.
#pragma once
#include <functional>
#include <memory>
#include <vector>

#include "backend/backend.hpp"
#include "data/loader.hpp"
#include "model/gpt.hpp"

namespace moelab {

class StepRunner {
 public:
  StepRunner(Backend& backend, GptMoE& model, const Config& cfg);
  ~StepRunner();
  // loss_scale weights each micro-batch's summed token losses (1 / valid targets of the step);
  // bal_scale weights each micro-batch's balance loss (1 / micro-batches).
  StepStats run(const std::vector<Batch>& batches, float loss_scale, float bal_scale,
                const std::function<void()>& optimizer_step);

 private:
  void forward_backward_all(float loss_scale, float bal_scale);

  Backend& be_;
  GptMoE& model_;
  const Config& cfg_;
  std::vector<Tensor> tokens_, targets_;  // one pair per micro-batch, fixed addresses
  struct Graph;
  std::unique_ptr<Graph> graph_;
};

}  // namespace moelab
