// core/regex (PCRE2) against std::regex's ECMAScript grammar, which it replaced: the patterns the
// project uses and a set of general ones, on fresh random subjects built from each pattern's own
// pieces (so matches, near misses, \r and \n all occur), must find the same matches and groups.
#include <gtest/gtest.h>

#include <random>
#include <regex>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "core/regex.hpp"

namespace moelab {
namespace {

struct Case {
  std::string pattern;
  bool icase;
  std::vector<std::string> pieces;  // in an order whose concatenation matches; subjects mix them
};

const std::vector<Case>& cases() {
  static const std::vector<Case> all = {
      {R"(rank (\d+) of (\d+): (.*)$)", false, {"rank ", "0", " of ", "12", ": ", "loss is NaN", "\r", "\n", "x"}},
      {R"(process rank (\d+) with PID \d+ on node \S+ exited on signal (\d+)(?: \(([^)]*)\))?)", false,
       {"process rank ", "1", " with PID ", "42", " on node ", "vm", " exited on signal ", "9", " (Killed)", " (", ")",
        "."}},
      {R"(step_(\d{6,18})\.safetensors)", false, {"step_", "000012", ".safetensors", "1", "0000000000000000000", "x"}},
      {R"(relative difference ([0-9.eE+-]+))", false, {"relative difference ", "1.5e-07", "-", "x", "\n"}},
      {R"(^\s+((model|moe)\.[a-z_0-9]+) = )", false, {"  ", "\t", "model", "moe", ".", "top_k", "d_model", " = ", "2"}},
      {"out of memory|CUDA error", true, {"Out Of ", "memory", "cuda ", "ERROR", "error", "x", "\n"}},
      {"a.c$", false, {"a", "b", "c", "\r", "\n"}},
      {"^(a|ab)(c|bcd)(d*)$", false, {"a", "b", "c", "d"}},
      {R"((\w+)\s(\w+)?)", true, {"Ab", "_", " ", "\t", "9", "-"}},
  };
  return all;
}

// Half the subjects take the pieces in order, each kept with probability 0.8 (near matches and
// matches); the others draw up to 11 pieces at random.
std::string random_subject(const Case& c, std::mt19937_64& rng) {
  std::string s;
  if (rng() % 2) {
    for (const std::string& p : c.pieces)
      if (rng() % 5) s += p;
    return s;
  }
  const int n = int(rng() % 12);
  for (int i = 0; i < n; ++i) s += c.pieces[rng() % c.pieces.size()];
  return s;
}

// std::regex's answer as RegexMatch would give it: the matched groups' texts ("" where a group
// took no part) and which took part.
void expect_same(const Regex& ours, const std::optional<RegexMatch>& got, bool found, const std::smatch& m,
                 const std::string& subject) {
  ASSERT_EQ(got.has_value(), found) << "pattern " << ours.pattern() << " on \"" << subject << "\"";
  if (!found) return;
  ASSERT_EQ(got->size(), m.size()) << ours.pattern();
  for (size_t i = 0; i < m.size(); ++i) {
    EXPECT_EQ(got->matched(i), m[i].matched) << ours.pattern() << " group " << i << " on \"" << subject << "\"";
    EXPECT_EQ(got->str(i), m[i].str()) << ours.pattern() << " group " << i << " on \"" << subject << "\"";
  }
}

TEST(Regex, SearchAndFullMatchAgreeWithEcmaScriptOnRandomSubjects) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::vector<std::string> one_sided;  // patterns whose subjects all matched, or none did
  for (const Case& c : cases()) {
    const Regex ours(c.pattern, c.icase);
    const std::regex reference(c.pattern, c.icase ? std::regex::ECMAScript | std::regex::icase : std::regex::ECMAScript);
    int searched = 0;
    for (int trial = 0; trial < 3000; ++trial) {
      const std::string s = random_subject(c, rng);
      std::smatch m;
      const bool found = std::regex_search(s, m, reference);
      searched += found;
      expect_same(ours, ours.search(s), found, m, s);
      std::smatch w;
      const bool all = std::regex_match(s, w, reference);
      expect_same(ours, ours.full_match(s), all, w, s);
      if (::testing::Test::HasFailure()) return;
    }
    if (searched == 0 || searched == 3000) one_sided.push_back(c.pattern);
  }
  // The subjects must exercise both answers, or the agreement says little.
  EXPECT_TRUE(one_sided.empty()) << one_sided.size() << " pattern(s) saw one answer only, the first: " << one_sided[0];
}

TEST(Regex, LineEndsAndSkippedGroupsAsEcmaScript) {
  const Regex own(R"(rank (\d+) of (\d+): (.*)$)");
  EXPECT_FALSE(own.found_in("rank 0 of 2: boom\r"));  // `.` stops at \r and `$` is the end only
  EXPECT_FALSE(own.found_in("rank 0 of 2: boom\n"));
  auto m = own.search("moelab: error: rank 1 of 2: loss is NaN at step 3");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->str(1), "1");
  EXPECT_EQ(m->str(3), "loss is NaN at step 3");
  const Regex died(R"(signal (\d+)(?: \(([^)]*)\))?)");
  auto d = died.search("exited on signal 9.");
  ASSERT_TRUE(d);
  EXPECT_TRUE(d->matched(1));
  EXPECT_FALSE(d->matched(2));
  EXPECT_EQ(d->str(2), "");
  EXPECT_TRUE(Regex("OUT OF MEMORY", true).found_in("cuda: out of memory"));
  EXPECT_FALSE(Regex("OUT OF MEMORY").found_in("cuda: out of memory"));
  EXPECT_FALSE(Regex(R"(step_(\d{6,18})\.safetensors)").full_match("step_000012.safetensors.tmp"));
}

TEST(Regex, InvalidPatternThrowsNamingIt) {
  for (const char* bad : {"(", "a[", "*a", "a{2,1}"}) {
    try {
      Regex r(bad);
      ADD_FAILURE() << bad << " compiled";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(bad), std::string::npos) << e.what();
    }
    EXPECT_THROW(std::regex{bad}, std::regex_error) << bad << ": the reference accepts it";
  }
}

}  // namespace
}  // namespace moelab
