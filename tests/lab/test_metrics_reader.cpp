// metrics.jsonl and status.json readers: normal files, files being written, damaged files.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "lab/metrics_reader.hpp"
#include "lab_test_util.hpp"

using namespace moelab::lab;

namespace {
RunRecord metrics_record(std::string_view text) { return labtest::record_of(text, parse_metrics_jsonl); }

std::string step_line(int step, double loss) {
  return "{\"event\": \"step\", \"step\": " + std::to_string(step) + ", \"steps\": 10, \"loss\": " + std::to_string(loss) +
         ", \"bal\": 0.01, \"dt_ms\": 100.5, \"tok_sec\": 2000, \"mfu\": null, \"drop_rate\": 0.25, "
         "\"expert_load\": [[0.5, 0.5], [0.75, 0.25]]}";
}
}  // namespace

TEST(MetricsReader, ReadsStepsAndEnd) {
  std::string text = step_line(0, 5.0) + "\n" + step_line(1, 4.0) + "\n{\"event\": \"val\", \"step\": 1, \"val_loss\": 4.1}\n" +
                     "{\"event\": \"end\", \"step\": 1, \"peak_mem_mib\": 42.5, \"total_time_min\": 0.25}\n";
  RunRecord rec = metrics_record(text);
  ASSERT_EQ(rec.steps.size(), 2u);
  EXPECT_EQ(rec.steps[1].step, 1);
  EXPECT_DOUBLE_EQ(rec.steps[1].loss, 4.0);
  EXPECT_DOUBLE_EQ(rec.steps[1].tok_sec, 2000);
  EXPECT_FALSE(known(rec.steps[1].mfu));  // null: no peak known on CPU
  ASSERT_EQ(rec.steps[1].expert_load.size(), 2u);
  EXPECT_DOUBLE_EQ(rec.steps[1].expert_load[1][0], 0.75);
  EXPECT_TRUE(rec.saw_end);
  EXPECT_DOUBLE_EQ(rec.peak_mem_mib, 42.5);
  EXPECT_DOUBLE_EQ(rec.total_time_min, 0.25);
  EXPECT_EQ(rec.planned_steps, 10);
  EXPECT_TRUE(rec.problems.empty());
}

TEST(MetricsReader, PartialLastLineIsNotAProblem) {
  std::string text = step_line(0, 5.0) + "\n" + step_line(1, 4.0).substr(0, 30);
  RunRecord rec = metrics_record(text);
  EXPECT_EQ(rec.steps.size(), 1u);
  EXPECT_TRUE(rec.problems.empty());
}

TEST(MetricsReader, DamagedLinesAreSkippedAndNoted) {
  std::string text = step_line(0, 5.0) + "\r\n" + "garbage {\n" + "{\"event\": \"step\", \"step\": \"x\"}\n" +
                     "{\"event\": \"step\", \"step\": 2, \"loss\": \"4,5\", \"tok_sec\": \"1,000\", \"dt_ms\": [1]}\r\n" +
                     std::string("\0\xff\xfe\n", 4) + step_line(3, 3.0) + "\n";
  RunRecord rec = metrics_record(text);
  ASSERT_EQ(rec.steps.size(), 3u);
  EXPECT_EQ(rec.steps[1].step, 2);
  EXPECT_FALSE(known(rec.steps[1].loss));  // "4,5" is not a number
  EXPECT_DOUBLE_EQ(rec.steps[1].tok_sec, 1000);
  EXPECT_FALSE(known(rec.steps[1].dt_ms));
  EXPECT_GE(rec.problems.size(), 2u);
  bool counted = false;
  for (const auto& p : rec.problems) counted = counted || p.find("2 unreadable line(s)") != std::string::npos;
  EXPECT_TRUE(counted);
}

TEST(MetricsReader, ResumedRunReplacesRepeatedSteps) {
  std::string text = step_line(0, 5) + "\n" + step_line(1, 4) + "\n" + step_line(2, 3) + "\n" + step_line(1, 3.9) + "\n" +
                     step_line(2, 2.9) + "\n";
  RunRecord rec = metrics_record(text);
  ASSERT_EQ(rec.steps.size(), 3u);
  EXPECT_DOUBLE_EQ(rec.steps[2].loss, 2.9);
}

TEST(StatusReader, ReadsStateAndError) {
  RunRecord rec;
  ASSERT_TRUE(parse_status_json(
      R"({"status": "failed", "step": 3, "steps": 140, "error": "exit code 1: bad key\nsecond line", "peak_mem_mib": null})", rec));
  EXPECT_EQ(rec.state, RunState::failed);
  EXPECT_EQ(rec.error, "exit code 1: bad key");
  EXPECT_EQ(rec.planned_steps, 140);
  RunRecord bad;
  EXPECT_FALSE(parse_status_json("{\"status\": \"runn", bad));
  EXPECT_EQ(bad.state, RunState::unknown);
  EXPECT_FALSE(bad.problems.empty());
}

