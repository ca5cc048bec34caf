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
#include "core/error.hpp"
#include "model/params.hpp"
#include "optim/named_tensor.hpp"

namespace moelab {

// A checkpoint file that cannot be read whole (truncated, damaged, not safetensors): as opposed to
// a readable one that does not fit this run, an older checkpoint may still serve a resume.
class CheckpointUnreadable : public Error {
 public:
  using Error::Error;
};

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

// The model for other tools (docs/RUN_FOLDER.md, scripts/moelab_torch.py): RUN_DIR/model.safetensors
// holds only the weights under their Param names; RUN_DIR/optimizer.safetensors the optimizer
// state and the trainer's scalars (the same metadata as a checkpoint); config_json goes to
// RUN_DIR/config.json. Each file is written atomically.
void save_model_export(const std::string& run_dir, Backend& backend, const ParamTable& params,
                       const std::vector<NamedTensor>& optimizer_state, const CheckpointMeta& meta,
                       const std::string& config_json);

// The weights alone from a checkpoint or a model.safetensors (what `moelab sample` reads): every
// Param must be there with its shape and dtype; other tensors (optimizer state) are skipped.
// Throws moelab::Error naming the file and the first problem, before any Param is written.
void load_weights(const std::string& path, Backend& backend, ParamTable& params);

// RUN_DIR/checkpoints/step_NNNNNN.safetensors (six digits at least).
std::string checkpoint_path(const std::string& run_dir, int64_t step);
// The checkpoint of run_dir with the highest step, or "" if there is none.
std::string latest_checkpoint(const std::string& run_dir);
// Every checkpoint of run_dir, highest step first.
std::vector<std::string> checkpoints_newest_first(const std::string& run_dir);
// Deletes all but the `keep` newest checkpoints of run_dir (keep <= 0: keeps all). Returns the
// paths deleted.
std::vector<std::string> prune_checkpoints(const std::string& run_dir, int64_t keep);

}  // namespace moelab
