// nanochat stdout logs: the formats of the seed's runs, newer and older variants, crashes.
#include <gtest/gtest.h>

#include "lab/nanochat_log_reader.hpp"
#include "lab/run_summary.hpp"
#include "lab_test_util.hpp"

using namespace moelab::lab;

namespace {
RunRecord nanochat_record(std::string_view text) { return labtest::record_of(text, parse_nanochat_log); }
}  // namespace

TEST(NanochatLog, ReadsTheSeedFormat) {
  std::string log =
      "Vocab size: 65,536\n"
      "step 00000/00140 (0.00%) | loss: 10.397800 | bal: 0.0300 | lrm: 1.00 | dt: 40602.20ms | tok/sec: 12,912 | mfu: 0.16 | epoch: 1 | total time: 0.00m\n"
      "step 00139/00140 (99.29%) | loss: 4.671600 | bal: 0.0102 | lrm: 0.05 | dt: 537.80ms | tok/sec: 982,070 | mfu: 11.88 | epoch: 1 | total time: 1.59m\n"
      "Peak memory usage: 23231.91MiB\n"
      "Total training time: 1.59m\n";
  RunRecord rec = nanochat_record(log);
  ASSERT_EQ(rec.steps.size(), 2u);
  EXPECT_EQ(rec.steps[1].step, 139);
  EXPECT_EQ(rec.planned_steps, 140);
  EXPECT_DOUBLE_EQ(rec.steps[1].loss, 4.6716);
  EXPECT_DOUBLE_EQ(rec.steps[1].bal, 0.0102);
  EXPECT_DOUBLE_EQ(rec.steps[1].dt_ms, 537.8);
  EXPECT_DOUBLE_EQ(rec.steps[1].tok_sec, 982070);
  EXPECT_DOUBLE_EQ(rec.steps[1].mfu, 11.88);
  EXPECT_EQ(rec.state, RunState::completed);
  EXPECT_DOUBLE_EQ(rec.peak_mem_mib, 23231.91);
  EXPECT_DOUBLE_EQ(rec.total_time_min, 1.59);
}

// A log whose loss becomes nan is a diverged run, not missing data: failed, with the step named,
// and its last loss shown as nan, even though the run printed its end lines.
TEST(NanochatLog, ALossThatBecomesNanFailsTheRun) {
  std::string log =
      "step 00000/00003 (0.00%) | loss: 10.397800 | bal: 0.0300 | dt: 40.20ms | tok/sec: 12,912 | mfu: 0.16 | total time: 0.00m\n"
      "step 00001/00003 (33.33%) | loss: nan | bal: 0.0300 | dt: 40.20ms | tok/sec: 12,912 | mfu: 0.16 | total time: 0.00m\n"
      "step 00002/00003 (66.67%) | loss: nan | bal: 0.0300 | dt: 40.20ms | tok/sec: 12,912 | mfu: 0.16 | total time: 0.00m\n"
      "Peak memory usage: 231.91MiB\n"
      "Total training time: 0.01m\n";
  RunRecord rec;
  rec.name = "d";
  parse_nanochat_log(log, rec);
  ASSERT_EQ(rec.steps.size(), 3u);
  EXPECT_EQ(rec.diverged_step, 1);
  EXPECT_EQ(rec.state, RunState::failed);
  EXPECT_NE(rec.error.find("diverged: the loss is nan/inf from step 1"), std::string::npos) << rec.error;
  const RunSummary s = summarize_run(rec, 50);
  EXPECT_EQ(summary_cells(s, false, false)[4], "nan");
  EXPECT_EQ(summary_cells(s, false, false)[1], "failed");
}

TEST(NanochatLog, NewerAndOlderVariants) {
  std::string log =
      "step 00010/00100 (10.00%) | loss: 6.5 | lrm: 1.00 | dt: 500.00ms | tok/sec: 1,000,000 | bf16_mfu: 12.50 | epoch: 1 | total time: 0.10m | eta: 3.2m\r\n"
      "step 00011/00100 (11.00%) | loss: 6.4 | lrm: 1.00 | dt: 501.00ms | tok/sec: 999,000 | mfu: 12.40 | total time: 0.11m\r\n";
  RunRecord rec = nanochat_record(log);
  ASSERT_EQ(rec.steps.size(), 2u);
  EXPECT_DOUBLE_EQ(rec.steps[0].mfu, 12.5);
  EXPECT_DOUBLE_EQ(rec.steps[0].tok_sec, 1e6);
  EXPECT_FALSE(known(rec.steps[0].bal));
  EXPECT_EQ(rec.state, RunState::unknown);  // no end: the caller decides by the file's age
  EXPECT_FALSE(known(rec.total_time_min));
}

