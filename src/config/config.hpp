// Run configuration: model shape, MoE routing, training, optimizer, data and execution choices.
// One table of keys (config.cpp) drives everything: TOML loading, `--set section.key=value`
// overrides, unknown-key and type errors that name the key, validation, and the resolved
// config.toml written into each run folder. Adding a knob means adding one line to that table.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/fp8_recipe.hpp"

namespace moelab {

struct ModelConfig {
  int64_t d_model = 768;
  int64_t layers = 12;
  int64_t head_dim = 64;
  int64_t kv_heads = 0;    // 0: as many as query heads; otherwise grouped-query attention
  // Attention span per layer, tiled over the layers as nanochat does: S = a sliding window of
  // seq_len / 2 keys, L = full causal context; the last layer is always L.
  std::string window_pattern = "L";
  int64_t vocab = 32768;
  int64_t mlp_hidden = 0;  // dense MLP width; 0: 4 * d_model
  int64_t max_seq = 2048;  // rotary table length; train.seq_len must not exceed it
  double rope_base = 10000.0;
  double softcap = 15.0;
  double init_scale = 1.0;  // multiplies nanochat's init std
  // The seed's (nanochat's) extras, off by default:
  bool value_embeddings = false;  // gated value embeddings on alternating layers (last included)
  int64_t ve_gate_channels = 32;  // leading channels of the attention input the gate reads
  bool scalar_lambdas = false;    // x = resid_lambda[i] * x + x0_lambda[i] * x0 before each block

  int64_t heads() const { return d_model / head_dim; }
  int64_t kv_heads_resolved() const { return kv_heads > 0 ? kv_heads : heads(); }
  int64_t mlp_hidden_resolved() const { return mlp_hidden > 0 ? mlp_hidden : 4 * d_model; }
};

struct MoEConfig {
  int64_t experts = 8;  // 0: dense model
  int64_t top_k = 2;
  int64_t expert_hidden = 1536;
  std::string layers = "all";  // "all", "none", or a comma list of layer indices ("1,3,5")
  bool shared_expert = false;
  int64_t shared_hidden = 0;  // 0: expert_hidden
  std::string dispatch = "dropless";  // dropless | capacity
  double capacity_factor = 1.25;
  double balance_coef = 0.01;
  std::string balance_rule = "switch";  // switch: f = count / (T k), logged with coef | seed: f = count / T, logged without
  std::string drop_order = "rank";      // rank: first choices first | token: flat token-major (the seed's)
  std::string router_init = "uniform";  // uniform (as c_fc) | zero (the seed's)
  // Routing lab (each default is the router as it always was: softmax top-k, renormalized gates).
  std::string score = "softmax";        // softmax | sigmoid (DeepSeek-V3's affinities)
  bool norm_topk = true;                // gates = chosen scores over their sum (else the raw scores)
  double route_scale = 1.0;             // constant factor on the gates
  std::string balance = "aux_loss";     // aux_loss | aux_free (per-expert score bias) | none
  double bias_update_rate = 0.001;      // aux_free: bias_e += rate * sign(mean load - load_e) per step
  std::string balance_scope = "micro_batch";  // micro_batch | sequence | global_batch (for the aux loss)
  double z_loss_coef = 0.0;             // ST-MoE router z-loss weight
  int64_t shared_experts = 0;           // N shared experts of shared_hidden each (shared_expert = true: 1)
  int64_t groups = 1, topk_groups = 1;  // group-limited routing (DeepSeek-V3)

