// `moelab sample` on the GPU: greedy decoding of a tiny trained model (grouped kv heads, a
// sliding-window layer, value embeddings and lambdas, MoE) gives the CPU's continuation token for
// token. The GPU multiplies in bf16 and the CPU in f32, so an exact match can break where the
// CPU's two best logits are closer than the GPU's rounding moves them; the test therefore also
// runs both models along the CPU's continuation, checks every step's logits by normalized error,
// and accepts a first differing token only at a step where the CPU's top-2 logits are within bf16
// rounding of each other (four bf16 ulps of the top logit); comparing stops at that step, which is
// printed. Skips without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "backend/cuda/cuda_backend.hpp"
#include "config/config.hpp"
#include "model/gpt.hpp"
#include "train/checkpoint.hpp"
#include "train/device_select.hpp"
#include "train/run_test_support.hpp"
#include "train/sample.hpp"
#include "train/trainer.hpp"

namespace moelab {
namespace {
namespace fs = std::filesystem;

constexpr int kNewTokens = 60;

std::vector<int32_t> greedy_ids(const std::string& run, const std::string& device, const std::vector<int32_t>& prompt) {
  SampleOptions o;
  o.run_dir = run;
  o.device = device;
  o.prompt_ids = prompt;
  o.max_tokens = kNewTokens;
  o.temperature = 0;
  std::vector<int32_t> ids;
  sample_run(o, [&](int32_t id, const std::string&) { ids.push_back(id); });
  return ids;
}

// A run's model built for decoding on one device, as sample_run builds it.
struct Decoder {
  Config cfg;
  std::unique_ptr<Backend> be;
  std::unique_ptr<GptMoE> model;
  GptMoE::KvCache cache;
  Decoder(const std::string& run, const std::string& device, int64_t prompt_len, int64_t positions)
      : cfg(decoding_config(run, device)), be(make_backend(cfg)) {
    model = std::make_unique<GptMoE>(*be, cfg, 1, prompt_len);
    load_weights(sample_weights_path(run), *be, model->params());
    model->refresh_compute_weights();
    cache = model->make_kv_cache(positions);
  }
};

int32_t argmax(const std::vector<double>& z) { return int32_t(std::max_element(z.begin(), z.end()) - z.begin()); }

TEST(CudaSample, GreedyContinuationMatchesTheCpu) {
  if (!CudaBackend::cuda_device_available()) GTEST_SKIP() << "no CUDA GPU on this machine";
  const fs::path dir = test::fresh_dir("gpu_sample");
  Config c = test::tiny_byte_config(test::write_words(
      dir, {"the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "it", "."}, 8000, 17));
  c.model.d_model = 128;
  c.model.head_dim = 64;        // 2 query heads
  c.model.kv_heads = 1;         // reading 1 kv head
  c.model.window_pattern = "SL";  // layer 0: a window of seq_len / 2 = 16 keys, which decoding runs past
  c.model.max_seq = 128;
  c.model.value_embeddings = true;
  c.model.scalar_lambdas = true;
  c.moe.expert_hidden = 128;
  c.train.batch_size = 4;
  c.train.steps = 60;
  c.train.save_final = true;
  validate_config(c);
  const fs::path run = dir / "run";
  run_training(c, run.string());

  std::vector<int32_t> prompt;
  for (unsigned char ch : std::string("the cat sat on")) prompt.push_back(int32_t(ch));
  const std::vector<int32_t> cpu_ids = greedy_ids(run.string(), "cpu", prompt);
  const std::vector<int32_t> gpu_ids = greedy_ids(run.string(), "cuda", prompt);
  ASSERT_EQ(cpu_ids.size(), size_t(kNewTokens));
  ASSERT_EQ(gpu_ids.size(), size_t(kNewTokens));

  // Both devices along the CPU's continuation.
  const int64_t positions = int64_t(prompt.size()) + kNewTokens;
  Decoder cpu(run.string(), "cpu", int64_t(prompt.size()), positions);
  Decoder gpu(run.string(), "cuda", int64_t(prompt.size()), positions);
  std::vector<double> zc = cpu.model->forward_decode(prompt, cpu.cache);
  std::vector<double> zg = gpu.model->forward_decode(prompt, gpu.cache);
  int compared = 0;
  for (int n = 0; n < kNewTokens; ++n) {
    SCOPED_TRACE("generated token " + std::to_string(n));
    ASSERT_EQ(zc.size(), zg.size());
    double diff2 = 0, ref2 = 0, worst = 0;
    for (size_t i = 0; i < zc.size(); ++i) {
      ASSERT_TRUE(std::isfinite(zg[i])) << "GPU logit " << i;
      diff2 += (zg[i] - zc[i]) * (zg[i] - zc[i]);
      ref2 += zc[i] * zc[i];
      worst = std::max(worst, std::fabs(zg[i] - zc[i]));
    }
    EXPECT_LT(std::sqrt(diff2 / ref2), 2e-2) << "GPU logits against the CPU's (bf16 through the whole model)";
    EXPECT_EQ(argmax(zc), cpu_ids[size_t(n)]) << "the CPU model here and sample_run disagree";
    if (gpu_ids[size_t(n)] != cpu_ids[size_t(n)]) {
      // The GPU's prefix was the CPU's up to here, so this is its own argmax at this step.
      EXPECT_EQ(argmax(zg), gpu_ids[size_t(n)]) << "the GPU model here and sample_run disagree";
      std::vector<double> top(zc);
      std::partial_sort(top.begin(), top.begin() + 2, top.end(), std::greater<double>());
      const double gap = top[0] - top[1];
      std::printf("GPU and CPU part at generated token %d: CPU top-2 gap %.3e, GPU's largest logit deviation %.3e\n", n,
                  gap, worst);
      // Within bf16 rounding: the gap is at most four bf16 ulps (2^-6 relative) of the top logit.
      const double tie = std::ldexp(std::max(std::fabs(top[0]), 1.0), -6);
      EXPECT_LE(gap, tie) << "the GPU chose " << gpu_ids[size_t(n)] << " where the CPU chose " << cpu_ids[size_t(n)]
                          << " by a margin beyond bf16 rounding";
      break;
    }
    ++compared;
    if (n + 1 == kNewTokens) break;
    zc = cpu.model->forward_decode({cpu_ids[size_t(n)]}, cpu.cache);
    zg = gpu.model->forward_decode({cpu_ids[size_t(n)]}, gpu.cache);
  }
  std::printf("GPU greedy equals CPU greedy for %d of %d generated tokens\n", compared, kNewTokens);
  RecordProperty("tokens_equal", compared);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moelab
