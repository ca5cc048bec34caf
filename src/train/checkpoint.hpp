// Training checkpoints: the weights of a ParamTable under their nanochat names (master dtype,
// experts as 3-D tensors), the optimizer state tensors under their own names, and the trainer's
// scalars (step, data loader position, loss EMA, time, resolved config), in one checksummed
// safetensors file. Loading is all-or-nothing: the whole file is read and checked against the
// model before the first byte reaches a backend tensor, so a bad file never half-loads a run.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "model/params.hpp"
#include "optim/named_tensor.hpp"

namespace moelab {

struct CheckpointMeta {
  int64_t step = 0;                 // steps completed; a resumed run starts at this step
  std::vector<int64_t> data_state;  // DataLoader::state()
  double loss_ema = 0;              // the trainer's smoothed loss (stored bit-exact)
  double train_time_s = 0;          // training time so far (stored bit-exact)
  std::map<std::string, double> scalars;  // any further trainer doubles (bit-exact; names [A-Za-z0-9_.])
  std::string config_text;          // the resolved config.toml of the run that wrote it
};

// Value of the "moelab.format" metadata key; bumped when the layout changes incompatibly.
inline constexpr const char* kCheckpointFormat = "moelab-checkpoint/1";

// Writes `path` atomically (see write_safetensors), creating its folder if needed. Weights go under their Param names, optimizer
// state under the NamedTensor names as given (they must not collide with a Param name).
void save_checkpoint(const std::string& path, Backend& backend, const ParamTable& params,
                     const std::vector<NamedTensor>& optimizer_state, const CheckpointMeta& meta);

// Reads `path`, checks it completely (integrity, format, every Param and optimizer tensor present
// with the exact shape and dtype, no unexpected tensors), then writes the weights into each
// Param::value, the state into the given tensors (which share storage with the optimizer's), and
// fills `out`. Param::compute is not refreshed. Throws moelab::Error naming the file and the first
// problem, leaving every tensor untouched. If current_config_text (this run's resolved config) is
// given, a shape mismatch also names the model/moe keys that differ from the checkpoint's config.
void load_checkpoint(const std::string& path, Backend& backend, ParamTable& params,
                     const std::vector<NamedTensor>& optimizer_state, CheckpointMeta& out,
                     const std::string& current_config_text = {});

// RUN_DIR/checkpoints/step_NNNNNN.safetensors (six digits at least).
std::string checkpoint_path(const std::string& run_dir, int64_t step);
// The checkpoint of run_dir with the highest step, or "" if there is none.
std::string latest_checkpoint(const std::string& run_dir);

}  // namespace moelab
