// The key table and everything derived from it: TOML loading, overrides, validation, writing.
#include "config/config.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <variant>

#include <toml++/toml.h>

#include "core/error.hpp"

namespace moelab {
namespace {

enum class Kind { integer, real, boolean, text };

// The values a real key accepts: always finite, and within [lo, hi], where an open end
// excludes its bound. Each real key states its range once, on its line of the table; loading,
// --set and validate_config all check it, and the error names the key and the range.
struct Range {
  double lo = -INFINITY, hi = INFINITY;
  bool lo_open = false, hi_open = false;

  bool contains(double v) const {
    if (!std::isfinite(v)) return false;
    if (lo_open ? !(v > lo) : !(v >= lo)) return false;
    return hi_open ? v < hi : v <= hi;
  }
  std::string text() const;
};
constexpr Range kAnyFinite{};
constexpr Range kNonNegative{0, INFINITY, false, false};
constexpr Range kPositive{0, INFINITY, true, false};
constexpr Range kUnitClosed{0, 1, false, false};   // [0, 1]
constexpr Range kUnitHalfOpen{0, 1, false, true};  // [0, 1): EMA coefficients
constexpr Range kUnitOpen{0, 1, true, true};       // (0, 1)

struct Key {
  std::string name;  // "section.key" or a top-level "key"
  Kind kind;
  std::string doc;
  std::function<void*(Config&)> field;
  Range range = kAnyFinite;  // real keys only
};

std::string number_text(double v) {
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  auto end = std::to_chars(buf, buf + sizeof buf, v).ptr;
  return std::string(buf, end);
}

std::string Range::text() const {
  return std::string(lo_open || lo == -INFINITY ? "(" : "[") + number_text(lo) + ", " + number_text(hi) +
         (hi_open || hi == INFINITY ? ")" : "]");
}

template <class T>
std::function<void*(Config&)> member(T Config::*section_or_field) {
  return [section_or_field](Config& c) -> void* { return &(c.*section_or_field); };
}
template <class S, class T>
std::function<void*(Config&)> member(S Config::*section, T S::*field) {
  return [section, field](Config& c) -> void* { return &((c.*section).*field); };
}

const std::vector<Key>& keys() {
  static const std::vector<Key> table = {
      {"device", Kind::text, "auto | cpu | cuda", member(&Config::device)},
      {"precision", Kind::text, "auto | f32 | bf16 | fp8", member(&Config::precision)},
      {"exec", Kind::text, "graph | eager: CUDA graph replay of the whole step, or launch by launch",
       member(&Config::exec)},

      {"model.d_model", Kind::integer, "width of the residual stream", member(&Config::model, &ModelConfig::d_model)},
      {"model.layers", Kind::integer, "transformer blocks", member(&Config::model, &ModelConfig::layers)},
      {"model.head_dim", Kind::integer, "attention head size (heads = d_model / head_dim)", member(&Config::model, &ModelConfig::head_dim)},
      {"model.kv_heads", Kind::integer, "key/value heads for grouped-query attention; 0 = one per query head", member(&Config::model, &ModelConfig::kv_heads)},
      {"model.window_pattern", Kind::text, "attention span per layer, tiled over the layers: S = sliding window of seq_len / 2, L = full context; the last layer is always L (nanochat's \"SSSL\")", member(&Config::model, &ModelConfig::window_pattern)},
      {"model.vocab", Kind::integer, "vocabulary size (at least the tokenizer's)", member(&Config::model, &ModelConfig::vocab)},
      {"model.mlp_hidden", Kind::integer, "dense MLP width; 0 = 4 * d_model", member(&Config::model, &ModelConfig::mlp_hidden)},
      {"model.max_seq", Kind::integer, "rotary table length (longest train.seq_len)", member(&Config::model, &ModelConfig::max_seq)},
      {"model.rope_base", Kind::real, "rotary frequency base", member(&Config::model, &ModelConfig::rope_base), kPositive},
      {"model.softcap", Kind::real, "logit softcap (cap * tanh(logits / cap))", member(&Config::model, &ModelConfig::softcap), kPositive},
      {"model.init_scale", Kind::real, "multiplier on the default init std", member(&Config::model, &ModelConfig::init_scale), kPositive},
      {"model.value_embeddings", Kind::boolean, "value embeddings with a learned per-head gate, added to v on alternating layers (the last included)", member(&Config::model, &ModelConfig::value_embeddings)},
      {"model.ve_gate_channels", Kind::integer, "leading channels of the attention input that the value-embedding gate reads", member(&Config::model, &ModelConfig::ve_gate_channels)},
      {"model.scalar_lambdas", Kind::boolean, "learned per-layer scalars: x = resid_lambda * x + x0_lambda * x0 before each block", member(&Config::model, &ModelConfig::scalar_lambdas)},

      {"moe.experts", Kind::integer, "experts per MoE layer; 0 = dense model", member(&Config::moe, &MoEConfig::experts)},
      {"moe.top_k", Kind::integer, "experts per token", member(&Config::moe, &MoEConfig::top_k)},
      {"moe.expert_hidden", Kind::integer, "hidden width of each expert", member(&Config::moe, &MoEConfig::expert_hidden)},
      {"moe.layers", Kind::text, "which layers are MoE: all | none | comma list such as \"1,3\"", member(&Config::moe, &MoEConfig::layers)},
      {"moe.shared_expert", Kind::boolean, "add an always-on shared expert (alias of moe.shared_experts = 1)", member(&Config::moe, &MoEConfig::shared_expert)},
      {"moe.shared_experts", Kind::integer, "always-on shared experts of shared_hidden each, run as one MLP of shared_experts * shared_hidden (ReLU^2 is elementwise, so the sum is the same); 0 = none (or 1 with shared_expert = true)", member(&Config::moe, &MoEConfig::shared_experts)},
      {"moe.shared_hidden", Kind::integer, "width of each shared expert; 0 = expert_hidden", member(&Config::moe, &MoEConfig::shared_hidden)},
      {"moe.dispatch", Kind::text, "dropless | capacity", member(&Config::moe, &MoEConfig::dispatch)},
      {"moe.capacity_factor", Kind::real, "capacity = max(1, ceil(tokens * top_k / experts * factor)); <= 0 = no capacity (dropless)", member(&Config::moe, &MoEConfig::capacity_factor), kAnyFinite},
      {"moe.balance_coef", Kind::real, "Switch balance-loss coefficient", member(&Config::moe, &MoEConfig::balance_coef), kNonNegative},
      {"moe.balance_rule", Kind::text, "switch (f = count / (T k), logged with the coefficient) | seed (f = count / T, summing to k; logged without it)", member(&Config::moe, &MoEConfig::balance_rule)},
      {"moe.drop_order", Kind::text, "which assignments capacity keeps: rank (first choices first) | token (flat token-major order, the seed's)", member(&Config::moe, &MoEConfig::drop_order)},
      {"moe.router_init", Kind::text, "uniform (like c_fc) | zero (the seed's)", member(&Config::moe, &MoEConfig::router_init)},
      {"moe.score", Kind::text, "router scores: softmax (over the experts) | sigmoid (per expert, DeepSeek-V3's affinities); top-k is chosen on the scores (plus the aux_free bias)", member(&Config::moe, &MoEConfig::score)},
      {"moe.norm_topk", Kind::boolean, "gates = the chosen scores divided by their sum; false = the raw chosen scores", member(&Config::moe, &MoEConfig::norm_topk)},
      {"moe.route_scale", Kind::real, "constant factor on the gates (DeepSeek-V3 used 2.5)", member(&Config::moe, &MoEConfig::route_scale), kPositive},
      {"moe.balance", Kind::text, "aux_loss (balance loss at balance_coef) | aux_free (a per-expert bias on the scores for the choice only, updated after each optimizer step; no aux loss unless balance_scope = sequence, which adds DeepSeek-V3's complementary sequence-wise loss at balance_coef) | none (neither)", member(&Config::moe, &MoEConfig::balance)},
      {"moe.bias_update_rate", Kind::real, "aux_free: after each optimizer step bias_e += rate * sign(mean load - load_e), loads over the step's micro-batches and ranks", member(&Config::moe, &MoEConfig::bias_update_rate), kNonNegative},
      {"moe.balance_scope", Kind::text, "what the aux loss balances: micro_batch (f and P over the micro-batch) | sequence (f and P per sequence, averaged over sequences: DeepSeek-V3's sequence-wise loss) | global_batch (f from the expert counts summed over the step's micro-batches so far, this one included, and over the ranks; P from the micro-batch)", member(&Config::moe, &MoEConfig::balance_scope)},
      {"moe.z_loss_coef", Kind::real, "ST-MoE router z-loss weight: coef * mean over tokens of logsumexp(router logits)^2 per MoE layer; 0 = off (still logged)", member(&Config::moe, &MoEConfig::z_loss_coef), kNonNegative},
      {"moe.groups", Kind::integer, "group-limited routing: experts split into this many equal groups; 1 = off", member(&Config::moe, &MoEConfig::groups)},
      {"moe.topk_groups", Kind::integer, "group-limited routing: groups kept per token, ranked by the sum of their two best (biased) scores; top_k is chosen inside them", member(&Config::moe, &MoEConfig::topk_groups)},

      {"train.steps", Kind::integer, "optimizer steps", member(&Config::train, &TrainConfig::steps)},
      {"train.batch_size", Kind::integer, "sequences per micro-batch", member(&Config::train, &TrainConfig::batch_size)},
      {"train.seq_len", Kind::integer, "tokens per sequence", member(&Config::train, &TrainConfig::seq_len)},
      {"train.grad_accum", Kind::integer, "micro-batches per optimizer step (ignored when train.total_batch_tokens is set)", member(&Config::train, &TrainConfig::grad_accum)},
      {"train.total_batch_tokens", Kind::integer, "tokens per optimizer step; 0 = batch_size * seq_len * grad_accum. Must be a multiple of batch_size * seq_len; grad_accum follows", member(&Config::train, &TrainConfig::total_batch_tokens)},
      {"train.seed", Kind::integer, "seed for init and data order", member(&Config::train, &TrainConfig::seed)},
      {"train.eval_every", Kind::integer, "validation interval in steps; 0 = only at the end", member(&Config::train, &TrainConfig::eval_every)},
      {"train.eval_batches", Kind::integer, "micro-batches per validation", member(&Config::train, &TrainConfig::eval_batches)},
      {"train.checkpoint_every", Kind::integer, "checkpoint interval in steps; 0 = only at the end", member(&Config::train, &TrainConfig::checkpoint_every)},
      {"train.resume", Kind::text, "\"\" | auto | path of a checkpoint to resume from", member(&Config::train, &TrainConfig::resume)},
      {"train.warmup_ratio", Kind::real, "fraction of steps of linear lr warm-up", member(&Config::train, &TrainConfig::warmup_ratio), kUnitClosed},
      {"train.warmdown_ratio", Kind::real, "fraction of steps of linear lr warm-down at the end", member(&Config::train, &TrainConfig::warmdown_ratio), kUnitClosed},
      {"train.final_lr_frac", Kind::real, "lr multiplier reached at the last step", member(&Config::train, &TrainConfig::final_lr_frac), kUnitClosed},
      {"train.peak_flops", Kind::real, "peak FLOP/s per device for MFU; 0 = by card name (none on CPU)", member(&Config::train, &TrainConfig::peak_flops), kNonNegative},
      {"train.threads", Kind::integer, "CPU threads; 0 = all cores", member(&Config::train, &TrainConfig::threads)},
      {"train.save_final", Kind::boolean, "write a checkpoint at the end", member(&Config::train, &TrainConfig::save_final)},
      {"train.keep_checkpoints", Kind::integer, "newest checkpoints kept in the run folder; 0 = all", member(&Config::train, &TrainConfig::keep_checkpoints)},
      {"train.tensorboard", Kind::boolean, "also write loss, validation, lr multiplier, tok/s, MFU and drop rate as TensorBoard event files (RUN_DIR/events.out.tfevents.*)", member(&Config::train, &TrainConfig::tensorboard)},

      {"optim.matrix_optimizer", Kind::text, "muon | adamw: the update of all matrices (attention, router, experts)", member(&Config::optim, &OptimConfig::matrix_optimizer)},
      {"optim.shard_state", Kind::boolean, "data parallel (ZeRO-1): each rank keeps the AdamW / Muon state of its own share of the parameters (whole parameters, one consecutive range of each gradient arena per rank), receives only their summed gradients (reduce-scatter), updates only those and sends them to the other ranks; the same updates as without it; checkpoints hold the whole state (gathered by rank 0)", member(&Config::optim, &OptimConfig::shard_state)},
      {"optim.matrix_lr", Kind::real, "Muon learning rate (all matrices, experts included)", member(&Config::optim, &OptimConfig::matrix_lr), kNonNegative},
      {"optim.matrix_adamw_lr", Kind::real, "AdamW learning rate of the matrices when optim.matrix_optimizer = adamw", member(&Config::optim, &OptimConfig::matrix_adamw_lr), kPositive},
      {"optim.embedding_lr", Kind::real, "AdamW learning rate of the token embedding", member(&Config::optim, &OptimConfig::embedding_lr), kNonNegative},
      {"optim.unembedding_lr", Kind::real, "AdamW learning rate of lm_head", member(&Config::optim, &OptimConfig::unembedding_lr), kNonNegative},
      {"optim.weight_decay", Kind::real, "decoupled weight decay (Muon and AdamW)", member(&Config::optim, &OptimConfig::weight_decay), kNonNegative},
      {"optim.adamw_weight_decay", Kind::real, "weight decay of the AdamW groups; < 0 = optim.weight_decay (the seed: 0, Muon only)", member(&Config::optim, &OptimConfig::adamw_weight_decay), kAnyFinite},
      {"optim.adam_beta1", Kind::real, "AdamW beta1", member(&Config::optim, &OptimConfig::adam_beta1), kUnitHalfOpen},
      {"optim.adam_beta2", Kind::real, "AdamW beta2", member(&Config::optim, &OptimConfig::adam_beta2), kUnitHalfOpen},
      {"optim.adam_eps", Kind::real, "AdamW epsilon", member(&Config::optim, &OptimConfig::adam_eps), kPositive},
      {"optim.scale_lr_by_dmodel", Kind::boolean, "scale AdamW lrs by (d_model/768)^-0.5", member(&Config::optim, &OptimConfig::scale_lr_by_dmodel)},
      {"optim.muon_momentum", Kind::real, "Muon momentum after warm-up", member(&Config::optim, &OptimConfig::muon_momentum), kUnitHalfOpen},
      {"optim.muon_momentum_start", Kind::real, "Muon momentum at step 0", member(&Config::optim, &OptimConfig::muon_momentum_start), kUnitHalfOpen},
      {"optim.muon_momentum_warmup", Kind::integer, "steps of Muon momentum warm-up", member(&Config::optim, &OptimConfig::muon_momentum_warmup)},
      {"optim.muon_ns_steps", Kind::integer, "Newton-Schulz iterations", member(&Config::optim, &OptimConfig::muon_ns_steps)},
      {"optim.muon_nesterov", Kind::boolean, "Nesterov momentum in Muon", member(&Config::optim, &OptimConfig::muon_nesterov)},
      {"optim.muon_variant", Kind::text, "muon (fixed Newton-Schulz coefficients) | normuon (Polar Express coefficients + NorMuon variance reduction, the seed's)", member(&Config::optim, &OptimConfig::muon_variant)},
      {"optim.muon_beta2", Kind::real, "normuon: EMA coefficient of the per-row/column second moment", member(&Config::optim, &OptimConfig::muon_beta2), kUnitHalfOpen},
      {"optim.cautious_weight_decay", Kind::boolean, "Muon: decay a weight only where the update agrees with it in sign", member(&Config::optim, &OptimConfig::cautious_weight_decay)},
      {"optim.weight_decay_schedule", Kind::text, "Muon weight decay over the run: constant | linear (falls to 0 at the last step)", member(&Config::optim, &OptimConfig::weight_decay_schedule)},
      {"optim.weight_decay_ref_batch", Kind::integer, "> 0: Muon weight decay times sqrt(tokens per step / this)", member(&Config::optim, &OptimConfig::weight_decay_ref_batch)},
      {"optim.weight_decay_ref_horizon", Kind::real, "> 0: Muon weight decay times this / (tokens per step * train.steps)", member(&Config::optim, &OptimConfig::weight_decay_ref_horizon), kNonNegative},
      {"optim.scalar_lr", Kind::real, "AdamW lr of the x0 lambdas (betas 0.96, 0.95); resid lambdas get scalar_lr * 0.01", member(&Config::optim, &OptimConfig::scalar_lr), kNonNegative},
      {"optim.value_embedding_lr", Kind::real, "AdamW lr of the value embeddings (scaled by d_model like embedding_lr)", member(&Config::optim, &OptimConfig::value_embedding_lr), kNonNegative},

      {"fp8.recipe", Kind::text, "precision = fp8: tensorwise | rowwise | blockwise (1x128 activations, 128x128 weights)", member(&Config::fp8, &Fp8Config::recipe)},
      {"fp8.layers", Kind::text, "precision = fp8: which linears run in FP8: dense (attention, dense MLPs) | experts | all", member(&Config::fp8, &Fp8Config::layers)},
      {"fp8.head", Kind::boolean, "precision = fp8: lm_head in FP8 too", member(&Config::fp8, &Fp8Config::head)},
      {"fp8.grad_format", Kind::text, "precision = fp8: format of gradient operands in the backward: e5m2 | e4m3", member(&Config::fp8, &Fp8Config::grad_format)},

      {"parallel.expert", Kind::integer, "expert parallel: ranks that split each MoE layer's experts (moe.experts / P each; CPU ranks, P = the job's ranks); 1 = every rank holds every expert", member(&Config::parallel, &ParallelConfig::expert)},

      {"data.source", Kind::text, "bytes (raw bytes, vocab 256) | shards (data.dir) | corpus (BPE of the embedded corpus, built and cached on first use)", member(&Config::data, &DataConfig::source)},
      {"data.text", Kind::text, "bytes mode: text file; \"\" = embedded default corpus", member(&Config::data, &DataConfig::text)},
      {"data.dir", Kind::text, "shards mode: folder from `moelab data prepare`; corpus mode: cache folder (\"\" = ~/.cache/moelab/...)", member(&Config::data, &DataConfig::dir)},
      {"data.vocab_size", Kind::integer, "corpus mode: tokenizer vocabulary trained on the embedded corpus", member(&Config::data, &DataConfig::vocab_size)},
      {"data.tokenizer", Kind::text, "shards mode: tokenizer file; \"\" = the one recorded in data.dir", member(&Config::data, &DataConfig::tokenizer)},
      {"data.val_fraction", Kind::real, "bytes mode: fraction of the text held out", member(&Config::data, &DataConfig::val_fraction), kUnitOpen},
  };
  return table;
}

const Key* find_key(const std::string& name) {
  for (auto& k : keys())
    if (k.name == name) return &k;
  return nullptr;
}

std::string known_keys_hint(const std::string& name) {
  // Suggest keys of the same section, or the same final component.
  auto dot = name.find('.');
  std::string section = dot == std::string::npos ? "" : name.substr(0, dot);
  std::string leaf = dot == std::string::npos ? name : name.substr(dot + 1);
  std::vector<std::string> close;
  for (auto& k : keys()) {
    auto kd = k.name.find('.');
    std::string ks = kd == std::string::npos ? "" : k.name.substr(0, kd);
    std::string kl = kd == std::string::npos ? k.name : k.name.substr(kd + 1);
    if (kl == leaf || (!section.empty() && ks == section)) close.push_back(k.name);
  }
  if (close.empty()) return " (run `moelab train --help-config` for the list of keys)";
  std::string s = " (known keys here: ";
  for (size_t i = 0; i < close.size(); ++i) s += (i ? ", " : "") + close[i];
  return s + ")";
}

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::integer: return "an integer";
    case Kind::real: return "a number";
    case Kind::boolean: return "true or false";
    case Kind::text: return "a string";
  }
  return "?";
}

