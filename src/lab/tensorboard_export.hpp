// `moelab report --tensorboard DIR`: the runs the lab read (run folders' metrics.jsonl or nanochat
// logs) as TensorBoard event files, for runs that were not trained with train.tensorboard. Each
// run gets DIR/<run name>/events.out.tfevents.0.report.moelab, rewritten whole on every report, so
// `tensorboard --logdir DIR` shows the runs side by side.
#pragma once
#include <filesystem>
#include <string>
#include <vector>

#include "lab/experiment_reader.hpp"

namespace moelab::lab {

// The event file a run's scalars go to under dir.
std::filesystem::path tensorboard_file(const std::filesystem::path& dir, const RunRecord& run);

// The per-layer tag: routing/<stat>/layer_NN (two digits, so TensorBoard sorts them in order).
std::string layer_tag(const char* stat, size_t layer);

// Writes every run's known scalars: per step train/loss, train/balance_loss, train/tok_per_sec,
// train/mfu, train/drop_rate, train/dt_ms; the routing statistics train/max_vio (worst MoE layer),
// train/router_entropy (mean over MoE layers), train/z_loss, train/bias_range (widest layer) and
// per MoE layer routing/{max_vio,router_entropy,bias_range}/layer_NN (layer_tag); per validation
// val/loss, val/bpb (a log's validation without a step is left out). The tags are the trainer's (core/tensorboard.hpp). Returns the
// files written. Refuses a dir that is a run folder (the lab never writes into one).
std::vector<std::filesystem::path> write_tensorboard(const Experiment& ex, const std::filesystem::path& dir);

}  // namespace moelab::lab
