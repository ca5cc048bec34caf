// The optimizer of a model: routes each Param to Muon (ParamGroup::matrix; AdamW instead with
// optim.matrix_optimizer = adamw) or AdamW (embedding, unembedding) with nanochat's learning rates, owns all their state, and lists that state under
// stable names for checkpoints. step() only issues Backend ops (no host reads of device data), so
// the trainer can capture it in a CUDA graph; it neither zeroes gradients nor refreshes
// Param::compute (the model does both).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "backend/backend.hpp"
#include "comm/communicator.hpp"
#include "config/config.hpp"
#include "model/params.hpp"
#include "optim/adamw.hpp"
#include "optim/muon.hpp"
#include "optim/named_tensor.hpp"

namespace moelab {

class Optimizer {
 public:
  // All state and scratch is allocated here. `params` must outlive the optimizer and keep its
  // Param entries in place (the optimizer holds pointers to them).
  Optimizer(Backend& backend, ParamTable& params, const OptimConfig& cfg, const ModelConfig& model);
  // The same, also knowing the run's length and tokens per step, which Muon's weight decay
  // schedule (optim.weight_decay_schedule) and its batch/horizon scaling need.
  Optimizer(Backend& backend, ParamTable& params, const Config& cfg);
  // Sharded state (optim.shard_state, ZeRO-1): with a communicator of several ranks, each
  // parameter belongs to one rank (whole parameters, assigned by state size, largest first, to the
  // least loaded rank: the same on every rank for a given world size); a rank allocates state
  // only for its own, updates only those from the (already summed) gradients, and step() then
  // broadcasts every parameter from its owner, so all ranks end the step with the same weights.
  // With `arenas` (the model's gradient arenas) and every parameter's gradient inside one of them,
  // ownership follows the arenas instead: each arena is cut at parameter boundaries into one
  // consecutive range per rank (balanced by elements), so that reduce_gradients can hand each
  // rank the summed gradients of its own parameters by one reduce-scatter per arena.
  Optimizer(Backend& backend, ParamTable& params, const Config& cfg, Communicator* shard,
            const std::vector<Tensor>& arenas = {});
  // Sums the arenas' gradients over the ranks: with arena-aligned ownership each rank gets only its
  // own range summed (reduce-scatter of the ranges padded to one size; the rest of the arena is
  // left as it was, and no update reads it); otherwise the whole arenas (all-reduce).
  void reduce_gradients(std::vector<Tensor>& arenas);

  // Updates every parameter's value from its grad. step: 0-based training step (sets Muon's
  // momentum ramp and AdamW's bias correction); lr_multiplier: the schedule's factor.
  void step(int64_t step, double lr_multiplier);

  // Every state tensor, named "optim/<param name>/<slot>" (slot: momentum | exp_avg | exp_avg_sq),
  // in a fixed order. The tensors share storage with the optimizer's, so loading into them
  // restores the optimizer.
  std::vector<NamedTensor> state() const;
  // Bytes of this rank's optimizer state (all of it without sharding).
  int64_t state_bytes() const;
  // Sharded state and checkpoints: `full` is the state() of an unsharded optimizer over the same
  // parameters (the checkpoint's layout). gather_state fills it on every rank from the owners'
  // shards (one broadcast per tensor, in full's order, so every rank must call it);
  // scatter_state copies this rank's share back out of it. Without sharding both are plain copies.
  void gather_state(const std::vector<NamedTensor>& full);
  void scatter_state(const std::vector<NamedTensor>& full);
  bool sharded() const { return shard_ != nullptr; }
  // The rank that updates params.params[i] (0 without sharding; -1 for buffers).
  int owner(size_t i) const { return owners_.empty() ? 0 : owners_[i]; }

  // Base learning rates after nanochat's d_model scaling (before the schedule), for logs.
  double matrix_lr() const { return matrix_lr_; }
  double embedding_lr() const { return embedding_lr_; }
  double unembedding_lr() const { return unembedding_lr_; }
  // Muon's weight decay at 0-based `step`: optim.weight_decay times sqrt(B / ref_batch) and
  // ref_horizon / (B * steps) where set (B = tokens per step), then times (1 - step / steps)
  // with the linear schedule.
  double muon_weight_decay(int64_t step) const;

 private:
  void build(Backend& backend, ParamTable& params, const ModelConfig& model);
  OptimConfig cfg_;
  int64_t steps_ = 0, tokens_per_step_ = 0;  // 0: unknown (the OptimConfig-only constructor)
  double matrix_lr_, embedding_lr_, unembedding_lr_;
  std::unique_ptr<Muon> muon_;  // null when no matrix goes to Muon
  std::unique_ptr<AdamW> adamw_;
  Communicator* shard_ = nullptr;  // set when the state is sharded over several ranks
  std::vector<int> owners_;        // per parameter of the table, when sharded
  ParamTable* params_ = nullptr;
  // Arena-aligned ownership: per arena, rank r's element range is [cuts[r], cuts[r + 1]).
  std::vector<std::vector<int64_t>> cuts_;
  Tensor scatter_in_, scatter_out_;  // [world * chunk, 1] and [chunk, 1] for the largest arena
  Backend* backend_ = nullptr;
  int owner_of_state(const std::string& name) const;
  void assign_by_arenas(Backend& backend, ParamTable& params, const std::vector<Tensor>& arenas);  // from "optim/<param name>/<slot>"
};

}  // namespace moelab
