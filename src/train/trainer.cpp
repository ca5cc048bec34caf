// The training loop, as the parts of one TrainingRun: the folder (claimed and checked before
// anything is written), set-up (backend, data, model, optimizer, resume), then per step: zero
// grads, micro-batches, optimizer, statistics read-back (the step's one host sync), logging,
// validation and checkpoints; then the model export and the end. Any exception of a started run
// marks it failed before it propagates.
#include "train/trainer.hpp"

#include <algorithm>
#include <atomic>
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

// The expert-parallel layout (parallel.expert) of the job that wrote a checkpoint; absent: 1.
constexpr const char* kExpertParallelScalar = "parallel_expert";

// Expert parallel: a tensor of this rank's experts (a parameter "...mlp.experts...." or its
// optimizer state) is rank q's dim-0 slice of the whole stack; checkpoints hold the whole stacks.
bool expert_slice(const std::string& name) { return name.find("mlp.experts.") != std::string::npos; }

// The whole stack of a rank's slice: every rank's slices gathered in rank order along dim 0.
Tensor gather_experts(Backend& be, Communicator& comm, const Tensor& local) {
  Shape whole = local.shape;
  whole[0] *= comm.world();
  Tensor out = be.alloc(whole, local.dtype);
  comm.all_gather(local, out);
  return out;
}

// Rank q's slice of a whole stack, copied into its local tensor.
void take_experts(Backend& be, const Communicator& comm, const Tensor& whole, Tensor local) {
  const int64_t n0 = local.shape[0], per = local.numel() / std::max<int64_t>(n0, 1);
  const Tensor part = whole.view({whole.shape[0], per}).rows_slice(comm.rank() * n0, (comm.rank() + 1) * n0).view(local.shape);
  be.copy(part, local);
}

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

namespace {

// One call of run_training, in the order it happens: claim the folder (nothing in it changes
// before the checks have passed), set up backend, data, model and optimizer (and resume), then
// run the steps and end the run. A failure of a started run is recorded in status.json.
class TrainingRun {
 public:
  TrainingRun(const Config& cfg, const std::string& run_dir, const TrainOptions& options)
      : cfg_(cfg), run_dir_(run_dir), options_(options), comm_(make_communicator(launch_env())),
        lead_(comm_->rank() == 0) {}

  TrainResult run();

 private:
  // What exists while the steps run; destroyed (its files closed) before a failure is recorded.
  struct Running {
    std::optional<MetricsLog> metrics;
    std::optional<TensorBoardLog> tensorboard;  // the same records' scalars (train.tensorboard)
    int64_t micro = 1, world = 1, tokens_per_step = 0;
    std::optional<double> peak;
    double flops_per_token = 0;
    std::optional<StepRunner> runner;
    Tensor val_tokens, val_targets;
    int64_t profile_step = -1;
  };

  void claim_folder();
  void catch_stop_signals();
  void set_up();
  void build();
  void resume();
  void open(Running& r);
  void log(Running& r, const nlohmann::json& record);
  void save(int64_t next_step);
  // What a checkpoint and the model export record of the run at `step`: data position, loss EMA,
  // time, config and the expert-parallel layout.
  CheckpointMeta run_meta(int64_t step) const;
  struct ExpertWhole {
    ParamTable params;
    std::vector<NamedTensor> state;
  };
  ExpertWhole gather_expert_parallel(std::vector<NamedTensor> state);
  void train_step(Running& r);
  void export_model(Running& r);
  void finish(Running& r);
  [[noreturn]] void fail(const std::exception& e);

