// Replays every file of the fuzz corpus (tests/lab/fuzz/corpus) through the same bodies the
// libFuzzer targets run, so CI covers the readers' robustness without clang; plus a short
// random-bytes pass with fresh inputs.
#include <gtest/gtest.h>

#include <filesystem>

#include "lab/fuzz/fuzz_entry.hpp"
#include "lab_test_util.hpp"

namespace {

size_t replay(const char* sub, int (*body)(const uint8_t*, size_t)) {
  auto dir = std::filesystem::path(MOELAB_SOURCE_DIR) / "tests/lab/fuzz/corpus" / sub;
  size_t n = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    std::string bytes = moelab::lab::labtest::read_text(e.path());
    SCOPED_TRACE(e.path().string());
    body(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
    ++n;
  }
  return n;
}

}  // namespace

TEST(FuzzCorpus, MetricsReaderSurvivesCorpus) { EXPECT_GE(replay("metrics", moelab::lab::fuzz::metrics_input), 5u); }

TEST(FuzzCorpus, NanochatReaderSurvivesCorpus) { EXPECT_GE(replay("nanochat", moelab::lab::fuzz::nanochat_input), 5u); }

TEST(FuzzCorpus, RandomMutationsOfCorpusFiles) {
  moelab::Rng rng(moelab::lab::labtest::fresh_seed());
  auto dir = std::filesystem::path(MOELAB_SOURCE_DIR) / "tests/lab/fuzz/corpus";
  std::vector<std::string> seeds;
  for (const char* sub : {"metrics", "nanochat"})
    for (const auto& e : std::filesystem::directory_iterator(dir / sub)) seeds.push_back(moelab::lab::labtest::read_text(e.path()));
  ASSERT_FALSE(seeds.empty());
  size_t parsed_steps = 0;
  for (int i = 0; i < 300; ++i) {
    std::string s = seeds[rng.below(seeds.size())];
    for (int k = int(rng.below(8)); k >= 0 && !s.empty(); --k) {
      size_t at = rng.below(s.size());
      switch (rng.below(4)) {
        case 0: s[at] = char(rng.below(256)); break;
        case 1: s.erase(at, rng.below(16)); break;
        case 2: s.insert(at, s.substr(rng.below(s.size()), rng.below(32))); break;
        default: s.resize(at); break;  // cut mid-line, as a file being written
      }
    }
    auto* p = reinterpret_cast<const uint8_t*>(s.data());
    moelab::lab::fuzz::metrics_input(p, s.size());
    moelab::lab::fuzz::nanochat_input(p, s.size());
    moelab::lab::RunRecord rec;
    moelab::lab::parse_nanochat_log(s, rec);
    parsed_steps += rec.steps.size();
  }
  EXPECT_GT(parsed_steps, 0u);  // the mutations left enough intact to exercise the step parser
}
