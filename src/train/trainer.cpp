// The training loop. Structure: setup (folder, backend, data, model, optimizer, resume), then per
// step: zero grads, micro-batches, optimizer, statistics read-back (the step's one host sync),
// logging, validation and checkpoints. Any exception marks the run failed before it propagates.
#include "train/trainer.hpp"

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <cstdio>
#include <filesystem>
#include <iostream>

#include "core/error.hpp"
#include "data/loader.hpp"
#include "model/gpt.hpp"
#include "optim/lr_schedule.hpp"
#include "optim/optimizer.hpp"
#include "train/checkpoint.hpp"
#include "train/device_select.hpp"
#include "train/run_files.hpp"
#include "train/step_runner.hpp"

namespace moelab {
namespace fs = std::filesystem;

namespace {

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
                   Tensor& targets) {
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
  ValResult r;
  r.loss = count ? nats / double(count) : 0.0;
  r.bpb = bytes > 0 ? nats / (std::log(2.0) * bytes) : 0.0;
  return r;
}

}  // namespace

TrainResult run_training(const Config& cfg, const std::string& run_dir) {
  fs::create_directories(run_dir);
  write_file_atomic(run_dir + "/config.toml", config_to_toml(cfg));
  RunStatus status;
  status.steps = cfg.train.steps;
  status.started_at = utc_timestamp();
  write_status(run_dir, status);

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

  TrainResult result;
  int64_t step = 0;
  try {
    auto backend = make_backend(cfg);
    Backend& be = *backend;
    status.device = be.name();
    auto loader = make_loader(cfg.data, uint64_t(cfg.train.seed));
    if (loader->vocab() > cfg.model.vocab)
      throw Error("model.vocab = " + std::to_string(cfg.model.vocab) + " is smaller than the data's vocabulary (" +
                  std::to_string(loader->vocab()) + " ids, " + loader->describe() + "); raise model.vocab");

    GptMoE model(be, cfg, cfg.train.batch_size, cfg.train.seq_len);
    model.init_weights(uint64_t(cfg.train.seed));
    Optimizer optimizer(be, model.params(), cfg);

    // Resume: weights, optimizer state, step, data position and the loss EMA.
    double ema = 0, total_time_s = 0;
    std::string resumed_from;
    if (!cfg.train.resume.empty()) {
      std::string path = cfg.train.resume == "auto" ? latest_checkpoint(run_dir) : cfg.train.resume;
      if (path.empty()) {
        std::cout << "train.resume = auto: no checkpoint in " << run_dir << "/checkpoints, starting fresh\n";
      } else {
        CheckpointMeta meta;
        auto state = optimizer.state();
        load_checkpoint(path, be, model.params(), state, meta, config_to_toml(cfg));
        model.refresh_compute_weights();
        loader->restore(meta.data_state);
        step = meta.step;
        ema = meta.loss_ema;
        total_time_s = meta.train_time_s;
        resumed_from = path;
        std::cout << "resumed from " << path << " at step " << step << "\n";
      }
    }
    MetricsLog metrics(run_dir, step);
    if (step > 0) metrics.append({{"event", "resume"}, {"step", step}, {"checkpoint", resumed_from}});
    status.step = step;
    write_status(run_dir, status);

    const int64_t micro = cfg.grad_accum_steps();
    const int64_t tokens_per_step = micro * cfg.train.batch_size * cfg.train.seq_len;
    const auto peak = peak_flops(cfg, be);
    const double flops_per_token = model.flops_per_token();
    std::cout << "moelab train: " << be.name() << " | " << model.params().numel() << " params, "
              << model.active_matmul_params() << " active matmul | " << tokens_per_step << " tokens/step | data "
              << loader->describe() << std::endl;

    StepRunner runner(be, model, cfg);
    Tensor val_tokens = be.alloc({model.tokens_per_micro_batch()}, DType::i32);
    Tensor val_targets = be.alloc({model.tokens_per_micro_batch()}, DType::i32);
    auto save = [&](int64_t next_step) {
      CheckpointMeta meta;
      meta.step = next_step;
      meta.data_state = loader->state();
      meta.loss_ema = ema;
      meta.train_time_s = total_time_s;
      meta.config_text = config_to_toml(cfg);
      fs::create_directories(run_dir + "/checkpoints");
      save_checkpoint(checkpoint_path(run_dir, next_step), be, model.params(), optimizer.state(), meta);
    };

    // MOELAB_PROFILE_STEP=N brackets step N for a profiler started with capture off
    // (ncu --profile-from-start off), so one steady-state step is recorded, not start-up.
    int64_t profile_step = -1;
    if (const char* p = std::getenv("MOELAB_PROFILE_STEP"); p && *p) profile_step = std::atoll(p);

    for (; step < cfg.train.steps; ++step) {
      if (int sig = g_stop_signal.load())
        throw Error("interrupted by signal " + std::to_string(sig) + " (" + (sig == SIGINT ? "SIGINT" : "SIGTERM") +
                    ") before step " + std::to_string(step));
      status.step = step;
      auto t0 = std::chrono::steady_clock::now();

      std::vector<Batch> batches;
      int64_t valid = 0;
      for (int64_t m = 0; m < micro; ++m) {
        batches.push_back(loader->next_train(cfg.train.batch_size, cfg.train.seq_len));
        valid += count_valid(batches.back().targets);
      }
      const double lrm = lr_multiplier(cfg.train, step);
      if (step == profile_step) be.profiler_range(true);
      StepStats stats = runner.run(batches, float(1.0 / double(std::max<int64_t>(valid, 1))),
                                   float(1.0 / double(micro)), [&] { optimizer.step(step, lrm); });
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

      StepLine line{step, cfg.train.steps, debiased, stats.bal, lrm, dt * 1e3, tok_sec, total_time_s / 60.0, mfu};
      std::cout << format_step_line(line) << std::endl;
      nlohmann::json rec = {{"event", "step"},  {"step", step},         {"steps", cfg.train.steps},
                            {"loss", debiased}, {"raw_loss", raw_loss}, {"bal", stats.bal},
                            {"lrm", lrm},       {"dt_ms", dt * 1e3},    {"tok_sec", tok_sec},
                            {"peak_mem_mib", peak_mib}, {"drop_rate", stats.drop_rate},
                            {"total_time_min", total_time_s / 60.0},    {"expert_load", stats.expert_load}};
      rec["mfu"] = mfu ? nlohmann::json(*mfu) : nlohmann::json(nullptr);
      metrics.append(rec);
      result.last_loss = debiased;
      result.last_raw_loss = raw_loss;

      const bool last = step + 1 == cfg.train.steps;
      if ((cfg.train.eval_every > 0 && (step + 1) % cfg.train.eval_every == 0) || last) {
        ValResult v = evaluate(be, model, *loader, cfg, val_tokens, val_targets);
        std::printf("step %05lld | validation loss: %.6f | bpb: %.4f\n", (long long)step, v.loss, v.bpb);
        std::fflush(stdout);
        metrics.append({{"event", "val"}, {"step", step}, {"val_loss", v.loss}, {"val_bpb", v.bpb}});
      }
      if ((cfg.train.checkpoint_every > 0 && (step + 1) % cfg.train.checkpoint_every == 0) ||
          (last && cfg.train.save_final)) {
        save(step + 1);
      }
      if (cfg.train.checkpoint_every > 0 && (step + 1) % cfg.train.checkpoint_every == 0) write_status(run_dir, status);
    }

    result.steps_done = step;
    result.peak_mem_mib = double(be.peak_memory_bytes()) / (1024.0 * 1024.0);
    result.total_time_min = total_time_s / 60.0;
    std::printf("Peak memory usage: %.2fMiB\nTotal training time: %.2fm\n", result.peak_mem_mib, result.total_time_min);
    std::fflush(stdout);
    metrics.append({{"event", "end"},
                    {"step", step - 1},
                    {"peak_mem_mib", result.peak_mem_mib},
                    {"total_time_min", result.total_time_min}});
    status.status = "completed";
    status.step = step;
    status.peak_mem_mib = result.peak_mem_mib;
    status.total_time_min = result.total_time_min;
    write_status(run_dir, status);
  } catch (const std::exception& e) {
    status.status = "failed";
    status.step = step;
    status.error = e.what();
    try {
      write_status(run_dir, status);
    } catch (...) {
    }
    throw;
  }
  return result;
}

}  // namespace moelab
