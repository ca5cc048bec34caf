// The training loop. Structure: setup (folder, backend, data, model, optimizer, resume), then per
// step: zero grads, micro-batches, optimizer, statistics read-back (the step's one host sync),
// logging, validation and checkpoints. Any exception marks the run failed before it propagates.
#include "train/trainer.hpp"

#include <atomic>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <optional>

#include "comm/communicator.hpp"
#include "core/error.hpp"
#include "core/folder_lock.hpp"
#include "data/loader.hpp"
#include "model/gpt.hpp"
#include "optim/lr_schedule.hpp"
#include "optim/optimizer.hpp"
#include "train/checkpoint.hpp"
#include "train/device_select.hpp"
#include "train/memory_estimate.hpp"
#include "train/run_files.hpp"
#include "core/tensorboard.hpp"
#include "train/step_runner.hpp"

namespace moelab {
namespace fs = std::filesystem;

namespace {

// The number of ranks of the job that wrote a checkpoint (a trainer scalar of CheckpointMeta): a
// resume by a job of another size is refused. Checkpoints without it predate the check.
constexpr const char* kWorldSizeScalar = "world_size";

std::atomic<int> g_stop_signal{0};
void on_stop_signal(int sig) { g_stop_signal.store(sig); }

int64_t count_valid(const std::vector<int32_t>& targets) {
  int64_t n = 0;
  for (auto t : targets) n += t >= 0;
  return n;
}

struct ValResult {
  double loss = 0, bpb = 0;
};

ValResult evaluate(Backend& be, GptMoE& model, DataLoader& loader, const Config& cfg, Tensor& tokens,
                   Tensor& targets, Communicator& comm) {
  loader.reset_val();
  const auto& token_bytes = loader.token_bytes();
  double nats = 0, bytes = 0;
  int64_t count = 0;
  for (int64_t b = 0; b < cfg.train.eval_batches; ++b) {
    Batch batch = loader.next_val(cfg.train.batch_size, cfg.train.seq_len);
    be.write_i32(tokens, batch.inputs);
    be.write_i32(targets, batch.targets);
    model.forward_eval(tokens, targets);
    auto losses = be.read(model.losses());
    for (size_t i = 0; i < losses.size(); ++i) {
      int32_t t = batch.targets[i];
      if (t < 0) continue;
      nats += losses[i];
      ++count;
      int32_t nb = size_t(t) < token_bytes.size() ? token_bytes[size_t(t)] : 1;
      bytes += nb;
    }
  }
  // Each rank evaluated its own rows: the sums are over all of them.
  std::vector<double> sums = {nats, bytes, double(count)};
  Tensor t = borrow_host(sums);
  comm.all_reduce_sum(t);
  nats = sums[0];
  bytes = sums[1];
  count = int64_t(sums[2]);
  ValResult r;
  r.loss = count ? nats / double(count) : 0.0;
  r.bpb = bytes > 0 ? nats / (std::log(2.0) * bytes) : 0.0;
  return r;
}

// The device as the header and status.json name it: the backend (with its master dtype), the
// FP8 recipe where precision = fp8 (the backend's dtype alone would say f32 on the CPU), and the
// job's ranks.
std::string run_device_description(const Backend& be, const Config& cfg, const Communicator& comm) {
  std::string d = be.name();
  if (cfg.precision == "fp8")
    d += " + fp8 " + cfg.fp8.recipe + " GEMMs (" + cfg.fp8.layers + (cfg.fp8.head ? ", head" : "") + ")" +
         (be.device() == Device::cpu ? " emulated" : "");
  if (comm.world() > 1) d += " x " + comm.name();
  return d;
}

// The files a run writes into its folder; --force moves them aside together.
const char* const kRunEntries[] = {"config.toml", "metrics.jsonl", "status.json", "checkpoints",
                                   "model.safetensors", "optimizer.safetensors", "config.json", "check_batch.json"};

// " (status completed, step 11)" from status.json, or "".
std::string describe_existing(const std::string& run_dir) {
  std::ifstream in(fs::path(run_dir) / "status.json");
  auto j = nlohmann::json::parse(in, nullptr, false);
  if (!j.is_object() || !j.contains("status") || !j["status"].is_string()) return "";
  std::string out = " (status " + j["status"].get<std::string>();
  if (j.contains("step") && j["step"].is_number_integer()) out += ", step " + std::to_string(j["step"].get<int64_t>());
  return out + ")";
}

// Moves the run's files into RUN_DIR.oldK/ (first free K) and returns that folder.
std::string move_run_aside(const std::string& run_dir) {
  std::string base = fs::path(run_dir).lexically_normal().string();
  while (base.size() > 1 && base.back() == '/') base.pop_back();
  for (int k = 1;; ++k) {
    fs::path to = base + ".old" + std::to_string(k);
    if (fs::exists(to)) continue;
    fs::create_directories(to);
    for (const char* e : kRunEntries) {
      std::error_code ec;
      if (!fs::exists(fs::path(run_dir) / e)) continue;
      fs::rename(fs::path(run_dir) / e, to / e, ec);
      if (ec) throw Error("--force: cannot move " + (fs::path(run_dir) / e).string() + " to " + to.string() + ": " + ec.message());
    }
    return to.string();
  }
}

// "moe.top_k: 2 -> 1" for each key whose value differs between the checkpoint's config and this run's.
std::vector<std::string> config_changes(const std::string& stored, const Config& cfg) {
  std::vector<std::string> out;
  if (stored.empty()) return out;
  try {
    auto before = config_flat(config_from_toml_text(stored, "checkpoint config"));
    auto now = config_flat(cfg);
    std::map<std::string, std::string> now_map(now.begin(), now.end());
    for (const auto& [k, v] : before) {
      auto it = now_map.find(k);
      if (k != "train.resume" && it != now_map.end() && it->second != v) out.push_back(k + ": " + v + " -> " + it->second);
    }
  } catch (const std::exception&) {
    // A config this version cannot read: the tensor checks still guard the shapes.
  }
  return out;
}

// config.json of the model export: the format, every model.* and moe.* key as the resolved config
// writes it (so a reader can refuse options it does not know), and the derived shapes.
std::string export_config_json(const Config& cfg, const Backend& be) {
  nlohmann::json keys = nlohmann::json::object();
  for (const auto& [k, v] : config_flat(cfg))
    if (k.rfind("model.", 0) == 0 || k.rfind("moe.", 0) == 0) keys[k] = v;
  std::vector<int64_t> moe_layers;
  auto mask = cfg.moe_layer_mask();
  for (size_t i = 0; i < mask.size(); ++i)
    if (mask[i]) moe_layers.push_back(int64_t(i));
  nlohmann::json j = {{"format", "moelab-model/1"},
                      {"config", keys},
                      {"heads", cfg.model.heads()},
                      {"kv_heads", cfg.model.kv_heads_resolved()},
                      {"mlp_hidden", cfg.model.mlp_hidden_resolved()},
                      {"moe_layers", moe_layers},
                      {"windows", cfg.layer_windows(cfg.train.seq_len)},
                      {"compute_dtype", dtype_name(be.act_dtype())},
                      {"norm_eps", double(Backend::kNormEps)}};
  return j.dump(1) + "\n";
}

}  // namespace

bool folder_holds_run(const std::string& run_dir) {
  const fs::path dir(run_dir);
  // What a run leaves that is worth keeping: a checkpoint, the exported model, a logged step.
  // A folder whose only run stopped before its first step (config.toml and a failed status.json
  // alone) holds nothing to lose, so a corrected rerun may start there without --force.
  std::error_code ec;
  if (fs::exists(dir / "model.safetensors")) return true;
  if (fs::is_directory(dir / "checkpoints", ec) && !fs::is_empty(dir / "checkpoints", ec)) return true;
  if (fs::exists(dir / "metrics.jsonl")) {
    std::ifstream in(dir / "metrics.jsonl");
    for (std::string line; std::getline(in, line);)
      if (!line.empty()) return true;  // any record: a step, a resume, a validation
  }
  return false;
}

TrainResult run_training(const Config& cfg, const std::string& run_dir, const TrainOptions& options) {
  // 0. The job's ranks (one, unless a launcher started several: data parallel). Rank 0 alone
  // owns the run folder: it takes the lock and writes every file; the others only read it (resume).
  std::unique_ptr<Communicator> comm = make_communicator(launch_env());
  const bool lead = comm->rank() == 0;
  // 1. The folder and its lock; nothing in it changes before the checks below have passed.
  std::optional<FolderLock> lock;
  bool created_folder = false;  // this call made run_dir: a start refused below removes it again
  if (lead) {
    std::error_code ec;
    created_folder = !fs::exists(run_dir);
    fs::create_directories(run_dir, ec);
    if (ec) throw Error("cannot create run folder " + run_dir + ": " + ec.message());
    lock.emplace(FolderLock::acquire(run_dir, "run folder"));
    if (folder_holds_run(run_dir) && cfg.train.resume.empty()) {
      if (!options.force)
        throw Error("run folder " + run_dir + " already holds a run" + describe_existing(run_dir) +
                    "; continue it with --set train.resume=auto, choose another --out, or pass --force to move the old "
                    "run aside");
      std::cout << "--force: moved the earlier run's files to " << move_run_aside(run_dir) << std::endl;
    }
  }
  comm->barrier();  // the other ranks read the folder only once rank 0 has settled it

  RunStatus status;
  status.steps = cfg.train.steps;
  status.started_at = utc_timestamp();

  g_stop_signal.store(0);
  auto old_int = std::signal(SIGINT, on_stop_signal);
  auto old_term = std::signal(SIGTERM, on_stop_signal);
  struct RestoreSignals {
    void (*i)(int);
    void (*t)(int);
    ~RestoreSignals() {
      std::signal(SIGINT, i);
      std::signal(SIGTERM, t);
    }
  } restore{old_int, old_term};

  // 2. Set-up: backend, data, model, optimizer and the checkpoint to resume from. If this fails,
  // nothing has been written: the folder is left as it was (and removed, lock file and all, if
  // this call created it), so the corrected command runs into the same --out.
  TrainResult result;
  int64_t step = 0;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<DataLoader> loader;
  std::unique_ptr<GptMoE> model_ptr;
  std::unique_ptr<Optimizer> optimizer_ptr;
  double ema = 0, total_time_s = 0;
  std::string resumed_from;
  std::vector<std::string> changes;
  try {
    backend = make_backend(cfg);
    status.device = run_device_description(*backend, cfg, *comm);
    status.ranks = comm->world();
    if (comm->world() > 1 && backend->device() != Device::cpu)
      throw Error("data parallel over " + std::to_string(comm->world()) + " ranks runs on CPU ranks for now (" +
                  comm->name() + "); GPU ranks need the NCCL communicator, which is not built yet: set device = \"cpu\"");
    // CPU ranks are this host's processes: all of them must fit its memory.
    if (backend->device() == Device::cpu) check_memory_fits(cfg, comm->world());
    else if (const auto free_bytes = backend->free_device_memory())
      check_device_memory_fits(cfg, double(*free_bytes), backend->name());
    loader = make_loader(cfg.data, uint64_t(cfg.train.seed), comm->rank(), comm->world());
    if (loader->vocab() > cfg.model.vocab)
      throw Error("model.vocab = " + std::to_string(cfg.model.vocab) + " is smaller than the data's vocabulary (" +
                  std::to_string(loader->vocab()) + " ids, " + loader->describe() + "); raise model.vocab");
    if (cfg.parallel.expert > 1 && cfg.parallel.expert != comm->world())
      throw Error("parallel.expert = " + std::to_string(cfg.parallel.expert) + " needs as many ranks, this job has " +
                  std::to_string(comm->world()) + ": run with --nproc " + std::to_string(cfg.parallel.expert) +
                  " (expert groups smaller than the job are not built yet)");
    model_ptr = std::make_unique<GptMoE>(*backend, cfg, cfg.train.batch_size, cfg.train.seq_len,
                                         cfg.parallel.expert > 1 ? comm.get() : nullptr);
    model_ptr->init_weights(uint64_t(cfg.train.seed));
    optimizer_ptr = std::make_unique<Optimizer>(*backend, model_ptr->params(), cfg);

    // Resume: weights, optimizer state, step, data position and the loss EMA. With auto, the
    // newest checkpoint that reads back whole; a damaged newer one is named and passed over.
    if (!cfg.train.resume.empty()) {
      const bool automatic = cfg.train.resume == "auto";
      std::vector<std::string> candidates =
          automatic ? checkpoints_newest_first(run_dir) : std::vector<std::string>{cfg.train.resume};
      std::vector<std::string> unreadable;
      for (const auto& path : candidates) {
        CheckpointMeta meta;
        auto state = optimizer_ptr->state();
        try {
          load_checkpoint(path, *backend, model_ptr->params(), state, meta, config_to_toml(cfg));
        } catch (const CheckpointUnreadable& e) {
          if (!automatic) throw;
          std::cout << "train.resume = auto: passing over " << path << ": " << e.what() << std::endl;
          unreadable.push_back(path);
          continue;
        }
        // The checkpoint's data position and tokens per step belong to the job size that wrote
        // it: resumed by another, each rank would read other rows and the step would hold other
        // tokens, with nothing said. Until checkpoints are resharded, the job must match.
        if (auto it = meta.scalars.find(kWorldSizeScalar); it != meta.scalars.end() && int64_t(it->second) != comm->world())
          throw Error("train.resume: " + path + " was written by a job of " + std::to_string(int64_t(it->second)) +
                      " rank(s) and this job has " + std::to_string(comm->world()) +
                      "; its data position and tokens per step hold only for that many ranks: resume with --nproc " +
                      std::to_string(int64_t(it->second)) +
                      " (resharding a checkpoint to another number of ranks is not built yet)");
        model_ptr->refresh_compute_weights();
        loader->restore(meta.data_state);
        step = meta.step;
        ema = meta.loss_ema;
        total_time_s = meta.train_time_s;
        resumed_from = path;
        changes = config_changes(meta.config_text, cfg);
        break;
      }
      if (resumed_from.empty() && !unreadable.empty())
        throw Error("train.resume = auto: none of the " + std::to_string(unreadable.size()) + " checkpoint(s) in " +
                    run_dir + "/checkpoints reads back whole; restore one, or start again with --force");
      if (candidates.empty())
        std::cout << "train.resume = auto: no checkpoint in " << run_dir << "/checkpoints, starting fresh\n";
      if (!resumed_from.empty())
        std::cout << "resumed from " << resumed_from << " at step " << step
                  << (unreadable.empty() ? "" : " (the newest intact checkpoint)") << "\n";
      for (const auto& c : changes)
        std::cerr << "moelab: warning: resumed with a config change against the checkpoint: " << c << "\n";
    }
  } catch (const std::exception&) {
    if (lead && created_folder) {
      std::error_code ec;
      fs::remove(fs::path(run_dir) / FolderLock::kFileName, ec);
      lock.reset();
      fs::remove(run_dir, ec);  // only if empty: nothing else was written
    }
    throw;
  }
  Backend& be = *backend;
  GptMoE& model = *model_ptr;
  if (comm->world() > 1) model.set_group(comm.get());  // the balance loss over every rank's routing
  Optimizer& optimizer = *optimizer_ptr;
  const int64_t start_step = step;

  // 3. The run: from here on every failure is recorded in status.json.
  try {
    std::optional<MetricsLog> metrics;
    std::optional<TensorBoardLog> tensorboard;  // the same records' scalars (train.tensorboard)
    if (lead) {
      write_file_atomic(run_dir + "/config.toml", config_to_toml(cfg));
      metrics.emplace(run_dir, step);
      if (cfg.train.tensorboard) tensorboard.emplace(run_dir);
    }
    auto log = [&](const nlohmann::json& record) {
      if (metrics) metrics->append(record);
      if (tensorboard) tensorboard->append(record);
    };
    if (!resumed_from.empty())
      log({{"event", "resume"}, {"step", step}, {"checkpoint", resumed_from}, {"config_changes", changes}});
    status.step = step;
    if (lead) write_status(run_dir, status);

    const int64_t micro = cfg.grad_accum_steps();
    const int64_t world = comm->world();
    const int64_t tokens_per_step = world * micro * cfg.train.batch_size * cfg.train.seq_len;
    const auto peak = peak_flops(cfg, be);
    const double flops_per_token = model.flops_per_token();
    if (lead)
      std::cout << "moelab train: " << status.device << " | "
                << model.params().numel() << " params, " << model.active_matmul_params() << " active matmul | "
                << tokens_per_step << " tokens/step | data " << loader->describe() << std::endl;

    StepRunner runner(be, model, cfg);
    Tensor val_tokens = be.alloc({model.tokens_per_micro_batch()}, DType::i32);
    Tensor val_targets = be.alloc({model.tokens_per_micro_batch()}, DType::i32);
    auto save = [&](int64_t next_step) {
      if (!lead) return;  // every rank holds the same weights and optimizer state
      CheckpointMeta meta;
      meta.step = next_step;
      meta.data_state = loader->state();
      meta.loss_ema = ema;
      meta.train_time_s = total_time_s;
      meta.config_text = config_to_toml(cfg);
      meta.scalars[kWorldSizeScalar] = double(comm->world());
      fs::create_directories(run_dir + "/checkpoints");
      save_checkpoint(checkpoint_path(run_dir, next_step), be, model.params(), optimizer.state(), meta);
      prune_checkpoints(run_dir, cfg.train.keep_checkpoints);
    };

    // MOELAB_PROFILE_STEP=N brackets step N for a profiler started with capture off
    // (ncu --profile-from-start off), so one steady-state step is recorded, not start-up.
    int64_t profile_step = -1;
    if (const char* p = std::getenv("MOELAB_PROFILE_STEP"); p && *p) profile_step = std::atoll(p);

    for (; step < cfg.train.steps; ++step) {
      if (int sig = g_stop_signal.load()) {
        // Keep what the run has done since its last checkpoint, so a resume loses nothing.
        std::string kept;
        if (step > start_step) {
          save(step);
          kept = "; checkpoint saved at step " + std::to_string(step) + ", continue with --set train.resume=auto";
        }
        throw Interrupted("interrupted by signal " + std::to_string(sig) + " (" + (sig == SIGINT ? "SIGINT" : "SIGTERM") +
                    ") before step " + std::to_string(step) + kept);
      }
      status.step = step;
      auto t0 = std::chrono::steady_clock::now();

      std::vector<Batch> batches;
      int64_t valid = 0;
      for (int64_t m = 0; m < micro; ++m) {
        batches.push_back(loader->next_train(cfg.train.batch_size, cfg.train.seq_len));
        valid += count_valid(batches.back().targets);
      }
      const double lrm = lr_multiplier(cfg.train, step);
      // Data parallel: the loss is the mean over every rank's tokens, so each rank scales by the
      // global count, the gradients are summed over ranks before the update (which then agrees
      // on every rank), and the balance loss takes the group's routing (GptMoE::set_group): the
      // mean of the ranks' logged values is the group's.
      if (world > 1) {
        std::vector<double> reduced = {double(valid)};
        Tensor t = borrow_host(reduced);
        comm->all_reduce_sum(t);
        valid = int64_t(reduced[0]);
      }
      if (step == profile_step) be.profiler_range(true);
      StepStats stats = runner.run(batches, float(1.0 / double(std::max<int64_t>(valid, 1))),
                                   float(1.0 / double(micro * world)), [&] {
                                     if (world > 1)
                                       for (Tensor& g : model.gradient_arenas()) comm->all_reduce_sum(g);
                                     optimizer.step(step, lrm);
                                   });
      if (world > 1) {
        std::vector<double> s2 = {stats.loss_sum, stats.bal, stats.drop_rate, stats.z_loss};
        s2.insert(s2.end(), stats.router_entropy.begin(), stats.router_entropy.end());
        Tensor t = borrow_host(s2);
        comm->all_reduce_sum(t);
        stats.loss_sum = s2[0];
        stats.bal = s2[1] / double(world);
        stats.drop_rate = s2[2] / double(world);
        // Entropy and z are means over each rank's tokens (equal counts): their mean is the group's.
        stats.z_loss = s2[3] / double(world);
        for (size_t i = 0; i < stats.router_entropy.size(); ++i) stats.router_entropy[i] = s2[4 + i] / double(world);
      }
      if (step == profile_step) be.profiler_range(false);

      auto t1 = std::chrono::steady_clock::now();
      const double dt = std::chrono::duration<double>(t1 - t0).count();
      const double raw_loss = stats.loss_sum / double(std::max<int64_t>(valid, 1));
      if (!std::isfinite(raw_loss) || !std::isfinite(stats.bal))
        throw Error("loss is " + std::string(std::isnan(raw_loss) || std::isnan(stats.bal) ? "NaN" : "Inf") +
                    " at step " + std::to_string(step) +
                    "; the run diverged: lower optim.matrix_lr / optim.embedding_lr or check the data");
      ema = 0.9 * ema + 0.1 * raw_loss;
      const double debiased = ema / (1.0 - std::pow(0.9, double(step + 1)));
      if (step > 10) total_time_s += dt;
      const double tok_sec = double(tokens_per_step) / dt;
      std::optional<double> mfu;
      if (peak) mfu = 100.0 * flops_per_token * tok_sec / *peak;
      const double peak_mib = double(be.peak_memory_bytes()) / (1024.0 * 1024.0);

      StepLine line{step, cfg.train.steps, debiased, stats.bal, lrm, dt * 1e3, tok_sec, total_time_s / 60.0, mfu, {}};
      if (!stats.max_vio.empty()) line.maxvio = *std::max_element(stats.max_vio.begin(), stats.max_vio.end());
      if (lead) std::cout << format_step_line(line) << std::endl;
      nlohmann::json rec = {{"event", "step"},  {"step", step},         {"steps", cfg.train.steps},
                            {"loss", debiased}, {"raw_loss", raw_loss}, {"bal", stats.bal},
                            {"lrm", lrm},       {"dt_ms", dt * 1e3},    {"tok_sec", tok_sec},
                            {"peak_mem_mib", peak_mib}, {"drop_rate", stats.drop_rate},
                            {"total_time_min", total_time_s / 60.0},    {"expert_load", stats.expert_load},
                            {"tokens", (step + 1) * tokens_per_step}};
      rec["mfu"] = mfu ? nlohmann::json(*mfu) : nlohmann::json(nullptr);
      if (!stats.max_vio.empty()) {  // MoE routing statistics, per MoE layer in layer order
        rec["max_vio"] = stats.max_vio;
        rec["router_entropy"] = stats.router_entropy;
        rec["z_loss"] = stats.z_loss;
        if (cfg.moe.balance == "aux_free") rec["bias_range"] = stats.bias_range;
      }
      log(rec);
      result.last_loss = debiased;
      result.last_raw_loss = raw_loss;

      const bool last = step + 1 == cfg.train.steps;
      if ((cfg.train.eval_every > 0 && (step + 1) % cfg.train.eval_every == 0) || last) {
        ValResult v = evaluate(be, model, *loader, cfg, val_tokens, val_targets, *comm);
        if (lead) {
          std::printf("step %05lld | validation loss: %.6f | bpb: %.4f\n", (long long)step, v.loss, v.bpb);
          std::fflush(stdout);
        }
        log({{"event", "val"}, {"step", step}, {"val_loss", v.loss}, {"val_bpb", v.bpb}});
      }
      if ((cfg.train.checkpoint_every > 0 && (step + 1) % cfg.train.checkpoint_every == 0) ||
          (last && cfg.train.save_final)) {
        save(step + 1);
      }
      if (lead && cfg.train.checkpoint_every > 0 && (step + 1) % cfg.train.checkpoint_every == 0) write_status(run_dir, status);
    }

    if (lead && cfg.train.save_final && step > start_step) {
      // The model for other tools, and one validation batch with the loss moelab computes on
      // it, so a reader (scripts/moelab_torch.py) can show it rebuilt the same model.
      CheckpointMeta meta;
      meta.step = step;
      meta.data_state = loader->state();
      meta.loss_ema = ema;
      meta.train_time_s = total_time_s;
      meta.config_text = config_to_toml(cfg);
      save_model_export(run_dir, be, model.params(), optimizer.state(), meta, export_config_json(cfg, be));
      loader->reset_val();
      Batch batch = loader->next_val(cfg.train.batch_size, cfg.train.seq_len);
      be.write_i32(val_tokens, batch.inputs);
      be.write_i32(val_targets, batch.targets);
      model.forward_eval(val_tokens, val_targets);
      auto losses = be.read(model.losses());
      double sum = 0;
      int64_t n = 0;
      for (size_t i = 0; i < losses.size(); ++i)
        if (batch.targets[i] >= 0) {
          sum += losses[i];
          ++n;
        }
      nlohmann::json check = {{"rows", cfg.train.batch_size}, {"seq_len", cfg.train.seq_len},
                              {"tokens", batch.inputs},       {"targets", batch.targets},
                              {"loss", n ? sum / double(n) : 0.0}, {"step", step}};
      write_file_atomic(run_dir + "/check_batch.json", check.dump() + "\n");
    }

    result.steps_done = step;
    result.peak_mem_mib = double(be.peak_memory_bytes()) / (1024.0 * 1024.0);
    result.total_time_min = total_time_s / 60.0;
    if (lead) {
      std::printf("Peak memory usage: %.2fMiB\nTotal training time: %.2fm\n", result.peak_mem_mib, result.total_time_min);
      std::fflush(stdout);
    }
    log({{"event", "end"},
                    {"step", step - 1},
                    {"peak_mem_mib", result.peak_mem_mib},
                    {"total_time_min", result.total_time_min}});
    status.status = "completed";
    status.step = step - 1;  // the last step run, as in the end record
    status.peak_mem_mib = result.peak_mem_mib;
    status.total_time_min = result.total_time_min;
    if (lead) write_status(run_dir, status);
  } catch (const std::exception& e) {
    status.status = "failed";
    status.step = step;
    status.error = e.what();
    try {
      if (lead) write_status(run_dir, status);
    } catch (...) {
    }
    // Of several ranks, the one that failed says so (mpiexec then stops the others).
    if (comm->world() > 1) {
      const std::string text = "rank " + std::to_string(comm->rank()) + " of " + std::to_string(comm->world()) + ": " + e.what();
      if (dynamic_cast<const Interrupted*>(&e)) throw Interrupted(text);
      throw Error(text);
    }
    throw;
  }
  return result;
}

}  // namespace moelab
