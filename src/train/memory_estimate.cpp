// The training memory estimate, term by term as GptMoE allocates (src/model/gpt.cpp).
#include "train/memory_estimate.hpp"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <sstream>

#include "core/error.hpp"

namespace moelab {

namespace {
// Element counts of the parameters and of one micro-batch's activations and scratch.
struct MemoryElements {
  double params = 0, activations = 0;
};

MemoryElements count_training_elements(const Config& cfg) {
  const auto& m = cfg.model;
  const double D = double(m.d_model), V = double(m.vocab), L = double(m.layers);
  const double qdim = double(m.heads() * m.head_dim), kvdim = double(m.kv_heads_resolved() * m.head_dim);
  const double H = double(m.mlp_hidden_resolved()), E = double(std::max<int64_t>(cfg.moe.experts, 0));
  const double He = double(cfg.moe.expert_hidden);
  const double Hs = double(cfg.moe.shared_hidden > 0 ? cfg.moe.shared_hidden : cfg.moe.expert_hidden) *
                    double(std::max<int64_t>(cfg.moe.shared_count(), 1));  // N shared experts: one MLP of N * Hs
  const double k = double(cfg.moe.top_k);
  const bool shared = cfg.moe.enabled() && cfg.moe.shared_count() > 0;
  const double n = double(cfg.train.batch_size) * double(cfg.train.seq_len);  // tokens of a micro-batch
  const double experts_local = E / double(std::max<int64_t>(cfg.parallel.expert, 1));
  // Rows the expert GEMMs see: every (token, choice), or at most experts * capacity.
  const int64_t capacity = cfg.expert_capacity(int64_t(n));
  const double rows = capacity > 0 ? std::min(n * k, E * double(capacity)) : n * k;
  const auto moe_mask = cfg.moe_layer_mask();

  double p = 2 * V * D;  // token embedding and lm_head
  double act = 0;
  for (int64_t i = 0; i < m.layers; ++i) {
    const bool ve = m.value_embeddings && i % 2 == (m.layers - 1) % 2;
    p += 2 * qdim * D + 2 * kvdim * D;
    if (ve) p += double(m.kv_heads_resolved() * m.ve_gate_channels) + V * kvdim;
    // Saved per layer: x_in, xn1, x_mid, xn2 (and x_pre); q, qr, att; k, v, kr; norms' statistics.
    act += n * (4 * D + 3 * qdim + 3 * kvdim + 4 + 2 * double(m.heads()));
    if (m.scalar_lambdas) act += n * D;
    if (ve) act += n * kvdim;
    if (moe_mask[size_t(i)]) {
      p += E * D + 2 * experts_local * He * D;
      if (shared) p += 2 * Hs * D;
      // Router logits and probabilities, the routing's index arrays; xp, yp, hp, ap over the rows.
      act += n * (2 * E + 3 * k) + rows * (2 * D + 2 * He + 1);
      if (shared) act += 2 * n * Hs;
    } else {
      p += 2 * H * D;
      act += 2 * n * H;
    }
  }
  if (m.scalar_lambdas) p += 2 * L;
  // The step's scratch: the backward's gradient buffers (a few rows of the widest activation)
  // and the head's logits and their gradient.
  const double widest = std::max({D, H, shared ? Hs : 0.0, cfg.moe.enabled() ? He * k : 0.0});
  act += 6 * n * widest + 2 * n * V;

  return {p, act};
}

std::string limit_advice() {
  return "make the model smaller (model.d_model, model.layers, model.vocab, moe.experts, moe.expert_hidden) or the "
         "micro-batch (train.batch_size, train.seq_len; train.total_batch_tokens keeps the tokens per step)";
}
}  // namespace

MemoryEstimate estimate_training_memory(const Config& cfg) {
  const auto [p, act] = count_training_elements(cfg);
  MemoryEstimate est;
  const double f32 = 4;
  est.params = p;
  est.param_bytes = p * f32 * 2;  // master + gradient (the CPU's compute copy is the master)
  // AdamW holds two moments per value; Muon one momentum buffer (plus NorMuon's small second
  // moment): AdamW's two is the bound for every group.
  est.optimizer_bytes = p * f32 * 2;
  est.activation_bytes = act * f32;
  return est;
}

MemoryEstimate estimate_gpu_training_memory(const Config& cfg) {
  const auto [p, act] = count_training_elements(cfg);
  MemoryEstimate est;
  est.params = p;
  est.param_bytes = p * (4 + 4 + 2);  // f32 master and gradient, bf16 compute copy
  est.optimizer_bytes = p * 4 * 2;    // as on the CPU: AdamW's two f32 moments bound every group
  est.activation_bytes = act * 2;     // bf16
  return est;
}

namespace {
std::optional<double> read_number(const std::string& path) {
  std::ifstream in(path);
  std::string word;
  if (!(in >> word) || word == "max") return std::nullopt;
  try {
    return std::stod(word);
  } catch (...) {
    return std::nullopt;
  }
}

std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / (1024.0 * 1024.0 * 1024.0));
  return buf;
}
}  // namespace