[[noreturn]] void invalid(const std::string& key, const std::string& problem, const std::string& fix) {
  throw Error("invalid config: " + key + " " + problem + "; " + fix);
}

// A real key's value against its range; `where` names the file or --set it came from ("" from
// validate_config).
void check_range(const Config& cfg, const Key& key, const std::string& where) {
  if (key.kind != Kind::real) return;
  const double v = *static_cast<const double*>(key.field(const_cast<Config&>(cfg)));
  if (key.range.contains(v)) return;
  static const Config defaults;
  const std::string fix = "use a value in " + key.range.text() + " (" + key.doc + "; default " +
                          number_text(*static_cast<const double*>(key.field(const_cast<Config&>(defaults)))) + ")";
  invalid(key.name, "= " + number_text(v) + (where.empty() ? "" : " (" + where + ")") + " must be finite and in " +
                        key.range.text(),
          fix);
}

void set_from_toml(Config& cfg, const Key& key, const toml::node& node, const std::string& origin) {
  void* f = key.field(cfg);
  auto bad = [&]() {
    std::ostringstream o;
    o << origin << ": key '" << key.name << "' must be " << kind_name(key.kind) << " (" << key.doc << ")";
    throw Error(o.str());
  };
  switch (key.kind) {
    case Kind::integer:
      if (auto v = node.value_exact<int64_t>()) *static_cast<int64_t*>(f) = *v;
      else bad();
      break;
    case Kind::real:
      if (auto v = node.value<double>(); v && (node.is_floating_point() || node.is_integer()))
        *static_cast<double*>(f) = *v;
      else bad();
      check_range(cfg, key, origin);
      break;
    case Kind::boolean:
      if (auto v = node.value_exact<bool>()) *static_cast<bool*>(f) = *v;
      else bad();
      break;
    case Kind::text:
      if (auto v = node.value_exact<std::string>()) *static_cast<std::string*>(f) = *v;
      else if (key.name == "moe.layers" && node.is_array()) {
        // Accept moe.layers = [1, 3] as well as "1,3".
        std::string s;
        for (auto& e : *node.as_array()) {
          auto i = e.value_exact<int64_t>();
          if (!i) bad();
          s += (s.empty() ? "" : ",") + std::to_string(*i);
        }
        *static_cast<std::string*>(f) = s;
      } else bad();
      break;
  }
}

