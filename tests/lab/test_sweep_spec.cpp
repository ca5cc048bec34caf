// Sweep files: runs, grids, repeats, retry rules, and errors that name the field.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include <toml++/toml.h>

#include "core/error.hpp"
#include "lab/sweep_spec.hpp"

using namespace moelab::lab;

namespace {
SweepSpec parse(const std::string& text) { return sweep_from_toml_text(text, "/sweeps/s.toml"); }
std::string value(const Overrides& o, const std::string& k) {
  for (const auto& [key, v] : o)
    if (key == k) return v;
  return "<absent>";
}
std::string error_of(const std::string& text) {
  try {
    parse(text);
  } catch (const moelab::Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(SweepSpec, RunsGridRepeatsAndRules) {
  SweepSpec s = parse(R"(
name = "abl"
base = "../configs/tiny.toml"
repeat = 3
max_retries = 2
timeout = "10m"
workers = 2
set = { "train.threads" = 1, train = { steps = 20 } }
[[run]]
name = "drop"
set = { moe.dispatch = "dropless" }
[[grid]]
name = "cf{moe.capacity_factor}_k{moe.top_k}"
axes = { "moe.capacity_factor" = [1.0, 1.25], "moe.top_k" = [1, 2] }
set = { "moe.dispatch" = "capacity" }
[[on_failure]]
match = "graph"
set = { exec = "eager" }
[[on_failure]]
match = "signal 11"
)");
  EXPECT_EQ(s.name, "abl");
  EXPECT_EQ(s.base_config, std::filesystem::path("/sweeps/../configs/tiny.toml"));
  EXPECT_EQ(s.max_retries, 2);
  EXPECT_DOUBLE_EQ(s.timeout_s, 600);
  EXPECT_EQ(s.workers, 2);
  ASSERT_EQ(s.runs.size(), 15u);  // (1 + 4) configs x 3 repeats
  EXPECT_EQ(s.runs[0].name, "drop");
  EXPECT_EQ(s.runs[1].name, "drop_repeat");
  EXPECT_EQ(s.runs[2].name, "drop_repeat2");
  EXPECT_EQ(value(s.runs[0].overrides, "moe.dispatch"), "dropless");
  EXPECT_EQ(value(s.runs[0].overrides, "train.threads"), "1");
  EXPECT_EQ(value(s.runs[0].overrides, "train.steps"), "20");
  EXPECT_EQ(s.runs[3].name, "cf1.0_k1");
  EXPECT_EQ(s.runs[12].name, "cf1.25_k2");
  EXPECT_EQ(value(s.runs[12].overrides, "moe.capacity_factor"), "1.25");
  EXPECT_EQ(value(s.runs[12].overrides, "moe.dispatch"), "capacity");
  ASSERT_EQ(s.on_failure.size(), 2u);
  EXPECT_EQ(value(s.on_failure[0].set, "exec"), "eager");
  EXPECT_TRUE(s.on_failure[1].set.empty());
  EXPECT_TRUE(s.gpus.empty());
}

TEST(SweepSpec, GpusAndDefaults) {
  SweepSpec s = parse("base = \"b.toml\"\ndevices = [0, 3]\ntimeout = 90\n[[run]]\nname = \"a\"\n");
  EXPECT_EQ(s.name, "s");  // from the file name
  EXPECT_EQ(s.gpus, (std::vector<std::string>{"0", "3"}));
  EXPECT_DOUBLE_EQ(s.timeout_s, 90);
  EXPECT_EQ(s.max_retries, 0);
}

TEST(SweepSpec, ErrorsNameTheProblem) {
  EXPECT_NE(error_of("[[run]]\nname = \"a\"\n").find("missing base"), std::string::npos);
  EXPECT_NE(error_of("base = \"b\"\n").find("no runs"), std::string::npos);
  EXPECT_NE(error_of("base = \"b\"\nfoo = 1\n[[run]]\nname = \"a\"\n").find("unknown key \"foo\""), std::string::npos);
  EXPECT_NE(error_of("base = \"b\"\n[[run]]\nname = \"a/b\"\n").find("s.toml:2"), std::string::npos);
  EXPECT_NE(error_of("base = \"b\"\n[[run]]\nname = \"a\"\n[[run]]\nname = \"a\"\n").find("two runs"), std::string::npos);
  EXPECT_NE(error_of("base = \"b\"\ntimeout = \"5 weeks\"\n[[run]]\nname = \"a\"\n").find("not a duration"), std::string::npos);
  EXPECT_NE(error_of("base = \"b\"\n[[run]]\nname = \"a\"\n[[on_failure]]\nmatch = \"(\"\n").find("not a valid regex"),
            std::string::npos);
  EXPECT_NE(error_of("base = \"b\"\n[[grid]]\nname = \"x{nope}\"\naxes = { a = [1] }\n").find("{nope}"), std::string::npos);
  EXPECT_NE(error_of("base = \"b\"\nbaseline = \"zz\"\n[[run]]\nname = \"a\"\n").find("baseline \"zz\""), std::string::npos);
  EXPECT_NE(error_of("base = \"b\"\n[[run]]\nname = \"a\"\nset = { x = [1, 2] }\n").find("must be a string, number"),
            std::string::npos);
  EXPECT_NE(error_of("base = = \"b\"\n").find("s.toml:1"), std::string::npos);
}

// Repeats differ by seed: from the base config's seed, or from the run's own train.seed.
TEST(SweepSpec, RepeatsVaryTheSeed) {
  SweepSpec s = parse(R"(
base = "b.toml"
repeat = 3
[[run]]
name = "a"
[[run]]
name = "b"
set = { "train.seed" = 100 }
)");
  vary_repeat_seeds(s, 42);
  ASSERT_EQ(s.runs.size(), 6u);
  EXPECT_EQ(value(s.runs[0].overrides, "train.seed"), "<absent>");  // repeat 0 runs the config as named
  EXPECT_EQ(value(s.runs[1].overrides, "train.seed"), "43");
  EXPECT_EQ(value(s.runs[2].overrides, "train.seed"), "44");
  EXPECT_EQ(value(s.runs[3].overrides, "train.seed"), "100");
  EXPECT_EQ(value(s.runs[4].overrides, "train.seed"), "101");
  EXPECT_EQ(value(s.runs[5].overrides, "train.seed"), "102");
}

TEST(SweepSpec, OnlyKeepsTheNamedRunsInOrder) {
  const char* const three_runs = R"(
base = "b.toml"
[[run]]
name = "a"
[[run]]
name = "b"
set = { "train.seed" = 7 }
[[run]]
name = "c"
)";
  SweepSpec s = parse(three_runs);
  select_runs(s, {"c", "b"});
  ASSERT_EQ(s.runs.size(), 2u);
  EXPECT_EQ(s.runs[0].name, "b");  // the file's order, not the list's
  EXPECT_EQ(value(s.runs[0].overrides, "train.seed"), "7");
  EXPECT_EQ(s.runs[1].name, "c");
  SweepSpec t = parse(three_runs);
  try {
    select_runs(t, {"a", "zz"});
    ADD_FAILURE() << "an unknown run name was accepted";
  } catch (const moelab::Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("--only names no run \"zz\""), std::string::npos) << m;
    EXPECT_NE(m.find("its runs are: a, b, c"), std::string::npos) << m;
  }
  EXPECT_EQ(t.runs.size(), 3u);  // a refused selection changes nothing
}

// The routing sweeps (configs/routing-d12.toml and its CPU twin): the sweep file parses, both
// hold the same eight recipes, and every run computes the same expert hidden units per token
// (top_k x expert_hidden + shared experts x their width) and holds the same in all, from the
// base config's [moe] and the overrides. (Whether the engine accepts the routing keys is checked
// where configs validate: `moelab sweep --dry-run`.)
TEST(SweepSpec, RoutingSweepsKeepActiveParametersEqual) {
  struct Want {
    const char* file;
    int64_t active, total;
  };
  for (const Want& w : {Want{"routing-d12.toml", 2 * 1536, 8 * 1536}, Want{"routing-cpu.toml", 2 * 128, 8 * 128}}) {
    SCOPED_TRACE(w.file);
    const SweepSpec spec = load_sweep(std::filesystem::path(MOELAB_SOURCE_DIR) / "configs" / w.file);
    std::vector<std::string> names;
    for (const auto& r : spec.runs) names.push_back(r.name);
    EXPECT_EQ(names, (std::vector<std::string>{"softmax_aux", "sigmoid_auxfree", "sigmoid_auxfree_seqloss", "softmax_zloss",
                                               "no_balance", "shared1_routed7", "fine16_top4", "group16_top4"}));
    EXPECT_EQ(spec.baseline, "softmax_aux");
    const toml::table base = toml::parse_file(spec.base_config.string());
    for (const auto& run : spec.runs) {
      SCOPED_TRACE(run.name);
      auto get = [&](const std::string& key, int64_t fallback) {
        std::string v = value(run.overrides, "moe." + key);
        if (v != "<absent>") return int64_t(std::stoll(v));
        return base["moe"][key].value<int64_t>().value_or(fallback);
      };
      const int64_t experts = get("experts", 0), top_k = get("top_k", 0), hidden = get("expert_hidden", 0);
      const int64_t shared = get("shared_experts", 0), shared_hidden = get("shared_hidden", 0);
      const int64_t shared_width = shared_hidden > 0 ? shared_hidden : hidden;
      EXPECT_EQ(top_k * hidden + shared * shared_width, w.active);
      EXPECT_EQ(experts * hidden + shared * shared_width, w.total);
      const int64_t groups = get("groups", 1), topk_groups = get("topk_groups", 1);
      EXPECT_EQ(experts % groups, 0);
      EXPECT_LE(top_k, experts / groups * topk_groups);
    }
    // The sequence-loss run: balance_scope = sequence at the small coefficient.
    for (const auto& run : spec.runs)
      if (run.name == "sigmoid_auxfree_seqloss") {
        EXPECT_EQ(value(run.overrides, "moe.balance_scope"), "sequence");
        EXPECT_DOUBLE_EQ(std::stod(value(run.overrides, "moe.balance_coef")), 1e-4);
      }
  }
  // The twin: 200 steps on two threads, on the CPU.
  const SweepSpec cpu = load_sweep(std::filesystem::path(MOELAB_SOURCE_DIR) / "configs" / "routing-cpu.toml");
  EXPECT_TRUE(cpu.gpus.empty());
  for (const auto& run : cpu.runs) {
    EXPECT_EQ(value(run.overrides, "train.steps"), "200");
    EXPECT_EQ(value(run.overrides, "train.threads"), "2");
  }
}
