// sample_run: rebuild a run's model for decoding and generate from a prompt (see sample.hpp).
#include "train/sample.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <numeric>

#include "config/config.hpp"
#include "core/error.hpp"
#include "core/rng.hpp"
#include "data/corpus_shards.hpp"
#include "data/shard_folder.hpp"
#include "data/tokenizer.hpp"
#include "model/gpt.hpp"
#include "train/checkpoint.hpp"
#include "train/device_select.hpp"

namespace moelab {
namespace fs = std::filesystem;

std::string sample_weights_path(const std::string& run_dir, int64_t checkpoint) {
  if (checkpoint >= 0) {
    const std::string p = checkpoint_path(run_dir, checkpoint);
    if (!fs::exists(p)) {
      const auto all = checkpoints_newest_first(run_dir);
      throw Error("--checkpoint " + std::to_string(checkpoint) + ": " + p + " does not exist" +
                  (all.empty() ? std::string(" (the run has no checkpoints; leave --checkpoint out to use model.safetensors)")
                               : " (newest: " + all.front() + ")"));
    }
    return p;
  }
  const std::string final_weights = (fs::path(run_dir) / "model.safetensors").string();
  if (fs::exists(final_weights)) return final_weights;
  const std::string latest = latest_checkpoint(run_dir);
  if (latest.empty())
    throw Error(run_dir + " holds no weights (neither model.safetensors nor checkpoints/): train with "
                "train.save_final = true or train.checkpoint_every > 0");
  return latest;
}

Config decoding_config(const std::string& run_dir, const std::string& device) {
  const std::string config_path = (fs::path(run_dir) / "config.toml").string();
  if (!fs::exists(config_path))
    throw Error(run_dir + " is not a run folder (no config.toml): give --run a folder `moelab train` wrote");
  Config cfg = load_config(config_path);
  if (!device.empty()) cfg.device = device;
  cfg.train.batch_size = 1;
  cfg.moe.dispatch = "dropless";
  cfg.parallel.expert = 1;
  cfg.train.total_batch_tokens = 0;  // a training-batch rule that batch_size = 1 need not divide
  if (cfg.precision == "fp8") cfg.precision = "auto";
  return cfg;
}

namespace {

// The run's tokenizer, or none for a raw-bytes run (ids are the bytes).
std::unique_ptr<Tokenizer> run_tokenizer(const Config& cfg) {
  if (cfg.data.source == "bytes") return nullptr;
  if (cfg.data.source == "shards" && !cfg.data.tokenizer.empty())
    return std::make_unique<Tokenizer>(Tokenizer::load(cfg.data.tokenizer));
  const std::string dir = cfg.data.source == "corpus" ? ensure_corpus_shards(cfg.data) : cfg.data.dir;
  const ShardFolderInfo info = read_shard_folder(dir);
  return std::make_unique<Tokenizer>(Tokenizer::load(info.path_of(info.tokenizer)));
}

// The next token from the logits z: argmax at temperature 0, else a draw from softmax(z / T)
// over the top_k largest (all when top_k = 0).
int32_t choose(const std::vector<double>& z, double temperature, int64_t top_k, Rng& rng) {
  if (temperature <= 0) return int32_t(std::max_element(z.begin(), z.end()) - z.begin());
  std::vector<int32_t> ids(z.size());
  std::iota(ids.begin(), ids.end(), 0);
  const size_t k = top_k > 0 ? std::min(size_t(top_k), ids.size()) : ids.size();
  std::partial_sort(ids.begin(), ids.begin() + ptrdiff_t(k), ids.end(),
                    [&](int32_t a, int32_t b) { return z[size_t(a)] > z[size_t(b)] || (z[size_t(a)] == z[size_t(b)] && a < b); });
  const double m = z[size_t(ids[0])];
  std::vector<double> w(k);
  double total = 0;
  for (size_t i = 0; i < k; ++i) total += w[i] = std::exp((z[size_t(ids[i])] - m) / temperature);
  double u = rng.uniform() * total;
  for (size_t i = 0; i < k; ++i) {
    if (u < w[i]) return ids[i];
    u -= w[i];
  }
  return ids[k - 1];
}

}  // namespace

SampleInfo sample_run(const SampleOptions& o, const std::function<void(int32_t, const std::string&)>& on_token) {
  if (o.max_tokens < 0) throw Error("--max-tokens " + std::to_string(o.max_tokens) + ": give 0 or more");
  if (!(o.temperature >= 0) || !std::isfinite(o.temperature))
    throw Error("--temperature: give a finite value >= 0 (0 is greedy)");
  if (o.top_k < 0) throw Error("--top-k " + std::to_string(o.top_k) + ": give 0 (all tokens) or more");
  Config cfg = decoding_config(o.run_dir, o.device);

  SampleInfo info;
  info.weights = sample_weights_path(o.run_dir, o.checkpoint);
  std::unique_ptr<Tokenizer> tok;
  std::vector<int32_t> prompt = o.prompt_ids;
  const bool text_prompt = prompt.empty();
  if (text_prompt) {
    tok = run_tokenizer(cfg);
    if (tok) {
      prompt = {tok->bos_id()};  // every training row starts a document with <|bos|>
      tok->encode_append(o.prompt, prompt);
    } else {
      for (unsigned char c : o.prompt) prompt.push_back(int32_t(c));
    }
    if (prompt.empty()) throw Error("--prompt is empty and a raw-bytes run has no <|bos|> to start from: give some text");
  }
  for (int32_t id : prompt)
    if (id < 0 || id >= cfg.model.vocab)
      throw Error("prompt token " + std::to_string(id) + " is outside the model's vocabulary 0 .. " +
                  std::to_string(cfg.model.vocab - 1));
  const int64_t max_seq = cfg.model.max_seq;
  if (int64_t(prompt.size()) > max_seq)
    throw Error("the prompt is " + std::to_string(prompt.size()) + " tokens; the model reads at most model.max_seq = " +
                std::to_string(max_seq));
  info.prompt_tokens = int64_t(prompt.size());

  std::unique_ptr<Backend> be = make_backend(cfg);
  info.device = be->name();
  // Buffers for the prompt at once; later calls decode one token each.
  GptMoE model(*be, cfg, /*rows=*/1, /*seq_len=*/int64_t(prompt.size()));
  load_weights(info.weights, *be, model.params());
  model.refresh_compute_weights();
  const int64_t positions = std::min<int64_t>(max_seq, int64_t(prompt.size()) + o.max_tokens);
  GptMoE::KvCache cache = model.make_kv_cache(std::max<int64_t>(positions, 1));

  Rng rng(o.seed, /*stream=*/0x5a3b1e);
  using Clock = std::chrono::steady_clock;
  const auto seconds_since = [](Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); };
  const auto t0 = Clock::now();
  std::vector<double> z = model.forward_decode(prompt, cache);  // returns host logits: the device is done
  info.prompt_seconds = seconds_since(t0);
  info.stop = "max tokens";
  for (int64_t n = 0; n < o.max_tokens; ++n) {
    const int32_t next = choose(z, o.temperature, o.top_k, rng);
    if (text_prompt && tok && next == tok->bos_id()) {
      info.stop = "<|bos|>";
      break;
    }
    on_token(next, tok ? tok->token_text(next) : std::string(1, char(next)));
    ++info.generated_tokens;
    if (n + 1 == o.max_tokens) break;
    if (cache.length == cache.capacity) {
      info.stop = "model.max_seq";
      break;
    }
    const auto t = Clock::now();
    z = model.forward_decode({next}, cache);
    info.decode_seconds += seconds_since(t);
    ++info.decode_steps;
  }
  return info;
}

}  // namespace moelab