void walk(Config& cfg, const toml::table& table, const std::string& prefix, const std::string& origin) {
  for (auto& [k, node] : table) {
    std::string name = prefix.empty() ? std::string(k.str()) : prefix + "." + std::string(k.str());
    if (node.is_table() && !find_key(name)) {
      walk(cfg, *node.as_table(), name, origin);
      continue;
    }
    const Key* key = find_key(name);
    if (!key) throw Error(origin + ": unknown config key '" + name + "'" + known_keys_hint(name));
    set_from_toml(cfg, *key, node, origin);
  }
}

std::string value_string(const Config& cfg_const, const Key& key, bool quoted) {
  Config& cfg = const_cast<Config&>(cfg_const);
  void* f = key.field(cfg);
  std::ostringstream o;
  switch (key.kind) {
    case Kind::integer: o << *static_cast<int64_t*>(f); break;
    case Kind::real: {
      // Shortest text that reads back to the same double (0.2, not 0.20000000000000001).
      double d = *static_cast<double*>(f);
      char buf[64];
      auto end = std::to_chars(buf, buf + sizeof buf, d).ptr;
      std::string s(buf, end);
      if (s.find_first_of(".eEn") == std::string::npos) s += ".0";  // keep it a TOML float
      return s;
    }
    case Kind::boolean: o << (*static_cast<bool*>(f) ? "true" : "false"); break;
    case Kind::text: {
      const std::string& s = *static_cast<std::string*>(f);
      if (!quoted) return s;
      o << '"';
      for (char c : s) {
        if (c == '"' || c == '\\') o << '\\';
        o << c;
      }
      o << '"';
    } break;
  }
  return o.str();
}


}  // namespace