TEST(NanochatLog, TracebackGivesTheError) {
  std::string log =
      "step 00000/00140 (0.00%) | loss: 10.397800 | dt: 17434.80ms | tok/sec: 30,071 | mfu: 0.36\n"
      "Traceback (most recent call last):\n"
      "  File \"/x/base_train.py\", line 300, in <module>\n"
      "    loss = model(x, y)\n"
      "torch._dynamo.exc.BackendCompilerFailed: backend='inductor' raised:\n"
      "\n"
      "During handling of the above exception, another exception occurred:\n"
      "\n"
      "Traceback (most recent call last):\n"
      "  File \"/x/compile_fx.py\", line 10, in f\n"
      "InductorError: AssertionError: -168373925552093/200000000000000\n";
  RunRecord rec = nanochat_record(log);
  EXPECT_EQ(rec.state, RunState::failed);
  EXPECT_EQ(rec.error, "InductorError: AssertionError: -168373925552093/200000000000000");
  EXPECT_EQ(rec.steps.size(), 1u);
}

TEST(NanochatLog, WarningTracebackThenTrainingIsNotAFailure) {
  std::string log =
      "Traceback (most recent call last):\n  File \"w.py\", line 1\nUserWarning: something\n"
      "step 00000/00002 (0.00%) | loss: 5.0 | dt: 1.00ms | tok/sec: 10 | mfu: 0.01\n"
      "Total training time: 0.00m\n";
  RunRecord rec = nanochat_record(log);
  EXPECT_EQ(rec.state, RunState::completed);
}

TEST(NanochatLog, TruncatedAndMalformedLines) {
  std::string log =
      "step 00001/00010 (10.00%) | loss: 4.0 | dt: 5.00ms | tok/sec: 1,0x0 | mfu: abc\n"
      "step 0000\n"
      "step 00002/00010 (20.00%) | loss: 3.5 | dt: 5.0";
  RunRecord rec = nanochat_record(log);
  ASSERT_EQ(rec.steps.size(), 2u);
  EXPECT_FALSE(known(rec.steps[0].tok_sec));
  EXPECT_FALSE(known(rec.steps[0].mfu));
  EXPECT_DOUBLE_EQ(rec.steps[1].loss, 3.5);
  EXPECT_DOUBLE_EQ(rec.steps[1].dt_ms, 5.0);  // the cut line still gives what it has
  EXPECT_FALSE(rec.problems.empty());         // "step 0000" was unreadable
}

// Validation lines: moelab's own ("step N | validation loss: L | bpb: B", which once counted as
// an unreadable step line), nanochat's "Step N | Validation bpb: B" and its closing minimum.
TEST(NanochatLog, ValidationLinesOfMoelabAndNanochat) {
  std::string log =
      "step 00000/00040 (0.00%) | loss: 5.5 | dt: 10.00ms | tok/sec: 1,000 | total time: 0.00m\n"
      "step 00019 | validation loss: 4.712500 | bpb: 1.3200\n"
      "Step 00029 | Validation bpb: 1.2345\n"
      "step 00039/00040 (97.50%) | loss: 4.1 | dt: 10.00ms | tok/sec: -5 | total time: 0.01m\n"
      "Step 00039 | Validation bpb: 1.2500\n"
      "Minimum validation bpb: 1.2345\n"
      "Peak memory usage: 10.00MiB\n";
  RunRecord rec = nanochat_record(log);
  EXPECT_TRUE(rec.problems.empty()) << rec.problems.front();
  ASSERT_EQ(rec.vals.size(), 3u);
  EXPECT_EQ(rec.vals[0].step, 19);
  EXPECT_DOUBLE_EQ(rec.vals[0].loss, 4.7125);
  EXPECT_DOUBLE_EQ(rec.vals[0].bpb, 1.32);
  EXPECT_EQ(rec.vals[1].step, 29);
  EXPECT_FALSE(known(rec.vals[1].loss));
  EXPECT_DOUBLE_EQ(rec.vals[1].bpb, 1.2345);
  EXPECT_EQ(rec.vals[2].step, 39);
  EXPECT_DOUBLE_EQ(rec.min_val_bpb, 1.2345);
  ASSERT_EQ(rec.steps.size(), 2u);
  EXPECT_FALSE(known(rec.steps[1].tok_sec));  // a negative rate is never averaged in
}
