// Checkpoint save/load on top of safetensors.cpp. Device tensors reach the host through the
// backend's read/write calls (exact for the f32 and bf16 masters a GPU uses); CPU tensors are
// copied byte for byte, so an f64 master round-trips exactly too. Doubles go into the metadata as
// the hex of their bit pattern, which no decimal formatting can get wrong.
#include "train/checkpoint.hpp"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <set>

#include "core/atomic_file.hpp"
#include "core/error.hpp"
#include "core/regex.hpp"
#include "config/config.hpp"
#include "train/safetensors.hpp"

namespace moelab {
namespace {

constexpr const char* kFormatKey = "moelab.format";
constexpr const char* kStepKey = "moelab.step";
constexpr const char* kDataStateKey = "moelab.data_state";
constexpr const char* kLossEmaKey = "moelab.loss_ema";
constexpr const char* kTrainTimeKey = "moelab.train_time_s";
constexpr const char* kConfigKey = "moelab.config";
constexpr const char* kScalarPrefix = "moelab.scalar.";

std::string at(const std::string& path) { return "checkpoint '" + path + "': "; }

std::string double_bits(double v) {
  uint64_t u;
  std::memcpy(&u, &v, 8);
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%016llx", static_cast<unsigned long long>(u));
  return buf;
}

bool parse_double_bits(const std::string& s, double& out) {
  if (s.size() != 18 || s[0] != '0' || s[1] != 'x') return false;
  uint64_t u = 0;
  auto r = std::from_chars(s.data() + 2, s.data() + s.size(), u, 16);
  if (r.ec != std::errc() || r.ptr != s.data() + s.size()) return false;
  std::memcpy(&out, &u, 8);
  return true;
}

bool parse_i64(const std::string& s, int64_t& out) {
  auto r = std::from_chars(s.data(), s.data() + s.size(), out);
  return !s.empty() && r.ec == std::errc() && r.ptr == s.data() + s.size();
}

// Host bytes of a tensor: borrowed for CPU memory, copied through the backend otherwise.
struct HostBytes {
  const void* data = nullptr;
  std::vector<uint8_t> owned;
};

HostBytes to_host(Backend& backend, const Tensor& t, const std::string& name) {
  HostBytes h;
  if (t.device == Device::cpu) {
    h.data = t.data;
    return h;
  }
  h.owned.resize(t.bytes());
  if (t.dtype == DType::f32) {
    std::vector<float> v = backend.read(t);
    std::memcpy(h.owned.data(), v.data(), h.owned.size());
  } else if (t.dtype == DType::bf16) {
    std::vector<float> v = backend.read(t);
    auto* out = reinterpret_cast<uint16_t*>(h.owned.data());
    for (size_t i = 0; i < v.size(); ++i) out[i] = f32_to_bf16_bits(v[i]);  // exact: v holds bf16 values
  } else if (t.dtype == DType::i32) {
    std::vector<int32_t> v = backend.read_i32(t);
    std::memcpy(h.owned.data(), v.data(), h.owned.size());
  } else {
    throw Error("checkpoint: tensor '" + name + "' is " + t.describe() +
                ", which cannot be copied from the device exactly (masters must be f32 or bf16 on a GPU)");
  }
  h.data = h.owned.data();
  return h;
}

void from_host(Backend& backend, Tensor& t, const uint8_t* bytes) {
  if (t.device == Device::cpu) {
    if (t.bytes()) std::memcpy(t.data, bytes, t.bytes());
    return;
  }
  const size_t n = size_t(t.numel());
  if (t.dtype == DType::f32) {
    std::vector<float> v(n);
    std::memcpy(v.data(), bytes, t.bytes());
    backend.write(t, v);
  } else if (t.dtype == DType::bf16) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; ++i) {
      uint16_t b;
      std::memcpy(&b, bytes + 2 * i, 2);
      v[i] = bf16_bits_to_f32(b);
    }
    backend.write(t, v);
  } else if (t.dtype == DType::i32) {
    std::vector<int32_t> v(n);
    std::memcpy(v.data(), bytes, t.bytes());
    backend.write_i32(t, v);
  } else {
    MOELAB_CHECK(false, "from_host: " + t.describe() + " was accepted by validation");
  }
}