Config config_from_toml_text(const std::string& text, const std::string& origin) {
  toml::table table;
  try {
    table = toml::parse(text, origin);
  } catch (const toml::parse_error& e) {
    std::ostringstream o;
    o << origin << ":" << e.source().begin.line << ":" << e.source().begin.column << ": TOML syntax error: "
      << e.description();
    throw Error(o.str());
  }
  // An empty file would silently train the d12 defaults, hours on a CPU.
  if (table.empty())
    throw Error(origin + ": empty config: start from configs/tiny-cpu.toml (CPU) or configs/d12-moe.toml (GPU)");
  Config cfg;
  walk(cfg, table, "", origin);
  return cfg;
}

Config load_config(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot open config file '" + path + "': check the path passed to --config");
  std::stringstream ss;
  ss << in.rdbuf();
  return config_from_toml_text(ss.str(), path);
}

void apply_override(Config& cfg, const std::string& assignment) {
  auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    throw Error("--set '" + assignment + "': expected section.key=value, e.g. --set train.steps=20");
  std::string name = assignment.substr(0, eq), value = assignment.substr(eq + 1);
  const Key* key = find_key(name);
  if (!key) throw Error("--set: unknown config key '" + name + "'" + known_keys_hint(name));
  // Parse the value as a TOML value; bare words for string keys need no quotes.
  std::string doc = "v = " + value;
  toml::table t;
  bool parsed = true;
  try {
    t = toml::parse(doc);
  } catch (const toml::parse_error&) {
    parsed = false;
  }
  if (!parsed || !t.contains("v")) {
    if (key->kind != Kind::text)
      throw Error("--set " + name + ": '" + value + "' is not " + kind_name(key->kind) + " (" + key->doc + ")");
    *static_cast<std::string*>(key->field(cfg)) = value;
    return;
  }
  if (key->kind == Kind::text && !t["v"].is_string() && !(name == "moe.layers" && t["v"].is_array())) {
    *static_cast<std::string*>(key->field(cfg)) = value;
    return;
  }
  set_from_toml(cfg, *key, *t.get("v"), "--set");
}

