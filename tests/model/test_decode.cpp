// Incremental decoding (GptMoE::forward_decode with a KV cache) against the training forward over
// the whole sequence, in f64 on the CPU backend: a prompt, then one token at a time, must give at
// every position the logits whose cross-entropy the full forward computes there. The configs
// exercise every path decoding has: sliding windows shorter than the sequence, grouped kv heads,
// gated value embeddings, resid/x0 lambdas, MoE with a shared expert and dense layers.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "backend/cpu/cpu_backend.hpp"
#include "core/rng.hpp"
#include "model/gpt.hpp"
#include "common/config_builder.hpp"

namespace moelab {
namespace {

Config decode_config(bool seed_options) {
  // 4 query heads read 2 kv heads; window pattern SL: layers 0 and 2 see a window of
  // train.seq_len / 2 = 5 keys.
  Config c = test::with_keys(Config{}, "model.d_model=32 model.layers=4 model.head_dim=8 model.kv_heads=2 model.vocab=40 "
                                       "model.mlp_hidden=24 model.max_seq=32 model.window_pattern=SL "
                                       "model.ve_gate_channels=8 moe.experts=4 moe.top_k=2 moe.expert_hidden=12 "
                                       "moe.layers=1,2,3 moe.shared_hidden=10 moe.dispatch=dropless "
                                       "train.batch_size=1 train.seq_len=10");
  // The seed's options: value embeddings, scalar lambdas and the shared expert (all off by default).
  if (seed_options) c = test::with_keys(c, "model.value_embeddings=true model.scalar_lambdas=true moe.shared_expert=true");
  return c;
}

double logsumexp(const std::vector<double>& z) {
  const double m = *std::max_element(z.begin(), z.end());
  double s = 0;
  for (double x : z) s += std::exp(x - m);
  return m + std::log(s);
}

void check_decode_matches_full_forward(const Config& cfg, uint64_t seed) {
  const int64_t S = 24, prompt = 5;  // longer than the windows and than train.seq_len
  CpuBackend be(DType::f64, 2);
  GptMoE model(be, cfg, /*rows=*/1, /*seq_len=*/S);
  model.init_weights(seed, /*all_random=*/true);
  Rng rng(seed + 7);
  std::vector<int32_t> tokens(size_t(S + 1));
  for (auto& t : tokens) t = int32_t(rng.below(uint64_t(cfg.model.vocab)));

  // The reference: the training forward over all S positions; loss at t = CE(logits_t, tokens[t + 1]).
  Tensor tok = be.alloc({S}, DType::i32), tgt = be.alloc({S}, DType::i32);
  be.write_i32(tok, std::vector<int32_t>(tokens.begin(), tokens.begin() + S));
  be.write_i32(tgt, std::vector<int32_t>(tokens.begin() + 1, tokens.end()));
  model.begin_step();
  model.forward_eval(tok, tgt);
  const double* ref = model.losses().as<double>();

  GptMoE::KvCache cache = model.make_kv_cache(S);
  std::vector<double> got, want;
  std::vector<double> z = model.forward_decode(std::vector<int32_t>(tokens.begin(), tokens.begin() + prompt), cache);
  for (int64_t t = prompt - 1; t < S; ++t) {
    if (t >= prompt) z = model.forward_decode({tokens[size_t(t)]}, cache);
    ASSERT_EQ(int64_t(z.size()), cfg.model.vocab);
    got.push_back(logsumexp(z) - z[size_t(tokens[size_t(t + 1)])]);
    want.push_back(ref[t]);
  }
  EXPECT_EQ(cache.length, S);
  double err = 0, scale = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got[i])) << "position " << i + prompt - 1;
    err = std::max(err, std::abs(got[i] - want[i]));
    scale = std::max(scale, std::abs(want[i]));
  }
  ASSERT_GT(scale, 0.1);  // a real loss, not zeros on both sides
  EXPECT_LT(err / scale, 1e-12) << "normalized error of the decoded positions' losses";

  // The cache is full: one more position is refused, naming the limit.
  try {
    model.forward_decode({1}, cache);
    ADD_FAILURE() << "a position past the cache was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("past the cache"), std::string::npos) << e.what();
  }
}

TEST(Decode, KvCacheMatchesFullForwardPlain) { check_decode_matches_full_forward(decode_config(false), 11); }

TEST(Decode, KvCacheMatchesFullForwardSeedOptions) { check_decode_matches_full_forward(decode_config(true), 12); }

TEST(Decode, CapacityModelIsRefusedForDecoding) {
  Config cfg = decode_config(false);
  cfg.moe.dispatch = "capacity";
  cfg.moe.capacity_factor = 0.5;
  CpuBackend be(DType::f64, 1);
  GptMoE model(be, cfg, 1, 8);
  try {
    model.make_kv_cache(8);
    ADD_FAILURE() << "a capacity-planned model was accepted for decoding";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("moe.dispatch"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moelab