// "model.d_model: checkpoint 64, this run 128; ..." for the shape-defining keys that differ, or "".
std::string model_config_diff(const std::string& stored, const std::string& current) {
  if (stored.empty() || current.empty()) return "";
  try {
    auto a = config_flat(config_from_toml_text(stored, "checkpoint config"));
    auto b = config_flat(config_from_toml_text(current, "current config"));
    std::map<std::string, std::string> bm(b.begin(), b.end());
    std::string out;
    for (const auto& [k, v] : a) {
      if (k.rfind("model.", 0) != 0 && k.rfind("moe.", 0) != 0) continue;
      auto it = bm.find(k);
      if (it != bm.end() && it->second != v)
        out += std::string(out.empty() ? "" : "; ") + k + ": checkpoint " + v + ", this run " + it->second;
    }
    return out;
  } catch (const std::exception&) {
    return "";  // an old or foreign config: the plain message still names the tensor
  }
}

struct Target {
  const std::string* name;
  Tensor* tensor;
  bool optimizer_state;
};

}  // namespace

void save_checkpoint(const std::string& path, Backend& backend, const ParamTable& params,
                     const std::vector<NamedTensor>& optimizer_state, const CheckpointMeta& meta) {
  backend.synchronize();
  std::set<std::string> names;
  std::vector<SafetensorsTensor> tensors;
  std::vector<HostBytes> held;
  held.reserve(params.params.size() + optimizer_state.size());
  auto add = [&](const std::string& name, const Tensor& t) {
    if (!names.insert(name).second)
      throw Error(at(path) + "two tensors are named '" + name + "' (parameter and optimizer state names must be unique)");
    held.push_back(to_host(backend, t, name));
    tensors.push_back({name, safe_dtype_of(t.dtype), t.shape, held.back().data});
  };
  for (const auto& p : params.params) add(p.name, p.value);
  for (const auto& s : optimizer_state) add(s.name, s.tensor);

  std::map<std::string, std::string> md;
  md[kFormatKey] = kCheckpointFormat;
  md[kStepKey] = std::to_string(meta.step);
  std::string ds;
  for (size_t i = 0; i < meta.data_state.size(); ++i) ds += (i ? "," : "") + std::to_string(meta.data_state[i]);
  md[kDataStateKey] = ds;
  md[kLossEmaKey] = double_bits(meta.loss_ema);
  md[kTrainTimeKey] = double_bits(meta.train_time_s);
  md[kConfigKey] = meta.config_text;
  for (const auto& [k, v] : meta.scalars) {
    const bool ok = !k.empty() && std::all_of(k.begin(), k.end(), [](char c) {
      return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.';
    });
    if (!ok) throw Error(at(path) + "scalar name '" + k + "' must be non-empty and use only [A-Za-z0-9_.]");
    md[kScalarPrefix + k] = double_bits(v);
  }
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  std::error_code ec;
  if (!parent.empty()) std::filesystem::create_directories(parent, ec);  // a failure shows up in the write
  write_safetensors(path, tensors, md);
}

void save_model_export(const std::string& run_dir, Backend& backend, const ParamTable& params,
                       const std::vector<NamedTensor>& optimizer_state, const CheckpointMeta& meta,
                       const std::string& config_json) {
  namespace fs = std::filesystem;
  backend.synchronize();
  std::vector<HostBytes> held;
  held.reserve(params.params.size());
  std::vector<SafetensorsTensor> weights;
  for (const auto& p : params.params) {
    held.push_back(to_host(backend, p.value, p.name));
    weights.push_back({p.name, safe_dtype_of(p.value.dtype), p.value.shape, held.back().data});
  }
  write_safetensors((fs::path(run_dir) / "model.safetensors").string(), weights,
                    {{"format", "moelab-model/1"}, {"moelab.step", std::to_string(meta.step)}});
  // The optimizer file is a checkpoint without the weights: same metadata, its own tensors.
  ParamTable none;
  save_checkpoint((fs::path(run_dir) / "optimizer.safetensors").string(), backend, none, optimizer_state, meta);
  write_file_atomic((fs::path(run_dir) / "config.json").string(), config_json);
}

