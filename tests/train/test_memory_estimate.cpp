// The memory estimate that refuses a run too large for the host before anything is allocated:
// its parameter count is the model's own, its total is close to what a run really holds (the
// backend's tracked peak and the process's resident set), and the CLI refuses a model that would
// not fit with the estimate, the limit and the keys to change, writing nothing.
#include <gtest/gtest.h>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "model/gpt.hpp"
#include "run_test_support.hpp"
#include "train/device_select.hpp"
#include "train/memory_estimate.hpp"
#include "train/trainer.hpp"

namespace moelab {
namespace {
namespace fs = std::filesystem;

TEST(MemoryEstimate, ParameterCountIsTheModelsOwn) {
  Config base = test::tiny_byte_config("");
  std::vector<std::pair<std::string, std::function<void(Config&)>>> variants = {
      {"moe", [](Config&) {}},
      {"dense", [](Config& c) { c.moe.experts = 0; }},
      {"shared expert, every other layer", [](Config& c) {
         c.moe.shared_expert = true;
         c.moe.shared_hidden = 48;
         c.moe.layers = "1";
       }},
      {"value embeddings, lambdas, grouped kv", [](Config& c) {
         c.model.layers = 3;
         c.model.value_embeddings = true;
         c.model.ve_gate_channels = 8;
         c.model.scalar_lambdas = true;
         c.model.kv_heads = 1;
       }},
  };
  for (auto& [what, change] : variants) {
    Config c = base;
    change(c);
    validate_config(c);
    auto be = make_backend(c);
    GptMoE model(*be, c, c.train.batch_size, c.train.seq_len);
    EXPECT_EQ(int64_t(estimate_training_memory(c).params), model.params().numel()) << what;
  }
}

// A run large enough that its buffers, not the binary, dominate its memory: the estimate is
// within a factor of 2 of the backend's tracked peak and of the growth of the resident set.
TEST(MemoryEstimate, CloseToWhatARunHolds) {
  const fs::path dir = test::fresh_dir("mem_estimate");
  Config c = test::with_keys(test::tiny_byte_config(test::write_words(dir, {"a", "router", "sends", "tokens"}, 20000, 1)),
                             "model.d_model=256 model.layers=4 model.head_dim=64 model.max_seq=256 moe.experts=8 "
                             "moe.expert_hidden=512 train.seq_len=256 train.batch_size=8 train.steps=2 train.threads=1 "
                             "train.save_final=false");
  validate_config(c);
  const MemoryEstimate est = estimate_training_memory(c);
  ASSERT_GT(est.total_bytes(), 100e6) << "too small to measure against the process's own memory";

  int pipefd[2];
  ASSERT_EQ(pipe(pipefd), 0);
  pid_t child = fork();
  if (child == 0) {  // a process of its own, so its resident set holds this run alone
    close(pipefd[0]);
    rusage before{};
    getrusage(RUSAGE_SELF, &before);
    const TrainResult r = run_training(c, (dir / "run").string());
    rusage after{};
    getrusage(RUSAGE_SELF, &after);
    double out[2] = {r.peak_mem_mib * 1024 * 1024, double(after.ru_maxrss - before.ru_maxrss) * 1024};
    (void)!write(pipefd[1], out, sizeof out);
    _exit(0);
  }
  close(pipefd[1]);
  double measured[2] = {0, 0};
  ASSERT_EQ(read(pipefd[0], measured, sizeof measured), ssize_t(sizeof measured));
  int st = 0;
  waitpid(child, &st, 0);
  const double tracked = measured[0], rss = measured[1];
  std::printf("estimate %.1f MB (params %.1f, optimizer %.1f, activations %.1f); tracked peak %.1f MB; RSS growth %.1f MB\n",
              est.total_bytes() / 1e6, est.param_bytes / 1e6, est.optimizer_bytes / 1e6, est.activation_bytes / 1e6,
              tracked / 1e6, rss / 1e6);
  EXPECT_GT(est.total_bytes(), tracked / 2);
  EXPECT_LT(est.total_bytes(), tracked * 2);
  EXPECT_GT(est.total_bytes(), rss / 2);
  EXPECT_LT(est.total_bytes(), rss * 2);
  fs::remove_all(dir);
}

TEST(MemoryEstimate, TrainRefusesAModelTooLargeForTheHost) {
  const fs::path dir = test::fresh_dir("mem_refuse");
  // Under an 8 GiB address-space limit, so that a build without the check fails an allocation
  // instead of filling the machine's memory.
  const std::string cmd = "ulimit -v 8388608; " + std::string(MOELAB_BINARY) + " train --config " + MOELAB_SOURCE_DIR +
                          "/configs/tiny-cpu.toml --set data.source=bytes --set model.d_model=1048576 --out " +
                          (dir / "run").string() + " > " + (dir / "log").string() + " 2>&1";
  const int st = std::system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(st));
  EXPECT_EQ(WEXITSTATUS(st), 1);
  const std::string log = test::read_text(dir / "log");
  EXPECT_NE(log.find("the run needs about"), std::string::npos) << log;
  EXPECT_NE(log.find("GiB is available ("), std::string::npos) << log;
  EXPECT_NE(log.find("model.d_model"), std::string::npos) << log;
  EXPECT_FALSE(fs::exists(dir / "run")) << "the refused start left its folder";
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moelab

// A GPU run is held to the card's free memory: the check refuses what cannot fit, naming the
// estimate's parts, the free bytes and the card, and passes what fits. (The trainer takes the
// free bytes from the backend; on a device the CLI test in bench/gpu/tests_run.sh sees it.)
namespace moelab {
namespace {
TEST(MemoryEstimate, GpuRunIsHeldToTheCardsFreeMemory) {
  Config c = test::tiny_byte_config("");
  validate_config(c);
  const MemoryEstimate gpu = estimate_gpu_training_memory(c), cpu = estimate_training_memory(c);
  EXPECT_EQ(gpu.params, cpu.params);
  // f32 master and gradient plus a bf16 copy per value; activations in bf16.
  EXPECT_EQ(gpu.param_bytes, gpu.params * 10);
  EXPECT_EQ(gpu.activation_bytes * 2, cpu.activation_bytes);
  EXPECT_NO_THROW(check_device_memory_fits(c, gpu.total_bytes() * 1.01, "Test GPU"));
  try {
    check_device_memory_fits(c, gpu.total_bytes() * 0.5, "Test GPU");
    FAIL() << "a run needing twice the free memory was not refused";
  } catch (const Error& e) {
    const std::string m = e.what();
    for (const char* want : {"GPU memory", "is free on Test GPU", "parameters", "activations", "model.d_model",
                             "train.batch_size"})
      EXPECT_NE(m.find(want), std::string::npos) << want << " missing from: " << m;
  }
}
}  // namespace
}  // namespace moelab