std::vector<bool> Config::moe_layer_mask() const {
  std::vector<bool> mask(size_t(std::max<int64_t>(model.layers, 0)), false);
  if (!moe.enabled() || moe.layers == "none") return mask;
  if (moe.layers == "all" || moe.layers.empty()) {
    mask.assign(mask.size(), true);
    return mask;
  }
  std::stringstream ss(moe.layers);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t used = 0;
    long v = -1;
    try {
      v = std::stol(item, &used);
    } catch (...) {
      used = 0;
    }
    while (used < item.size() && item[used] == ' ') ++used;
    if (used != item.size() || item.empty())
      invalid("moe.layers", "= \"" + moe.layers + "\" has a bad entry '" + item + "'",
              "use all, none, or a comma list of layer indices such as \"0,2\"");
    if (v < 0 || v >= model.layers)
      invalid("moe.layers", "names layer " + std::to_string(v) + " but model.layers = " + std::to_string(model.layers),
              "use indices 0.." + std::to_string(model.layers - 1));
    mask[size_t(v)] = true;
  }
  return mask;
}

std::vector<int64_t> Config::layer_windows(int64_t seq_len) const {
  std::vector<int64_t> w(size_t(model.layers), 0);
  const std::string& pat = model.window_pattern;
  for (int64_t i = 0; i + 1 < model.layers; ++i)
    if (pat[size_t(i) % pat.size()] == 'S') w[size_t(i)] = seq_len / 2;
  return w;
}

int64_t Config::expert_capacity(int64_t tokens) const {
  if (moe.dispatch != "capacity" || !moe.enabled() || !(moe.capacity_factor > 0)) return 0;
  // The seed's rule, in its order of operations: max(1, ceil(T * k / E * cf)).
  const double c = std::ceil(double(tokens * moe.top_k) / double(moe.experts) * moe.capacity_factor);
  return std::max<int64_t>(1, int64_t(c));
}

int64_t Config::grad_accum_steps() const {
  if (train.total_batch_tokens <= 0) return train.grad_accum;
  const int64_t micro = train.batch_size * train.seq_len;
  return micro > 0 ? train.total_batch_tokens / micro : train.grad_accum;
}

Fp8Recipe fp8_recipe(const Config& cfg) {
  Fp8Recipe r;
  if (cfg.fp8.recipe == "rowwise") r.scaling = Fp8Scaling::rowwise;
  else if (cfg.fp8.recipe == "blockwise") r.scaling = Fp8Scaling::blockwise;
  else r.scaling = Fp8Scaling::tensorwise;
  const bool fp8 = cfg.precision == "fp8";
  r.dense = fp8 && cfg.fp8.dense_layers();
  r.experts = fp8 && cfg.fp8.expert_layers();
  r.head = fp8 && cfg.fp8.head;
  r.grad_format = cfg.fp8.grad_format == "e4m3" ? DType::e4m3 : DType::e5m2;
  return r;
}

