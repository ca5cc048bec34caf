// How much memory a training run will hold, estimated from its config before anything is
// allocated, and the check that refuses a start the host cannot hold. Without it a model too
// large for the host is not refused by an allocation (the kernel overcommits): it is killed by the
// OOM killer part way through zeroing its buffers, taking other processes' memory with it.
#pragma once
#include <cstdint>
#include <optional>
#include <string>

#include "config/config.hpp"

namespace moelab {

struct MemoryEstimate {
  double params = 0;       // trainable parameters (count, not bytes)
  double param_bytes = 0;  // master weights, gradients and compute copies
  double optimizer_bytes = 0;
  double activation_bytes = 0;  // one micro-batch's saved activations and the step's scratch
  double total_bytes() const { return param_bytes + optimizer_bytes + activation_bytes; }
};

// One rank's estimate on the CPU (f32 masters, gradients and activations; compute copies alias
// the masters). GptMoE's parameter table holds exactly `params` values.
MemoryEstimate estimate_training_memory(const Config& cfg);
// The same on a GPU: f32 masters and gradients beside bf16 compute copies, bf16 activations.
// A floor rather than a bound (libraries' workspaces and the allocator's slack come on top).
MemoryEstimate estimate_gpu_training_memory(const Config& cfg);

// Bytes this process may still use: the host's MemAvailable, or less under a cgroup memory limit
// (v2 memory.max - memory.current), with `source` saying which; nullopt where neither is readable.
std::optional<double> available_host_memory(std::string* source = nullptr);

// Refuses (moelab::Error naming the estimate, the limit and the keys to change) a CPU run whose
// `ranks` processes on this host would need more than the available memory. The trainer calls
// it for CPU backends before the model allocates.
void check_memory_fits(const Config& cfg, int64_t ranks);
// The same for a GPU run against the card's free memory (`free_bytes`, from the backend;
// `device` names the card in the message).
void check_device_memory_fits(const Config& cfg, double free_bytes, const std::string& device);

}  // namespace moelab