  const Config& cfg_;
  const std::string& run_dir_;
  const TrainOptions& options_;
  // The job's ranks (one, unless a launcher started several: data parallel). Rank 0 alone owns
  // the run folder: it takes the lock and writes every file; the others only read it (resume).
  std::unique_ptr<Communicator> comm_;
  const bool lead_;
  std::optional<FolderLock> lock_;
  bool created_folder_ = false;  // this call made run_dir: a start refused in set-up removes it again
  RunStatus status_;
  struct RestoreSignals {
    RestoreSignals(void (*old_int)(int), void (*old_term)(int)) : i(old_int), t(old_term) {}
    void (*i)(int);
    void (*t)(int);
    ~RestoreSignals() {
      std::signal(SIGINT, i);
      std::signal(SIGTERM, t);
    }
  };
  std::optional<RestoreSignals> restore_signals_;
  TrainResult result_;
  int64_t step_ = 0, start_step_ = 0;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<DataLoader> loader_;
  std::unique_ptr<GptMoE> model_;
  std::unique_ptr<Optimizer> optimizer_;
  double ema_ = 0, total_time_s_ = 0;
  std::string resumed_from_;
  std::vector<std::string> changes_;
};

TrainResult TrainingRun::run() {
  claim_folder();
  comm_->barrier();  // the other ranks read the folder only once rank 0 has settled it
  status_.steps = cfg_.train.steps;
  status_.started_at = utc_timestamp();
  catch_stop_signals();
  set_up();
  if (comm_->world() > 1) model_->set_group(comm_.get());  // the balance loss over every rank's routing
  start_step_ = step_;
  // From here on every failure is recorded in status.json.
  try {
    Running r;
    open(r);
    for (; step_ < cfg_.train.steps; ++step_) train_step(r);
    export_model(r);
    finish(r);
  } catch (const std::exception& e) {
    fail(e);
  }
  return result_;
}

// The folder and its lock; nothing in it changes before the checks here and in set-up have passed.
void TrainingRun::claim_folder() {
  if (!lead_) return;
  std::error_code ec;
  created_folder_ = !fs::exists(run_dir_);
  fs::create_directories(run_dir_, ec);
  if (ec) throw Error("cannot create run folder " + run_dir_ + ": " + ec.message());
  lock_.emplace(FolderLock::acquire(run_dir_, "run folder"));
  if (folder_holds_run(run_dir_) && cfg_.train.resume.empty()) {
    if (!options_.force)
      throw Error("run folder " + run_dir_ + " already holds a run" + describe_existing(run_dir_) +
                  "; continue it with --set train.resume=auto, choose another --out, or pass --force to move the old "
                  "run aside");
    std::cout << "--force: moved the earlier run's files to " << move_run_aside(run_dir_) << std::endl;
  }
}

// SIGINT and SIGTERM stop the run before its next step (with a checkpoint); the handlers the
// process had are restored when the run ends.
void TrainingRun::catch_stop_signals() {
  g_stop_signal.store(0);
  auto old_int = std::signal(SIGINT, on_stop_signal);
  auto old_term = std::signal(SIGTERM, on_stop_signal);
  restore_signals_.emplace(old_int, old_term);
}

// Backend, data, model, optimizer and the checkpoint to resume from. If this fails, nothing has
// been written: the folder is left as it was (and removed, lock file and all, if this call
// created it), so the corrected command runs into the same --out.
void TrainingRun::set_up() {
  try {
    build();
    if (!cfg_.train.resume.empty()) resume();
  } catch (const std::exception&) {
    if (lead_ && created_folder_) {
      std::error_code ec;
      fs::remove(fs::path(run_dir_) / FolderLock::kFileName, ec);
      lock_.reset();
      fs::remove(run_dir_, ec);  // only if empty: nothing else was written
    }
    throw;
  }
}

void TrainingRun::build() {
  backend_ = make_backend(cfg_);
  status_.device = run_device_description(*backend_, cfg_, *comm_);
  status_.ranks = comm_->world();
  if (comm_->world() > 1 && backend_->device() != Device::cpu)
    throw Error("data parallel over " + std::to_string(comm_->world()) + " ranks runs on CPU ranks for now (" +
                comm_->name() + "); GPU ranks need the NCCL communicator, which is not built yet: set device = \"cpu\"");
  // CPU ranks are this host's processes: all of them must fit its memory.
  if (backend_->device() == Device::cpu) check_memory_fits(cfg_, comm_->world());
  else if (const auto free_bytes = backend_->free_device_memory())
    check_device_memory_fits(cfg_, double(*free_bytes), backend_->name());
  loader_ = make_loader(cfg_.data, uint64_t(cfg_.train.seed), comm_->rank(), comm_->world());
  if (loader_->vocab() > cfg_.model.vocab)
    throw Error("model.vocab = " + std::to_string(cfg_.model.vocab) + " is smaller than the data's vocabulary (" +
                std::to_string(loader_->vocab()) + " ids, " + loader_->describe() + "); raise model.vocab");
  if (cfg_.parallel.expert > 1 && cfg_.parallel.expert != comm_->world())
    throw Error("parallel.expert = " + std::to_string(cfg_.parallel.expert) + " needs as many ranks, this job has " +
                std::to_string(comm_->world()) + ": run with --nproc " + std::to_string(cfg_.parallel.expert) +
                " (expert groups smaller than the job are not built yet)");
  model_ = std::make_unique<GptMoE>(*backend_, cfg_, cfg_.train.batch_size, cfg_.train.seq_len,
                                    cfg_.parallel.expert > 1 ? comm_.get() : nullptr);
  model_->init_weights(uint64_t(cfg_.train.seed));
  optimizer_ = std::make_unique<Optimizer>(*backend_, model_->params(), cfg_,
                                           cfg_.optim.shard_state ? comm_.get() : nullptr,
                                           model_->gradient_arenas());
}

// Weights, optimizer state, step, data position and the loss EMA. With auto, the newest
// checkpoint that reads back whole; a damaged newer one is named and passed over.
void TrainingRun::resume() {
  const bool automatic = cfg_.train.resume == "auto";
  std::vector<std::string> candidates =
      automatic ? checkpoints_newest_first(run_dir_) : std::vector<std::string>{cfg_.train.resume};
  std::vector<std::string> unreadable;
  for (const auto& path : candidates) {
    CheckpointMeta meta;
    // Sharded state: every rank reads the whole state and keeps its share.
    std::unique_ptr<Optimizer> full;
    if (optimizer_->sharded()) full = std::make_unique<Optimizer>(*backend_, model_->params(), cfg_);
    auto state = full ? full->state() : optimizer_->state();
    // Expert parallel: the file holds the whole expert stacks; each rank reads them into
    // whole-size tensors and keeps its experts.
    const bool ep = cfg_.parallel.expert > 1;
    ParamTable whole_params = model_->params();
    std::vector<NamedTensor> whole_state = state;
    if (ep) {
      for (Param& p : whole_params.params)
        if (expert_slice(p.name)) {
          Shape sh = p.value.shape;
          sh[0] *= comm_->world();
          p.value = backend_->alloc(sh, p.value.dtype);
        }
      for (NamedTensor& t : whole_state)
        if (expert_slice(t.name)) {
          Shape sh = t.tensor.shape;
          sh[0] *= comm_->world();
          t.tensor = backend_->alloc(sh, t.tensor.dtype);
        }
    }
    try {
      load_checkpoint(path, *backend_, ep ? whole_params : model_->params(), ep ? whole_state : state, meta,
                      config_to_toml(cfg_));
      if (ep) {
        for (size_t i = 0; i < whole_params.params.size(); ++i)
          if (expert_slice(whole_params.params[i].name))
            take_experts(*backend_, *comm_, whole_params.params[i].value, model_->params().params[i].value);
        for (size_t i = 0; i < state.size(); ++i)
          if (expert_slice(state[i].name)) take_experts(*backend_, *comm_, whole_state[i].tensor, state[i].tensor);
      }
      if (full) optimizer_->scatter_state(state);
    } catch (const CheckpointUnreadable& e) {
      if (!automatic) throw;
      std::cout << "train.resume = auto: passing over " << path << ": " << e.what() << std::endl;
      unreadable.push_back(path);
      continue;
    }
    // The checkpoint's data position and tokens per step belong to the job size that wrote
    // it: resumed by another, each rank would read other rows and the step would hold other
    // tokens, with nothing said. Until checkpoints are resharded, the job must match.
    if (auto it = meta.scalars.find(kWorldSizeScalar); it != meta.scalars.end() && int64_t(it->second) != comm_->world())
      throw Error("train.resume: " + path + " was written by a job of " + std::to_string(int64_t(it->second)) +
                  " rank(s) and this job has " + std::to_string(comm_->world()) +
                  "; its data position and tokens per step hold only for that many ranks: resume with --nproc " +
                  std::to_string(int64_t(it->second)) +
                  " (resharding a checkpoint to another number of ranks is not built yet)");
    {
      auto it = meta.scalars.find(kExpertParallelScalar);
      const int64_t written = it == meta.scalars.end() ? 1 : int64_t(it->second);
      if (written != cfg_.parallel.expert)
        throw Error("train.resume: " + path + " was written with parallel.expert = " + std::to_string(written) + " over " +
                    std::to_string(comm_->world()) + " rank(s) and this job has parallel.expert = " +
                    std::to_string(cfg_.parallel.expert) + " over " + std::to_string(comm_->world()) +
                    ": resume with the layout that wrote it (re-splitting the experts on resume is not built yet)");
    }
    model_->refresh_compute_weights();
    loader_->restore(meta.data_state);
    step_ = meta.step;
    ema_ = meta.loss_ema;
    total_time_s_ = meta.train_time_s;
    resumed_from_ = path;
    changes_ = config_changes(meta.config_text, cfg_);
    break;
  }
  if (resumed_from_.empty() && !unreadable.empty())
    throw Error("train.resume = auto: none of the " + std::to_string(unreadable.size()) + " checkpoint(s) in " +
                run_dir_ + "/checkpoints reads back whole; restore one, or start again with --force");
  if (candidates.empty())
    std::cout << "train.resume = auto: no checkpoint in " << run_dir_ << "/checkpoints, starting fresh\n";
  if (!resumed_from_.empty())
    std::cout << "resumed from " << resumed_from_ << " at step " << step_
              << (unreadable.empty() ? "" : " (the newest intact checkpoint)") << "\n";
  for (const auto& c : changes_)
    std::cerr << "moelab: warning: resumed with a config change against the checkpoint: " << c << "\n";
}

// The run's first writes (config.toml, metrics.jsonl, status.json), the header line, and what
// the steps use.
void TrainingRun::open(Running& r) {
  if (lead_) {
    write_file_atomic(run_dir_ + "/config.toml", config_to_toml(cfg_));
    r.metrics.emplace(run_dir_, step_);
    if (cfg_.train.tensorboard) r.tensorboard.emplace(run_dir_);
  }
  if (!resumed_from_.empty())
    log(r, {{"event", "resume"}, {"step", step_}, {"checkpoint", resumed_from_}, {"config_changes", changes_}});
  status_.step = step_;
  if (lead_) write_status(run_dir_, status_);

  r.micro = cfg_.grad_accum_steps();
  r.world = comm_->world();
  r.tokens_per_step = r.world * r.micro * cfg_.train.batch_size * cfg_.train.seq_len;
  r.peak = peak_flops(cfg_, *backend_);
  r.flops_per_token = model_->flops_per_token();
  if (lead_)
    std::cout << "moelab train: " << status_.device << " | "
              << model_->params().numel() << " params, " << model_->active_matmul_params() << " active matmul | "
              << r.tokens_per_step << " tokens/step | data " << loader_->describe() << std::endl;

  r.runner.emplace(*backend_, *model_, cfg_);
  r.val_tokens = backend_->alloc({model_->tokens_per_micro_batch()}, DType::i32);
  r.val_targets = backend_->alloc({model_->tokens_per_micro_batch()}, DType::i32);
  // MOELAB_PROFILE_STEP=N brackets step N for a profiler started with capture off
  // (ncu --profile-from-start off), so one steady-state step is recorded, not start-up.
  if (const char* p = std::getenv("MOELAB_PROFILE_STEP"); p && *p) r.profile_step = std::atoll(p);
}

void TrainingRun::log(Running& r, const nlohmann::json& record) {
  if (r.metrics) r.metrics->append(record);
  if (r.tensorboard) r.tensorboard->append(record);
}

// A checkpoint from which a resume starts at next_step.
// The weights and optimizer state as one rank holding every expert would: with expert
// parallelism every rank sends its experts (a collective: all ranks call this) and each gets the
// whole stacks; otherwise the tensors themselves.
TrainingRun::ExpertWhole TrainingRun::gather_expert_parallel(std::vector<NamedTensor> state) {
  ExpertWhole w{model_->params(), std::move(state)};
  if (cfg_.parallel.expert <= 1) return w;
  for (Param& p : w.params.params)
    if (expert_slice(p.name)) p.value = gather_experts(*backend_, *comm_, p.value);
  for (NamedTensor& t : w.state)
    if (expert_slice(t.name)) t.tensor = gather_experts(*backend_, *comm_, t.tensor);
  return w;
}

CheckpointMeta TrainingRun::run_meta(int64_t step) const {
  CheckpointMeta meta;
  meta.step = step;
  meta.data_state = loader_->state();
  meta.loss_ema = ema_;
  meta.train_time_s = total_time_s_;
  meta.config_text = config_to_toml(cfg_);
  if (cfg_.parallel.expert > 1) meta.scalars[kExpertParallelScalar] = double(cfg_.parallel.expert);
  return meta;
}

void TrainingRun::save(int64_t next_step) {
  // Every rank holds the same weights; with sharded optimizer state each sends its share, and
  // rank 0 writes the whole state in the unsharded layout.
  std::unique_ptr<Optimizer> full;
  if (optimizer_->sharded()) {
    full = std::make_unique<Optimizer>(*backend_, model_->params(), cfg_);
    optimizer_->gather_state(full->state());
  }
  ExpertWhole whole = gather_expert_parallel(full ? full->state() : optimizer_->state());
  if (!lead_) return;
  CheckpointMeta meta = run_meta(next_step);
  meta.scalars[kWorldSizeScalar] = double(comm_->world());
  fs::create_directories(run_dir_ + "/checkpoints");
  save_checkpoint(checkpoint_path(run_dir_, next_step), *backend_, whole.params, whole.state, meta);
  prune_checkpoints(run_dir_, cfg_.train.keep_checkpoints);
}

// Step step_: micro-batches, update, statistics, the step's line and record, then validation
// and checkpoints where they fall.
void TrainingRun::train_step(Running& r) {
  Backend& be = *backend_;
  const int64_t step = step_;
  if (int sig = g_stop_signal.load()) {
    // Keep what the run has done since its last checkpoint, so a resume loses nothing.
    std::string kept;
    // Sharded state and expert-parallel weights are gathered by a collective, which ranks stopped
    // at different steps could not finish: such a run keeps its last checkpoint.
    if (step > start_step_ && !optimizer_->sharded() && cfg_.parallel.expert <= 1) {
      save(step);
      kept = "; checkpoint saved at step " + std::to_string(step) + ", continue with --set train.resume=auto";
    }
    throw Interrupted("interrupted by signal " + std::to_string(sig) + " (" + (sig == SIGINT ? "SIGINT" : "SIGTERM") +
                      ") before step " + std::to_string(step) + kept);
  }
  status_.step = step;
  auto t0 = std::chrono::steady_clock::now();

  std::vector<Batch> batches;
  int64_t valid = 0;
  for (int64_t m = 0; m < r.micro; ++m) {
    batches.push_back(loader_->next_train(cfg_.train.batch_size, cfg_.train.seq_len));
    valid += count_valid(batches.back().targets);
  }
  const double lrm = lr_multiplier(cfg_.train, step);
  // Data parallel: the loss is the mean over every rank's tokens, so each rank scales by the
  // global count, the gradients are summed over ranks before the update (which then agrees
  // on every rank), and the balance loss takes the group's routing (GptMoE::set_group): the
  // mean of the ranks' logged values is the group's.
  const int64_t world = r.world;
  if (world > 1) {
    std::vector<double> reduced = {double(valid)};
    Tensor t = borrow_host(reduced);
    comm_->all_reduce_sum(t);
    valid = int64_t(reduced[0]);
  }
  if (step == r.profile_step) be.profiler_range(true);
  StepStats stats = r.runner->run(batches, float(1.0 / double(std::max<int64_t>(valid, 1))),
                                  float(1.0 / double(r.micro * world)), [&] {
                                    if (world > 1) {
                                      std::vector<Tensor> arenas = model_->gradient_arenas();
                                      if (optimizer_->sharded()) optimizer_->reduce_gradients(arenas);
                                      else for (Tensor& g : arenas) comm_->all_reduce_sum(g);
                                    }
                                    optimizer_->step(step, lrm);
                                  });
  if (world > 1) {
    std::vector<double> s2 = {stats.loss_sum, stats.bal, stats.drop_rate, stats.z_loss};
    s2.insert(s2.end(), stats.router_entropy.begin(), stats.router_entropy.end());
    Tensor t = borrow_host(s2);
    comm_->all_reduce_sum(t);
    stats.loss_sum = s2[0];
    stats.bal = s2[1] / double(world);
    stats.drop_rate = s2[2] / double(world);
    // Entropy and z are means over each rank's tokens (equal counts): their mean is the group's.
    stats.z_loss = s2[3] / double(world);
    for (size_t i = 0; i < stats.router_entropy.size(); ++i) stats.router_entropy[i] = s2[4 + i] / double(world);
  }
  if (step == r.profile_step) be.profiler_range(false);

  auto t1 = std::chrono::steady_clock::now();
  const double dt = std::chrono::duration<double>(t1 - t0).count();
  const double raw_loss = stats.loss_sum / double(std::max<int64_t>(valid, 1));
  if (!std::isfinite(raw_loss) || !std::isfinite(stats.bal))
    throw Error("loss is " + std::string(std::isnan(raw_loss) || std::isnan(stats.bal) ? "NaN" : "Inf") +
                " at step " + std::to_string(step) +
                "; the run diverged: lower optim.matrix_lr / optim.embedding_lr or check the data");
  ema_ = 0.9 * ema_ + 0.1 * raw_loss;
  const double debiased = ema_ / (1.0 - std::pow(0.9, double(step + 1)));
  if (step > 10) total_time_s_ += dt;
  const double tok_sec = double(r.tokens_per_step) / dt;
  std::optional<double> mfu;
  if (r.peak) mfu = 100.0 * r.flops_per_token * tok_sec / *r.peak;
  const double peak_mib = double(be.peak_memory_bytes()) / (1024.0 * 1024.0);

  StepLine line{step, cfg_.train.steps, debiased, stats.bal, lrm, dt * 1e3, tok_sec, total_time_s_ / 60.0, mfu, {}};
  if (!stats.max_vio.empty()) line.maxvio = *std::max_element(stats.max_vio.begin(), stats.max_vio.end());
  if (lead_) std::cout << format_step_line(line) << std::endl;
  nlohmann::json rec = {{"event", "step"},  {"step", step},         {"steps", cfg_.train.steps},
                        {"loss", debiased}, {"raw_loss", raw_loss}, {"bal", stats.bal},
                        {"lrm", lrm},       {"dt_ms", dt * 1e3},    {"tok_sec", tok_sec},
                        {"peak_mem_mib", peak_mib}, {"drop_rate", stats.drop_rate},
                        {"total_time_min", total_time_s_ / 60.0},   {"expert_load", stats.expert_load},
                        {"tokens", (step + 1) * r.tokens_per_step}};
  rec["mfu"] = mfu ? nlohmann::json(*mfu) : nlohmann::json(nullptr);
  if (!stats.max_vio.empty()) {  // MoE routing statistics, per MoE layer in layer order
    rec["max_vio"] = stats.max_vio;
    rec["router_entropy"] = stats.router_entropy;
    rec["z_loss"] = stats.z_loss;
    if (cfg_.moe.balance == "aux_free") rec["bias_range"] = stats.bias_range;
  }
  log(r, rec);
  result_.last_loss = debiased;
  result_.last_raw_loss = raw_loss;

  const bool last = step + 1 == cfg_.train.steps;
  if ((cfg_.train.eval_every > 0 && (step + 1) % cfg_.train.eval_every == 0) || last) {
    ValResult v = evaluate(be, *model_, *loader_, cfg_, r.val_tokens, r.val_targets, *comm_);
    if (lead_) {
      std::printf("step %05lld | validation loss: %.6f | bpb: %.4f\n", (long long)step, v.loss, v.bpb);
      std::fflush(stdout);
    }
    log(r, {{"event", "val"}, {"step", step}, {"val_loss", v.loss}, {"val_bpb", v.bpb}});
  }
  if ((cfg_.train.checkpoint_every > 0 && (step + 1) % cfg_.train.checkpoint_every == 0) ||
      (last && cfg_.train.save_final)) {
    save(step + 1);
  }
  if (lead_ && cfg_.train.checkpoint_every > 0 && (step + 1) % cfg_.train.checkpoint_every == 0)
    write_status(run_dir_, status_);
}

// The model for other tools, and one validation batch with the loss moelab computes on it, so
// a reader (scripts/moelab_torch.py) can show it rebuilt the same model.
void TrainingRun::export_model(Running& r) {
  if (!cfg_.train.save_final || step_ <= start_step_) return;
  std::unique_ptr<Optimizer> full;  // sharded state: gathered whole, as save() does
  if (optimizer_->sharded()) {
    full = std::make_unique<Optimizer>(*backend_, model_->params(), cfg_);
    optimizer_->gather_state(full->state());
  }
  ExpertWhole whole = gather_expert_parallel(full ? full->state() : optimizer_->state());
  // Expert parallel: the check batch's forward needs every rank's experts, so all ranks run it.
  if (!lead_ && cfg_.parallel.expert <= 1) return;
  Backend& be = *backend_;
  if (lead_) {
    const CheckpointMeta meta = run_meta(step_);
    save_model_export(run_dir_, be, whole.params, whole.state, meta, export_config_json(cfg_, be));
  }
  loader_->reset_val();
  Batch batch = loader_->next_val(cfg_.train.batch_size, cfg_.train.seq_len);
  be.write_i32(r.val_tokens, batch.inputs);
  be.write_i32(r.val_targets, batch.targets);
  model_->forward_eval(r.val_tokens, r.val_targets);
  if (!lead_) return;
  auto losses = be.read(model_->losses());
  double sum = 0;
  int64_t n = 0;
  for (size_t i = 0; i < losses.size(); ++i)
    if (batch.targets[i] >= 0) {
      sum += losses[i];
      ++n;
    }
  nlohmann::json check = {{"rows", cfg_.train.batch_size}, {"seq_len", cfg_.train.seq_len},
                          {"tokens", batch.inputs},        {"targets", batch.targets},
                          {"loss", n ? sum / double(n) : 0.0}, {"step", step_}};
  write_file_atomic(run_dir_ + "/check_batch.json", check.dump() + "\n");
}

// The summary lines, the end record and status.json completed.
void TrainingRun::finish(Running& r) {
  result_.steps_done = step_;
  result_.peak_mem_mib = double(backend_->peak_memory_bytes()) / (1024.0 * 1024.0);
  result_.total_time_min = total_time_s_ / 60.0;
  if (lead_) {
    std::printf("Peak memory usage: %.2fMiB\nTotal training time: %.2fm\n", result_.peak_mem_mib, result_.total_time_min);
    std::fflush(stdout);
  }
  log(r, {{"event", "end"},
          {"step", step_ - 1},
          {"peak_mem_mib", result_.peak_mem_mib},
          {"total_time_min", result_.total_time_min}});
  status_.status = "completed";
  status_.step = step_ - 1;  // the last step run, as in the end record
  status_.peak_mem_mib = result_.peak_mem_mib;
  status_.total_time_min = result_.total_time_min;
  if (lead_) write_status(run_dir_, status_);
}

// status.json failed with the step and the error, then the error again (of several ranks, the
// one that failed names itself; mpiexec then stops the others).
void TrainingRun::fail(const std::exception& e) {
  status_.status = "failed";
  status_.step = step_;
  status_.error = e.what();
  try {
    if (lead_) write_status(run_dir_, status_);
  } catch (...) {
  }
  if (comm_->world() > 1) {
    const std::string text = "rank " + std::to_string(comm_->rank()) + " of " + std::to_string(comm_->world()) + ": " + e.what();
    if (dynamic_cast<const Interrupted*>(&e)) throw Interrupted(text);
    throw Error(text);
  }
  throw;
}

}  // namespace

TrainResult run_training(const Config& cfg, const std::string& run_dir, const TrainOptions& options) {
  return TrainingRun(cfg, run_dir, options).run();
}

}  // namespace moelab