std::optional<double> available_host_memory(std::string* source) {
  std::optional<double> avail;
  std::ifstream in("/proc/meminfo");
  for (std::string key; in >> key;) {
    double kib = 0;
    std::string unit;
    in >> kib >> unit;
    if (key == "MemAvailable:") {
      avail = kib * 1024.0;
      if (source) *source = "the host's MemAvailable";
      break;
    }
  }
  // cgroup v2: this process's group and its limit.
  std::ifstream cg("/proc/self/cgroup");
  for (std::string line; std::getline(cg, line);) {
    if (line.rfind("0::", 0) != 0) continue;
    const std::string dir = "/sys/fs/cgroup" + line.substr(3);
    auto limit = read_number(dir + "/memory.max"), used = read_number(dir + "/memory.current");
    if (limit && used && (!avail || *limit - *used < *avail)) {
      avail = std::max(0.0, *limit - *used);
      if (source) *source = "the cgroup limit (" + dir + "/memory.max less memory.current)";
    }
  }
  return avail;
}

void check_memory_fits(const Config& cfg, int64_t ranks) {
  std::string source;
  const auto avail = available_host_memory(&source);
  if (!avail) return;
  const MemoryEstimate est = estimate_training_memory(cfg);
  const double need = est.total_bytes() * double(std::max<int64_t>(ranks, 1));
  if (need <= *avail) return;
  std::ostringstream o;
  o << "the run needs about " << gib(need) << " of host memory" << (ranks > 1 ? " for its " + std::to_string(ranks) + " ranks" : "")
    << " (per rank: parameters " << gib(est.param_bytes) << " for " << std::fixed << std::setprecision(0) << est.params << " values with their gradients, optimizer state "
    << gib(est.optimizer_bytes) << ", activations " << gib(est.activation_bytes) << ") and " << gib(*avail)
    << " is available (" << source << "); " << limit_advice() << (ranks > 1 ? ", or start fewer ranks (--nproc)" : "");
  throw Error(o.str());
}

void check_device_memory_fits(const Config& cfg, double free_bytes, const std::string& device) {
  const MemoryEstimate est = estimate_gpu_training_memory(cfg);
  if (est.total_bytes() <= free_bytes) return;
  std::ostringstream o;
  o << "the run needs at least " << gib(est.total_bytes()) << " of GPU memory (parameters " << gib(est.param_bytes)
    << " for " << std::fixed << std::setprecision(0) << est.params << " values with their gradients and bf16 copies, optimizer state "
    << gib(est.optimizer_bytes) << ", activations " << gib(est.activation_bytes) << ") and " << gib(free_bytes)
    << " is free on " << device << "; " << limit_advice();
  throw Error(o.str());
}

}  // namespace moelab
