// Run Summary numbers: tail means against a long-double reference on random steps with gaps,
// and the tokens/s change against a baseline.
#include <gtest/gtest.h>

#include "lab/run_summary.hpp"
#include "lab_test_util.hpp"

using namespace moelab::lab;

namespace {
double reference_tail(const std::vector<StepRow>& steps, int64_t tail, double StepRow::*f) {
  long double sum = 0;
  int n = 0;
  for (size_t i = steps.size() > size_t(tail) ? steps.size() - size_t(tail) : 0; i < steps.size(); ++i)
    if (std::isfinite(steps[i].*f)) sum += steps[i].*f, ++n;
  return n ? double(sum / n) : kUnknown;
}

// Expects cells[i] to read `text` for each (i, text).
void expect_cells(const std::vector<std::string>& cells, std::initializer_list<std::pair<size_t, std::string>> want) {
  for (const auto& [i, text] : want) {
    ASSERT_LT(i, cells.size());
    EXPECT_EQ(cells[i], text) << "cell " << i;
  }
}
}  // namespace

TEST(RunSummary, TailMeansMatchReference) {
  moelab::Rng rng(labtest::fresh_seed());
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<StepRow> steps(rng.below(200) + 1);
    for (size_t i = 0; i < steps.size(); ++i) {
      steps[i].step = int64_t(i);
      steps[i].tok_sec = 1e5 * (1 + rng.uniform());
      steps[i].dt_ms = rng.uniform() < 0.2 ? kUnknown : 500 + 100 * rng.normal();
      steps[i].mfu = rng.uniform() < 0.5 ? kUnknown : 10 * rng.uniform();
    }
    int64_t tail = int64_t(rng.below(80) + 1);
    for (auto f : {&StepRow::tok_sec, &StepRow::dt_ms, &StepRow::mfu}) {
      double got = tail_mean(steps, tail, f), ref = reference_tail(steps, tail, f);
      if (!known(ref)) {
        EXPECT_FALSE(known(got));
        continue;
      }
      ASSERT_TRUE(known(got));
      EXPECT_LE(std::abs(got - ref) / std::abs(ref), 1e-12);
    }
  }
}

TEST(RunSummary, SummaryOfARun) {
  RunRecord rec;
  rec.name = "r";
  rec.state = RunState::completed;
  for (int i = 0; i < 140; ++i) {
    StepRow s;
    s.step = i;
    s.loss = 10.0 - i * 0.01;
    s.tok_sec = i < 90 ? 1.0 : 3.0;  // only the last 50 are 3
    s.dt_ms = 2.0;
    s.drop_rate = 0.1;
    s.expert_load = {{0.5, 0.25, 0.125, 0.125}};
    rec.steps.push_back(s);
  }
  RunSummary s = summarize_run(rec, 50);
  EXPECT_EQ(s.steps_observed, 140);
  EXPECT_EQ(s.last_step, 139);
  EXPECT_DOUBLE_EQ(s.tail_tok_sec, 3.0);
  EXPECT_FALSE(known(s.tail_mfu));
  EXPECT_DOUBLE_EQ(s.tail_load_imbalance, 2.0);  // 0.5 over a mean of 0.25
  EXPECT_EQ(s.experts, 4);
  auto cells = summary_cells(s, false);
  ASSERT_EQ(cells.size(), 14u);  // the last four: validation loss and bpb, last and best
  expect_cells(cells, {{4, "8.6100"}, {5, "3"}, {6, "-"}, {7, "2.0"}});
}

TEST(RunSummary, BaselineChange) {
  std::vector<RunSummary> rows(3);
  rows[0].name = "base", rows[0].tail_tok_sec = 1000;
  rows[1].name = "fast", rows[1].tail_tok_sec = 1500;
  rows[2].name = "none";
  compare_with_baseline(rows, "base");
  EXPECT_EQ(format_change(rows[0].tok_sec_change_pct), "+0.0%");
  EXPECT_EQ(format_change(rows[1].tok_sec_change_pct), "+50.0%");
  EXPECT_EQ(format_change(rows[2].tok_sec_change_pct), "-");
  compare_with_baseline(rows, "missing");
  EXPECT_FALSE(known(rows[1].tok_sec_change_pct));
  EXPECT_EQ(summary_columns(50, "base").back(), "tok/sec_vs_base");
}

// Validation columns: last and lowest, and their change against the baseline.
TEST(RunSummary, ValidationLastBestAndBaseline) {
  RunRecord a, b;
  a.name = "base";
  b.name = "other";
  a.vals = {{9, 5.0, 2.0}, {19, 4.0, 1.6}, {29, 4.2, 1.7}};
  b.vals = {{9, 4.8, 1.9}, {29, 3.6, 1.53}};
  b.min_val_bpb = 1.5;  // nanochat's closing line may know a lower one
  std::vector<RunSummary> rows = {summarize_run(a, 50), summarize_run(b, 50)};
  EXPECT_DOUBLE_EQ(rows[0].last_val_loss, 4.2);
  EXPECT_DOUBLE_EQ(rows[0].best_val_loss, 4.0);
  EXPECT_DOUBLE_EQ(rows[0].best_val_bpb, 1.6);
  EXPECT_DOUBLE_EQ(rows[1].best_val_bpb, 1.5);
  compare_with_baseline(rows, "base");
  EXPECT_EQ(format_change(rows[1].val_loss_change_pct), "-14.3%");
  EXPECT_EQ(format_change(rows[1].val_bpb_change_pct), "-10.0%");
  auto cols = summary_columns(50, "base");
  auto cells = summary_cells(rows[1], true);
  ASSERT_EQ(cols.size(), cells.size());
  EXPECT_EQ(cols[10], "last_val_loss");
  expect_cells(cells, {{10, "3.6000"}, {13, "1.5000"}});
}

// Repeats of one config: mean and sample standard deviation over the runs that have the number.
TEST(RunSummary, RepeatGroupsGiveMeanAndSpread) {
  std::vector<RunSummary> rows(5);
  rows[0].name = "cap", rows[0].last_val_loss = 4.0;
  rows[1].name = "cap_repeat", rows[1].last_val_loss = 4.2;
  rows[2].name = "cap_repeat2", rows[2].last_val_loss = 4.4;
  rows[3].name = "drop";  // alone: no group
  rows[4].name = "my_repeatable";  // not a repeat suffix
  auto groups = repeat_groups(rows);
  ASSERT_EQ(groups.size(), 1u);
  EXPECT_EQ(groups[0].name, "cap");
  EXPECT_EQ(groups[0].runs.size(), 3u);
  EXPECT_NEAR(groups[0].last_val_loss.mean, 4.2, 1e-12);
  EXPECT_NEAR(groups[0].last_val_loss.sd, 0.2, 1e-12);
  EXPECT_EQ(format_stat(groups[0].last_val_loss, 3), "4.200 ± 0.200 (n=3)");
  EXPECT_EQ(format_stat(groups[0].last_loss, 3), "-");
}
