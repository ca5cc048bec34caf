// FLOPs per token and MFU against counts done by hand (nanochat's convention: 6 x the matmul
// weights a token passes through, lookups excluded and only top_k experts counted, plus
// 12 x heads x head_dim x the keys each layer attends), at the seed's d12 shape and at a small
// shape with sliding windows and grouped-query heads; and the MFU the trainer logs is
// 100 x that count x tokens/s / the peak.
#include <gtest/gtest.h>

#include <filesystem>

#include "backend/cpu/cpu_backend.hpp"
#include "config/config.hpp"
#include "model/gpt.hpp"
#include "train/trainer.hpp"
#include "run_test_support.hpp"
#include "common/config_builder.hpp"

namespace moelab {
namespace {
namespace fs = std::filesystem;

TEST(Flops, SeedShapeMatchesTheHandCount) {
  Config c = load_config(std::string(MOELAB_SOURCE_DIR) + "/configs/d12-seed.toml");
  c.device = "cpu";
  c.precision = "auto";
  validate_config(c);
  CpuBackend be(DType::f32, 1);
  // One sequence: the count depends on seq_len, not on the rows (weights are not initialized,
  // so the parameters' pages are never touched).
  GptMoE model(be, c, 1, c.train.seq_len);

  // d12: d_model 768, 12 heads of 64 (and 12 kv heads), vocab 32768, 8 experts of 1536, top 2.
  const int64_t attention = 768 * 768 * 4;            // c_q, c_k, c_v, c_proj
  const int64_t router = 8 * 768;                     // 8 expert logits
  const int64_t experts = 2 * (1536 * 768 + 768 * 1536);  // w_fc and w_proj of the 2 chosen
  const int64_t ve_gates = 6 * (12 * 32);             // layers 1, 3, .., 11: [kv heads, 32 channels]
  const int64_t lm_head = 32768 * 768;
  const int64_t active = 12 * (attention + router + experts) + ve_gates + lm_head;
  EXPECT_EQ(active, 110176512);
  EXPECT_EQ(model.active_matmul_params(), active);
  // window_pattern SSSL at seq_len 1024: layers 3, 7, 11 see 1024 keys, the other 9 see 512.
  const double spans = 9 * 512 + 3 * 1024;
  const double hand = 6.0 * double(active) + 12.0 * 12 * 64 * spans;
  EXPECT_EQ(hand, 731837952.0);
  EXPECT_EQ(model.flops_per_token(), hand);
}

Config windowed_gqa_config(const std::string& text) {
  // head_dim 128 of 512: 4 query heads over 2 kv heads.
  return test::with_keys(test::tiny_byte_config(text),
                         "model.d_model=512 model.head_dim=128 model.kv_heads=2 model.layers=4 model.window_pattern=SSSL "
                         "moe.expert_hidden=64 train.batch_size=2 train.threads=2 train.eval_every=0 train.save_final=false");
}

// d_model 512, 4 query heads and 2 kv heads of 128, 4 MoE layers of 4 experts (64 wide, top 2),
// vocab 256, seq_len 32 with windows of 16 on layers 0-2.
constexpr double kWindowedGqaHandCount = 6.0 * (4 * (512 * 512 + 2 * (512 * 256) + 512 * 512  // q, k, v, proj
                                                     + 4 * 512                                 // router
                                                     + 2 * (64 * 512 + 512 * 64))              // 2 experts
                                                + 256 * 512)                                   // lm_head
                                         + 12.0 * 4 * 128 * (16 + 16 + 16 + 32);

TEST(Flops, WindowsAndGroupedQueryMatchTheHandCountAndMfuFollowsIt) {
  static_assert(kWindowedGqaHandCount == 23347200.0);
  const fs::path dir = test::fresh_dir("flops");
  Config c = windowed_gqa_config(test::write_words(dir, {"a", "window", "sees", "half", "the", "keys", "."}, 3000, 5));
  c.train.steps = 4;
  c.train.peak_flops = 1e12;  // a made-up card, so the CPU logs an MFU
  validate_config(c);
  {
    CpuBackend be(DType::f32, 1);
    GptMoE model(be, c, c.train.batch_size, c.train.seq_len);
    EXPECT_EQ(model.flops_per_token(), kWindowedGqaHandCount);
  }
  run_training(c, (dir / "run").string());
  const auto steps = test::read_events(dir / "run", "step");
  ASSERT_EQ(steps.size(), 4u);
  for (const auto& s : steps) {
    ASSERT_TRUE(s["mfu"].is_number()) << s.dump();
    const double want = 100.0 * kWindowedGqaHandCount * s["tok_sec"].get<double>() / 1e12;
    EXPECT_NEAR(s["mfu"].get<double>(), want, 1e-9 * want) << s.dump();
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moelab