void load_checkpoint(const std::string& path, Backend& backend, ParamTable& params,
                     const std::vector<NamedTensor>& optimizer_state, CheckpointMeta& out,
                     const std::string& current_config_text) {
  SafetensorsFile file;
  try {
    file = read_safetensors(path, /*require_checksum=*/true);
  } catch (const Error& e) {
    throw CheckpointUnreadable(std::string("cannot load checkpoint: ") + e.what());
  }

  // Metadata first: it is small and says whether this is a moelab checkpoint at all.
  auto meta_value = [&](const char* key) -> const std::string& {
    auto it = file.metadata.find(key);
    if (it == file.metadata.end())
      throw Error(at(path) + "metadata key '" + key + "' is missing (not a moelab checkpoint?)");
    return it->second;
  };
  if (meta_value(kFormatKey) != kCheckpointFormat)
    throw Error(at(path) + "format '" + meta_value(kFormatKey) + "' is not '" + kCheckpointFormat +
                "' (written by an incompatible moelab version)");
  CheckpointMeta meta;
  if (!parse_i64(meta_value(kStepKey), meta.step) || meta.step < 0)
    throw Error(at(path) + "step '" + meta_value(kStepKey) + "' is not a non-negative integer");
  {
    const std::string& ds = meta_value(kDataStateKey);
    size_t pos = 0;
    while (!ds.empty() && pos <= ds.size()) {
      size_t comma = ds.find(',', pos);
      if (comma == std::string::npos) comma = ds.size();
      int64_t v;
      if (!parse_i64(ds.substr(pos, comma - pos), v))
        throw Error(at(path) + "data_state '" + ds + "' is not a comma list of integers");
      meta.data_state.push_back(v);
      pos = comma + 1;
    }
  }
  if (!parse_double_bits(meta_value(kLossEmaKey), meta.loss_ema))
    throw Error(at(path) + "loss_ema '" + meta_value(kLossEmaKey) + "' is not 0x + 16 hex digits");
  if (!parse_double_bits(meta_value(kTrainTimeKey), meta.train_time_s))
    throw Error(at(path) + "train_time_s '" + meta_value(kTrainTimeKey) + "' is not 0x + 16 hex digits");
  meta.config_text = meta_value(kConfigKey);
  for (const auto& [k, v] : file.metadata) {
    if (k.rfind(kScalarPrefix, 0) != 0) continue;
    double d;
    if (!parse_double_bits(v, d)) throw Error(at(path) + "scalar '" + k + "' value '" + v + "' is not 0x + 16 hex digits");
    meta.scalars[k.substr(std::strlen(kScalarPrefix))] = d;
  }

  // Every tensor the model and optimizer hold must be there, exactly; nothing else may be.
  std::vector<Target> targets;
  for (auto& p : params.params) targets.push_back({&p.name, &p.value, false});
  std::vector<NamedTensor> state = optimizer_state;  // shares storage with the caller's tensors
  for (auto& s : state) targets.push_back({&s.name, &s.tensor, true});
  std::set<std::string> expected;
  std::vector<const SafetensorsEntry*> sources;
  for (const auto& t : targets) {
    const std::string& name = *t.name;
    if (!expected.insert(name).second)
      throw Error(at(path) + "the model and optimizer both expect a tensor named '" + name + "'");
    const SafetensorsEntry* e = file.find(name);
    if (!e)
      throw Error(at(path) + "tensor '" + name + "' is missing: the checkpoint was made with a different " +
                  (t.optimizer_state ? "optimizer or model" : "model") +
                  " configuration");
    const SafeDType want = safe_dtype_of(t.tensor->dtype);
    if (e->dtype != want)
      throw Error(at(path) + "tensor '" + name + "' is " + safe_dtype_name(e->dtype) + " but this run keeps it as " +
                  safe_dtype_name(want) + ": the checkpoint was made with another master precision");
    if (e->shape != t.tensor->shape) {
      std::string diff = model_config_diff(meta.config_text, current_config_text);
      throw Error(at(path) + "tensor '" + name + "' has shape " + shape_str(e->shape) + " but the model expects " +
                  shape_str(t.tensor->shape) + ": the checkpoint was made with another model configuration" +
                  (diff.empty() ? std::string(" (compare its config, stored in the file, with this run's)")
                                : " (" + diff + ")"));
    }
    sources.push_back(e);
  }
  for (const auto& e : file.entries)
    if (!expected.count(e.name))
      throw Error(at(path) + "holds tensor '" + e.name +
                  "' that this model and optimizer do not have: the checkpoint was made with a different configuration");

  // Only now touch the run's tensors.
  backend.synchronize();
  for (size_t i = 0; i < targets.size(); ++i) from_host(backend, *targets[i].tensor, file.bytes(*sources[i]));
  backend.synchronize();
  out = std::move(meta);
}