  bool enabled() const { return experts > 0; }
  // Shared experts in effect: shared_experts, or 1 for the alias shared_expert = true.
  int64_t shared_count() const { return shared_experts > 0 ? shared_experts : (shared_expert ? 1 : 0); }
};

struct TrainConfig {
  int64_t steps = 140;
  int64_t batch_size = 16;  // rows per micro-batch
  int64_t seq_len = 1024;
  int64_t grad_accum = 1;
  int64_t total_batch_tokens = 0;  // > 0: tokens per optimizer step; grad_accum follows from it
  int64_t seed = 42;
  int64_t eval_every = 0;  // 0: only at the end
  int64_t eval_batches = 4;
  int64_t checkpoint_every = 0;  // 0: only at the end
  std::string resume;            // "" | "auto" (latest in the run folder) | path to a checkpoint
  double warmup_ratio = 0.0;
  double warmdown_ratio = 0.2;
  double final_lr_frac = 0.0;
  double peak_flops = 0;  // per-device peak for MFU; 0: by card name (GPU) or none (CPU)
  int64_t threads = 0;    // CPU threads; 0: all cores
  bool save_final = true;
  int64_t keep_checkpoints = 0;  // newest checkpoints kept in the run folder; 0: all
  bool tensorboard = false;      // also write the scalars as TensorBoard event files in the run folder
};

struct OptimConfig {
  std::string matrix_optimizer = "muon";  // muon | adamw: what updates the matrix group
  double matrix_lr = 0.02;      // Muon
  double matrix_adamw_lr = 0.002;  // matrix group when matrix_optimizer = adamw
  double embedding_lr = 0.2;    // AdamW
  double unembedding_lr = 0.004;  // AdamW (lm_head)
  double weight_decay = 0.0;
  double adamw_weight_decay = -1;  // AdamW groups' decay; < 0: optim.weight_decay
  double adam_beta1 = 0.8;
  double adam_beta2 = 0.95;
  double adam_eps = 1e-10;
  bool scale_lr_by_dmodel = true;  // AdamW lrs * (d_model / 768)^-0.5, as nanochat
  double muon_momentum = 0.95;
  double muon_momentum_start = 0.85;
  int64_t muon_momentum_warmup = 300;
  int64_t muon_ns_steps = 5;
  bool muon_nesterov = true;
  std::string muon_variant = "muon";  // muon (Newton-Schulz 3.4445/-4.7750/2.0315) | normuon (Polar Express + variance reduction)
  double muon_beta2 = 0.95;           // normuon: EMA of the per-row/column second moment
  bool cautious_weight_decay = false; // Muon decays only where update and weight agree in sign
  std::string weight_decay_schedule = "constant";  // constant | linear (to 0 at the last step)
  int64_t weight_decay_ref_batch = 0;    // > 0: Muon wd *= sqrt(tokens per step / this)
  double weight_decay_ref_horizon = 0;   // > 0: Muon wd *= this / (tokens per step * steps)
  double scalar_lr = 0.5;             // AdamW: x0 lambdas at scalar_lr, resid lambdas at scalar_lr * 0.01
  double value_embedding_lr = 0.2;    // AdamW: value embeddings (d_model-scaled like the embedding)
  bool shard_state = false;  // data parallel: each rank keeps and updates only its parameters' optimizer state
};

struct DataConfig {
  std::string source = "bytes";  // bytes (raw bytes of data.text, vocab 256) | shards | corpus
  std::string text;              // bytes mode: a text file; "" = the embedded default corpus
  std::string dir;               // shards: folder from `moelab data prepare`; corpus: cache folder
  int64_t vocab_size = 4096;     // corpus mode: BPE vocabulary trained on the embedded corpus
  std::string tokenizer;         // shards mode: tokenizer file; "" = the one recorded in dir
  double val_fraction = 0.05;    // bytes mode: tail of the text held out for validation
};

// FP8 training recipe (precision = fp8). Which GEMMs run in FP8 and how their operands are
// scaled; router, norms, softmax and the loss stay in bf16/f32 whatever the recipe.
struct Fp8Config {
  // tensorwise: one scale per tensor; rowwise: one per row of each K-major operand (outer
  // vectors); blockwise: 1x128 tiles for activations and gradients, 128x128 blocks for weights.
  std::string recipe = "tensorwise";
  std::string layers = "dense";  // dense (attention + dense MLPs) | experts | all
  bool head = true;              // lm_head in FP8
  std::string grad_format = "e5m2";  // format of the backward's gradient operands: e5m2 | e4m3

  bool dense_layers() const { return layers == "dense" || layers == "all"; }
  bool expert_layers() const { return layers == "experts" || layers == "all"; }
};

// How the ranks of a multi-process job split the model.
struct ParallelConfig {
  // Expert parallel: P ranks each hold moe.experts / P experts of every MoE layer, and tokens go
  // to their experts' ranks and back by all-to-all. 1: every rank holds every expert.
  int64_t expert = 1;
};

struct Config {
  ModelConfig model;
  MoEConfig moe;
  TrainConfig train;
  OptimConfig optim;
  DataConfig data;
  Fp8Config fp8;
  ParallelConfig parallel;
  std::string device = "auto";     // auto | cpu | cuda
  // auto (f32 on cpu, bf16 on cuda) | f32 | bf16 | fp8 (the [fp8] recipe's GEMMs in FP8, the rest
  // as auto; on the CPU the FP8 GEMMs are emulated exactly)
  std::string precision = "auto";
  std::string exec = "graph";      // graph | eager (CUDA only)

  // Layers whose MLP is a MoE (resolved from moe.layers).
  std::vector<bool> moe_layer_mask() const;
  // Sliding window of each layer for sequences of seq_len tokens (0: full causal), from
  // model.window_pattern: query t sees keys t - window .. t.
  std::vector<int64_t> layer_windows(int64_t seq_len) const;
  // Capacity per expert for a micro-batch of `tokens` tokens (0 in dropless mode):
  // max(1, ceil(tokens * top_k / experts * capacity_factor)); capacity_factor <= 0 is dropless.
  int64_t expert_capacity(int64_t tokens) const;
  // Micro-batches per optimizer step: train.total_batch_tokens / (batch_size * seq_len) when set,
  // else train.grad_accum (validate_config refuses a total that does not divide).
  int64_t grad_accum_steps() const;
};

// Loading and overrides. Errors are moelab::Error naming the key (and file) and the fix.
Config load_config(const std::string& path);
Config config_from_toml_text(const std::string& text, const std::string& origin);
// Apply "section.key=value" (value parsed by the key's type).
void apply_override(Config& cfg, const std::string& assignment);
// The FP8 recipe the run trains with (every flag off unless precision = fp8): the one place
// that reads fp8.recipe, fp8.layers, fp8.head and fp8.grad_format.
Fp8Recipe fp8_recipe(const Config& cfg);
// Check cross-field consistency (shapes, ranges, choices). Throws on the first problem.
void validate_config(const Config& cfg);
// The resolved config as TOML, every key present.
std::string config_to_toml(const Config& cfg);
// All known keys with their documentation, for `moelab train --help-config`.
std::string config_reference();
// Flat "section.key" -> value string map, for reports comparing runs.
std::vector<std::pair<std::string, std::string>> config_flat(const Config& cfg);

}  // namespace moelab