// Validation events become the run's validation rows (a resumed run's repeats replaced); negative
// or infinite rates and durations are unknown, not averaged into the report.
TEST(MetricsReader, ValidationEventsAndImpossibleRates) {
  std::string text = step_line(0, 5.0) + "\n" +
                     "{\"event\": \"val\", \"step\": 0, \"val_loss\": 4.5, \"val_bpb\": 6.5}\n" +
                     "{\"event\": \"val\", \"step\": 4, \"val_loss\": 4.0, \"val_bpb\": 5.8}\n" +
                     "{\"event\": \"val\", \"step\": 4, \"val_loss\": 3.9, \"val_bpb\": 5.6}\n" +
                     "{\"event\": \"step\", \"step\": 5, \"loss\": 3.5, \"dt_ms\": -3, \"tok_sec\": \"-inf\"}\n";
  RunRecord rec = metrics_record(text);
  ASSERT_EQ(rec.vals.size(), 2u);
  EXPECT_EQ(rec.vals[1].step, 4);
  EXPECT_DOUBLE_EQ(rec.vals[1].loss, 3.9);
  EXPECT_DOUBLE_EQ(rec.vals[1].bpb, 5.6);
  ASSERT_EQ(rec.steps.size(), 2u);
  EXPECT_FALSE(known(rec.steps[1].dt_ms));
  EXPECT_FALSE(known(rec.steps[1].tok_sec));
  EXPECT_FALSE(rec.problems.empty());
}

// The routing statistics of a step (docs/ROUTING.md): per-layer lists in layer order, z_loss a
// number; absent keys leave them empty / unknown without a problem.
TEST(MetricsReader, RoutingStatistics) {
  std::string text =
      "{\"event\": \"step\", \"step\": 0, \"loss\": 5.0, \"expert_load\": [[0.5, 0.5], [0.75, 0.25]], "
      "\"max_vio\": [0.0, 0.5], \"router_entropy\": [0.69, 0.56], \"z_loss\": 4.25, \"bias_range\": [0.001, 0.002]}\n"
      "{\"event\": \"step\", \"step\": 1, \"loss\": 4.0, \"max_vio\": [0.125, 0.25], \"z_loss\": null}\n" +
      step_line(2, 3.0) + "\n";
  RunRecord rec;
  parse_metrics_jsonl(text, rec);
  ASSERT_EQ(rec.steps.size(), 3u);
  EXPECT_EQ(rec.steps[0].max_vio, (std::vector<double>{0.0, 0.5}));
  EXPECT_EQ(rec.steps[0].router_entropy, (std::vector<double>{0.69, 0.56}));
  EXPECT_EQ(rec.steps[0].bias_range, (std::vector<double>{0.001, 0.002}));
  EXPECT_DOUBLE_EQ(rec.steps[0].z_loss, 4.25);
  EXPECT_EQ(rec.steps[1].max_vio, (std::vector<double>{0.125, 0.25}));
  EXPECT_TRUE(rec.steps[1].router_entropy.empty());
  EXPECT_FALSE(known(rec.steps[1].z_loss));
  EXPECT_TRUE(rec.steps[2].max_vio.empty());  // an older line: no keys, no complaint
  EXPECT_TRUE(rec.problems.empty()) << rec.problems.front();
}

// A list of the wrong length, a string, an object: the value is dropped and the problem names
// the file, the line and the key.
TEST(MetricsReader, MalformedRoutingValuesNameTheLine) {
  std::string text = step_line(0, 5.0) + "\n" +
                     "{\"event\": \"step\", \"step\": 1, \"loss\": 4.0, \"max_vio\": [0.1, 0.2, 0.3]}\n" +
                     "{\"event\": \"step\", \"step\": 2, \"loss\": 3.9, \"max_vio\": \"0.1,0.2\", \"z_loss\": {}}\n" +
                     "{\"event\": \"step\", \"step\": 3, \"loss\": 3.8, \"router_entropy\": [0.5, 0.6], \"max_vio\": [1]}\n";
  RunRecord rec;
  parse_metrics_jsonl(text, rec);
  ASSERT_EQ(rec.steps.size(), 4u);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(rec.steps[i].max_vio.empty()) << i;
  // Line 4 has nothing before it to agree with: its first list sets the count, the other is dropped.
  EXPECT_EQ(rec.steps[3].max_vio, (std::vector<double>{1}));
  EXPECT_TRUE(rec.steps[3].router_entropy.empty());
  EXPECT_DOUBLE_EQ(rec.steps[3].loss, 3.8);
  const std::vector<std::string> want = {
      // step_line's expert_load has 2 layers; line 2 is checked against the line before it
      "metrics.jsonl line 2: max_vio has 3 values but the run has 2 MoE layers (as on line(s) before); shown as unknown",
      "metrics.jsonl line 3: max_vio is a string, not a list of one number per MoE layer; shown as unknown",
      "metrics.jsonl line 3: z_loss is an object, not a number; shown as unknown",
      "metrics.jsonl line 4: router_entropy has 2 values but the run has 1 MoE layers (as max_vio on this line); shown as "
      "unknown"};
  EXPECT_EQ(rec.problems, want);
}