void load_weights(const std::string& path, Backend& backend, ParamTable& params) {
  const SafetensorsFile file = read_safetensors(path, /*require_checksum=*/true);
  std::vector<const SafetensorsEntry*> sources;
  for (const Param& p : params.params) {
    const SafetensorsEntry* e = file.find(p.name);
    if (!e) throw Error(at(path) + "tensor '" + p.name + "' is missing: the file was made with another model configuration");
    if (e->dtype != safe_dtype_of(p.value.dtype))
      throw Error(at(path) + "tensor '" + p.name + "' is " + safe_dtype_name(e->dtype) + " but the model keeps it as " +
                  safe_dtype_name(safe_dtype_of(p.value.dtype)));
    if (e->shape != p.value.shape)
      throw Error(at(path) + "tensor '" + p.name + "' has shape " + shape_str(e->shape) + " but the model expects " +
                  shape_str(p.value.shape));
    sources.push_back(e);
  }
  backend.synchronize();
  for (size_t i = 0; i < sources.size(); ++i) from_host(backend, params.params[i].value, file.bytes(*sources[i]));
  backend.synchronize();
}

std::string checkpoint_path(const std::string& run_dir, int64_t step) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "step_%06lld.safetensors", static_cast<long long>(step));
  return (std::filesystem::path(run_dir) / "checkpoints" / buf).string();
}

std::vector<std::string> checkpoints_newest_first(const std::string& run_dir) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(run_dir) / "checkpoints";
  std::error_code ec;
  std::vector<std::pair<int64_t, std::string>> found;
  if (!fs::is_directory(dir, ec)) return {};
  static const Regex pattern(R"(step_(\d{6,18})\.safetensors)");
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (!entry.is_regular_file(ec)) continue;
    const auto m = pattern.full_match(entry.path().filename().string());
    int64_t step;
    if (m && parse_i64(m->str(1), step)) found.emplace_back(step, entry.path().string());
  }
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<std::string> out;
  for (auto& f : found) out.push_back(std::move(f.second));
  return out;
}

std::string latest_checkpoint(const std::string& run_dir) {
  auto all = checkpoints_newest_first(run_dir);
  return all.empty() ? "" : all.front();
}

std::vector<std::string> prune_checkpoints(const std::string& run_dir, int64_t keep) {
  std::vector<std::string> removed;
  if (keep <= 0) return removed;
  auto all = checkpoints_newest_first(run_dir);
  for (size_t i = size_t(keep); i < all.size(); ++i) {
    std::error_code ec;
    if (std::filesystem::remove(all[i], ec)) removed.push_back(all[i]);
  }
  return removed;
}

}  // namespace moelab