void validate_config(const Config& c) {
  // Each real key's own range first (finite, and the range on its line of the key table), so a
  // NaN or an out-of-range value is named by its key rather than surfacing later as a diverged loss.
  for (const Key& k : keys()) check_range(c, k, "");
  auto positive = [](const std::string& k, int64_t v) {
    if (v <= 0) invalid(k, "= " + std::to_string(v) + " must be positive", "set it to 1 or more");
  };
  positive("model.d_model", c.model.d_model);
  positive("model.layers", c.model.layers);
  positive("model.head_dim", c.model.head_dim);
  positive("model.vocab", c.model.vocab);
  positive("model.max_seq", c.model.max_seq);
  positive("train.steps", c.train.steps);
  positive("train.batch_size", c.train.batch_size);
  positive("train.seq_len", c.train.seq_len);
  positive("train.grad_accum", c.train.grad_accum);
  positive("train.eval_batches", c.train.eval_batches);
  if (c.model.d_model % c.model.head_dim != 0)
    invalid("model.d_model", "= " + std::to_string(c.model.d_model) + " is not divisible by model.head_dim = " +
                                 std::to_string(c.model.head_dim),
            "choose d_model as a multiple of head_dim");
  if (c.model.head_dim % 2 != 0)
    invalid("model.head_dim", "= " + std::to_string(c.model.head_dim) + " must be even for rotary embeddings",
            "use an even head_dim such as 64");
  if (c.model.kv_heads < 0 || (c.model.kv_heads > 0 && c.model.heads() % c.model.kv_heads != 0))
    invalid("model.kv_heads", "= " + std::to_string(c.model.kv_heads) + " must divide the " +
                                  std::to_string(c.model.heads()) + " query heads",
            "use 0 (one per query head) or a divisor of d_model / head_dim");
  if (c.model.window_pattern.empty() || c.model.window_pattern.find_first_not_of("SL") != std::string::npos)
    invalid("model.window_pattern", "= \"" + c.model.window_pattern + "\" must be a non-empty string of S and L",
            "use \"L\" (full context everywhere) or a pattern such as \"SSSL\"");
  if (c.train.seq_len > c.model.max_seq)
    invalid("train.seq_len", "= " + std::to_string(c.train.seq_len) + " is longer than the rotary table (model.max_seq = " +
                                 std::to_string(c.model.max_seq) + ")",
            "raise model.max_seq or shorten train.seq_len");
  if (c.model.mlp_hidden < 0) invalid("model.mlp_hidden", "is negative", "use 0 for 4 * d_model or a positive width");
  if (c.moe.experts < 0) invalid("moe.experts", "is negative", "use 0 for a dense model or the number of experts");
  if (c.moe.enabled()) {
    positive("moe.top_k", c.moe.top_k);
    positive("moe.expert_hidden", c.moe.expert_hidden);
    if (c.moe.top_k > c.moe.experts)
      invalid("moe.top_k", "= " + std::to_string(c.moe.top_k) + " exceeds moe.experts = " + std::to_string(c.moe.experts),
              "set moe.top_k <= moe.experts");
    if (c.moe.dispatch != "dropless" && c.moe.dispatch != "capacity")
      invalid("moe.dispatch", "= \"" + c.moe.dispatch + "\" is not a dispatch mode", "use dropless or capacity");
    if (c.moe.balance_rule != "switch" && c.moe.balance_rule != "seed")
      invalid("moe.balance_rule", "= \"" + c.moe.balance_rule + "\" is not a balance rule", "use switch or seed");
    if (c.moe.drop_order != "rank" && c.moe.drop_order != "token")
      invalid("moe.drop_order", "= \"" + c.moe.drop_order + "\" is not a drop order", "use rank or token");
    if (c.moe.router_init != "uniform" && c.moe.router_init != "zero")
      invalid("moe.router_init", "= \"" + c.moe.router_init + "\" is not a router init", "use uniform or zero");
    if (c.moe.shared_hidden < 0) invalid("moe.shared_hidden", "is negative", "use 0 for expert_hidden");
    if (c.moe.shared_experts < 0) invalid("moe.shared_experts", "is negative", "use 0 for no shared expert");
    if (c.moe.shared_expert && c.moe.shared_experts > 1)
      invalid("moe.shared_experts", "= " + std::to_string(c.moe.shared_experts) +
                                         " contradicts moe.shared_expert = true (its alias for shared_experts = 1)",
              "set moe.shared_experts alone and drop moe.shared_expert");
    if (c.moe.score != "softmax" && c.moe.score != "sigmoid")
      invalid("moe.score", "= \"" + c.moe.score + "\" is not a router score", "use softmax or sigmoid");
    if (c.moe.balance != "aux_loss" && c.moe.balance != "aux_free" && c.moe.balance != "none")
      invalid("moe.balance", "= \"" + c.moe.balance + "\" is not a balance method", "use aux_loss, aux_free or none");
    if (c.moe.balance_scope != "micro_batch" && c.moe.balance_scope != "sequence" && c.moe.balance_scope != "global_batch")
      invalid("moe.balance_scope", "= \"" + c.moe.balance_scope + "\" is not a balance scope",
              "use micro_batch, sequence or global_batch");
    if (c.moe.balance == "aux_free" && c.moe.balance_scope == "global_batch")
      invalid("moe.balance_scope", "= \"global_batch\" has no loss to scope under moe.balance = \"aux_free\" (its only "
                                   "aux loss is the complementary sequence-wise one)",
              "use balance_scope = sequence for that loss, micro_batch for none, or balance = aux_loss");
    positive("moe.groups", c.moe.groups);
    positive("moe.topk_groups", c.moe.topk_groups);
    if (c.moe.experts % c.moe.groups != 0)
      invalid("moe.groups", "= " + std::to_string(c.moe.groups) + " does not divide moe.experts = " +
                                std::to_string(c.moe.experts),
              "set moe.groups to a divisor of moe.experts (1 turns group-limited routing off)");
    if (c.moe.topk_groups > c.moe.groups)
      invalid("moe.topk_groups", "= " + std::to_string(c.moe.topk_groups) + " exceeds moe.groups = " +
                                     std::to_string(c.moe.groups),
              "set moe.topk_groups <= moe.groups");
    if (c.moe.groups > 1 && c.moe.top_k > c.moe.topk_groups * (c.moe.experts / c.moe.groups))
      invalid("moe.topk_groups", "= " + std::to_string(c.moe.topk_groups) + " keeps " +
                                     std::to_string(c.moe.topk_groups * (c.moe.experts / c.moe.groups)) +
                                     " experts, fewer than moe.top_k = " + std::to_string(c.moe.top_k),
              "raise moe.topk_groups to at least ceil(top_k / (experts / groups)) or lower moe.top_k");
    (void)c.moe_layer_mask();  // validates moe.layers
  }
  if (c.train.warmup_ratio + c.train.warmdown_ratio > 1)
    invalid("train.warmup_ratio", "+ train.warmdown_ratio exceed 1", "make the two fractions sum to at most 1");
  if (c.train.threads < 0) invalid("train.threads", "is negative", "use 0 for all cores");
  if (c.device != "auto" && c.device != "cpu" && c.device != "cuda")
    invalid("device", "= \"" + c.device + "\" is not a device", "use auto, cpu or cuda");
  if (c.precision != "auto" && c.precision != "f32" && c.precision != "bf16" && c.precision != "fp8")
    invalid("precision", "= \"" + c.precision + "\" is not a precision", "use auto, f32, bf16 or fp8");
  if (c.fp8.recipe != "tensorwise" && c.fp8.recipe != "rowwise" && c.fp8.recipe != "blockwise")
    invalid("fp8.recipe", "= \"" + c.fp8.recipe + "\" is not an FP8 recipe", "use tensorwise, rowwise or blockwise");
  if (c.fp8.layers != "dense" && c.fp8.layers != "experts" && c.fp8.layers != "all")
    invalid("fp8.layers", "= \"" + c.fp8.layers + "\" is not a layer set", "use dense, experts or all");
  if (c.parallel.expert < 1) invalid("parallel.expert", "= " + std::to_string(c.parallel.expert) + " is below 1", "use 1 (no expert parallelism) or the number of ranks");
  if (c.parallel.expert > 1) {
    const std::string p = "= " + std::to_string(c.parallel.expert);
    if (c.moe.experts == 0 || c.moe.experts % c.parallel.expert != 0)
      invalid("parallel.expert", p + " does not divide moe.experts = " + std::to_string(c.moe.experts),
              "use a divisor of moe.experts");
    if (c.precision == "fp8" && c.fp8.expert_layers())
      invalid("parallel.expert", p + " with FP8 experts is not built yet", "set fp8.layers = \"dense\" or parallel.expert = 1");
  }
  if (c.optim.shard_state) {
    if (c.parallel.expert > 1)
      invalid("optim.shard_state", "= true with parallel.expert > 1 is not built yet", "set optim.shard_state = false");
    if (c.precision == "fp8")
      invalid("optim.shard_state", "= true with precision = fp8 is not built yet (the weights' amax is raised by the update)",
              "set optim.shard_state = false");
  }
  if (c.fp8.grad_format != "e5m2" && c.fp8.grad_format != "e4m3")
    invalid("fp8.grad_format", "= \"" + c.fp8.grad_format + "\" is not an FP8 format", "use e5m2 or e4m3");
  if (c.precision == "fp8" && c.fp8.expert_layers()) {
    if (!c.moe.enabled())
      invalid("fp8.layers", "= " + c.fp8.layers + " puts experts in FP8 but the model has none (moe.experts = 0)",
              "use fp8.layers = dense");
    // The GPU's blockwise grouped GEMM gives each output tile whole 128-row weight blocks: both
    // expert GEMM widths (hidden forward, d_model backward) must be multiples of 128.
    if (c.device == "cuda" && c.fp8.recipe == "blockwise")
      for (auto [key, v] : {std::pair{"moe.expert_hidden", int64_t(c.moe.expert_hidden)}, {"model.d_model", int64_t(c.model.d_model)}})
        if (v % 128 != 0)
          invalid(key, "= " + std::to_string(v) + " is not a multiple of 128, which the GPU's blockwise FP8 expert GEMMs need",
                  "choose a multiple of 128, or use fp8.recipe = tensorwise | rowwise, or fp8.layers = dense");
  }
  if (c.precision == "fp8" && c.device == "cuda") {
    // FP8 tensor cores read 16-byte aligned K-major rows: every dimension of an FP8 GEMM is a
    // multiple of 16 (tokens, widths, vocabulary).
    auto mult16 = [&](const std::string& key, int64_t v, const std::string& what) {
      if (v % 16 != 0)
        invalid(key, "= " + std::to_string(v) + " makes " + what + " that is not a multiple of 16, which FP8 GEMMs on the GPU need",
                "choose a multiple of 16 or use precision = bf16");
    };
    mult16("model.d_model", c.model.d_model, "a GEMM dimension");
    mult16("model.kv_heads", c.model.kv_heads_resolved() * c.model.head_dim, "a key/value width");
    mult16("model.mlp_hidden", c.model.mlp_hidden_resolved(), "a dense MLP width");
    if (c.moe.shared_count() > 0) mult16("moe.shared_hidden", c.moe.shared_hidden > 0 ? c.moe.shared_hidden : c.moe.expert_hidden, "a shared expert width");
    if (c.fp8.head) mult16("model.vocab", c.model.vocab, "an lm_head width");
    if (c.fp8.expert_layers() && c.moe.enabled()) mult16("moe.expert_hidden", c.moe.expert_hidden, "an expert width");
    mult16("train.batch_size", c.train.batch_size * c.train.seq_len, "a token count (batch_size * seq_len)");
  }
  if (c.exec != "graph" && c.exec != "eager")
    invalid("exec", "= \"" + c.exec + "\" is not an execution mode", "use graph or eager");
  if (c.data.source != "bytes" && c.data.source != "shards" && c.data.source != "corpus")
    invalid("data.source", "= \"" + c.data.source + "\" is not a data source", "use bytes, shards or corpus");
  if (c.data.source == "corpus" && c.data.vocab_size < 512)
    invalid("data.vocab_size", "= " + std::to_string(c.data.vocab_size) + " is too small for a BPE vocabulary",
            "use 512 or more (4096 for the tiny configs)");
  if (c.data.source == "corpus" && c.data.vocab_size > c.model.vocab)
    invalid("data.vocab_size", "= " + std::to_string(c.data.vocab_size) + " exceeds model.vocab = " +
                                   std::to_string(c.model.vocab),
            "raise model.vocab to at least data.vocab_size");
  if (c.data.source == "shards" && c.data.dir.empty())
    invalid("data.dir", "is empty but data.source = shards", "point data.dir at a folder written by `moelab data prepare`");
  if (c.optim.matrix_optimizer != "muon" && c.optim.matrix_optimizer != "adamw")
    invalid("optim.matrix_optimizer", "= \"" + c.optim.matrix_optimizer + "\" is not an optimizer", "use muon or adamw");
  for (auto [k, v] : {std::pair{"train.eval_every", c.train.eval_every}, {"train.checkpoint_every", c.train.checkpoint_every},
                      {"train.keep_checkpoints", c.train.keep_checkpoints}})
    if (v < 0) invalid(k, "= " + std::to_string(v) + " must not be negative", "use 0 for the default or a step count");
  if (c.optim.muon_ns_steps < 1) invalid("optim.muon_ns_steps", "must be at least 1", "use 5 as nanochat does");
  if (c.optim.muon_variant != "muon" && c.optim.muon_variant != "normuon")
    invalid("optim.muon_variant", "= \"" + c.optim.muon_variant + "\" is not a Muon variant", "use muon or normuon");
  if (c.optim.muon_variant == "normuon" && c.optim.muon_ns_steps > 5)
    invalid("optim.muon_ns_steps", "= " + std::to_string(c.optim.muon_ns_steps) +
                                       " exceeds the 5 Polar Express coefficient sets of optim.muon_variant = normuon",
            "use at most 5 steps with normuon");
  if (c.optim.weight_decay_schedule != "constant" && c.optim.weight_decay_schedule != "linear")
    invalid("optim.weight_decay_schedule", "= \"" + c.optim.weight_decay_schedule + "\" is not a schedule",
            "use constant or linear");
  if (c.optim.cautious_weight_decay && c.optim.muon_variant != "normuon")
    invalid("optim.cautious_weight_decay", "needs optim.muon_variant = normuon (it is part of that update)",
            "set optim.muon_variant = normuon or turn cautious_weight_decay off");
  if (c.optim.weight_decay_ref_batch < 0)
    invalid("optim.weight_decay_ref_batch", "is negative", "use 0 (no scaling) or a token count");
  if (c.train.total_batch_tokens < 0)
    invalid("train.total_batch_tokens", "is negative", "use 0 (batch_size * seq_len * grad_accum) or a token count");
  if (c.train.total_batch_tokens > 0) {
    const int64_t micro = c.train.batch_size * c.train.seq_len;
    if (c.train.total_batch_tokens % micro != 0)
      invalid("train.total_batch_tokens", "= " + std::to_string(c.train.total_batch_tokens) +
                                              " is not a multiple of train.batch_size * train.seq_len = " +
                                              std::to_string(micro),
              "make it a multiple of " + std::to_string(micro) + " (gradient accumulation follows from it)");
  }
  if (c.model.value_embeddings && (c.model.ve_gate_channels < 1 || c.model.ve_gate_channels > c.model.d_model))
    invalid("model.ve_gate_channels", "= " + std::to_string(c.model.ve_gate_channels) + " must be in [1, model.d_model]",
            "use 32 as the seed does (or at most d_model)");
}

std::string config_to_toml(const Config& cfg) {
  std::ostringstream o;
  std::string section = "";
  for (auto& k : keys()) {
    auto dot = k.name.find('.');
    if (dot == std::string::npos) o << k.name << " = " << value_string(cfg, k, true) << "\n";
  }
  for (auto& k : keys()) {
    auto dot = k.name.find('.');
    if (dot == std::string::npos) continue;
    std::string s = k.name.substr(0, dot);
    if (s != section) {
      o << "\n[" << s << "]\n";
      section = s;
    }
    o << k.name.substr(dot + 1) << " = " << value_string(cfg, k, true) << "\n";
  }
  return o.str();
}

std::string config_reference() {
  std::ostringstream o;
  Config defaults;
  for (auto& k : keys())
    o << "  " << k.name << " = " << value_string(defaults, k, true) << "\n      " << k.doc
      << (k.kind == Kind::real ? " (in " + k.range.text() + ")" : "") << "\n";
  return o.str();
}

std::vector<std::pair<std::string, std::string>> config_flat(const Config& cfg) {
  std::vector<std::pair<std::string, std::string>> out;
  for (auto& k : keys()) out.emplace_back(k.name, value_string(cfg, k, false));
  return out;
}

}  // namespace moelab
