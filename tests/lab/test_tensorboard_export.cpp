// `moelab report --tensorboard DIR`: runs that were not logged to TensorBoard (a run folder's
// metrics.jsonl, a nanochat log) come out as event files that the tests' own reader
// (tests/core/tensorboard_reader.hpp: framing, both CRCs, the protobuf fields) reads back with
// every scalar at its step and value; a second report replaces the files rather than adding to them.
#include <gtest/gtest.h>

#include <map>
#include <tuple>

#include "core/error.hpp"
#include "core/tensorboard_reader.hpp"
#include "lab/report.hpp"
#include "lab/tensorboard_export.hpp"
#include "lab_test_util.hpp"

using namespace moelab::lab;
using namespace moelab::lab::labtest;

namespace {

namespace fs = std::filesystem;
using Key = std::tuple<std::string, int64_t>;  // (tag, step)

RunRecord named(const std::string& name) {
  RunRecord r;
  r.name = name;
  return r;
}

std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

std::map<Key, float> read_back(const fs::path& file, int* records = nullptr) {
  std::string version;
  int n = 0;
  std::map<Key, float> out;
  for (const auto& s : moelab::test::read_tensorboard_events(file, version, n)) {
    EXPECT_TRUE(out.emplace(Key{s.tag, s.step}, s.value).second) << "duplicate " << s.tag << " at step " << s.step;
  }
  EXPECT_EQ(version, "brain.Event:2");
  if (records) *records = n;
  return out;
}

TEST(ReportTensorBoard, MetricsAndNanochatLogsReadBackAsWritten) {
  const fs::path dir = fresh_dir("tb_export") / "exp";
  moelab::Rng rng(fresh_seed());
  std::map<Key, float> want_run, want_log;
  // A run folder: steps with loss, bal, dt, tok/s, MFU (null on a CPU: left out) and drop rate;
  // two validations.
  std::string m;
  for (int i = 0; i < 25; ++i) {
    const std::string loss = fmt("%.6f", 6 - 0.1 * i + 0.05 * rng.normal()), bal = fmt("%.5f", 0.01 * rng.uniform());
    const std::string dt = fmt("%.2f", 100 + 10 * rng.uniform()), tok = fmt("%.0f", 9000 + 500 * rng.uniform());
    const std::string drop = fmt("%.4f", 0.1 * rng.uniform());
    m += "{\"event\": \"step\", \"step\": " + std::to_string(i) + ", \"steps\": 25, \"loss\": " + loss + ", \"bal\": " + bal +
         ", \"dt_ms\": " + dt + ", \"tok_sec\": " + tok + ", \"mfu\": null, \"drop_rate\": " + drop + "}\n";
    want_run[{"train/loss", i}] = float(std::stod(loss));
    want_run[{"train/balance_loss", i}] = float(std::stod(bal));
    want_run[{"train/dt_ms", i}] = float(std::stod(dt));
    want_run[{"train/tok_per_sec", i}] = float(std::stod(tok));
    want_run[{"train/drop_rate", i}] = float(std::stod(drop));
  }
  for (int step : {11, 24}) {
    const std::string vl = fmt("%.5f", 4 + rng.uniform()), vb = fmt("%.5f", 1 + rng.uniform());
    m += "{\"event\": \"val\", \"step\": " + std::to_string(step) + ", \"val_loss\": " + vl + ", \"val_bpb\": " + vb + "}\n";
    want_run[{"val/loss", step}] = float(std::stod(vl));
    want_run[{"val/bpb", step}] = float(std::stod(vb));
  }
  m += "{\"event\": \"end\", \"step\": 24, \"peak_mem_mib\": 12.5, \"total_time_min\": 0.1}\n";
  write_text(dir / "dropless" / "metrics.jsonl", m);
  write_text(dir / "dropless" / "status.json", "{\"status\": \"completed\", \"step\": 24, \"steps\": 25}");
  // A nanochat log: steps with loss, bal, dt, tok/sec and MFU.
  std::string log = "Model config: ...\n";
  for (int i = 0; i < 12; ++i) {
    const std::string loss = fmt("%.6f", 10 - 0.2 * i + 0.05 * rng.normal()), mfu = fmt("%.2f", 10 + rng.uniform());
    const std::string dt = fmt("%.2f", 500 + 50 * rng.uniform());
    const int tok = 900000 + int(50000 * rng.uniform());
    char line[400];
    std::snprintf(line, sizeof line,
                  "step %05d/00012 (%.2f%%) | loss: %s | bal: 0.0102 | lrm: 1.00 | dt: %sms | tok/sec: %d,%03d | mfu: %s "
                  "| epoch: 1 | total time: 0.10m\n",
                  i, 100.0 * i / 12, loss.c_str(), dt.c_str(), tok / 1000, tok % 1000, mfu.c_str());
    log += line;
    want_log[{"train/loss", i}] = float(std::stod(loss));
    want_log[{"train/balance_loss", i}] = 0.0102f;
    want_log[{"train/dt_ms", i}] = float(std::stod(dt));
    want_log[{"train/tok_per_sec", i}] = float(tok);
    want_log[{"train/mfu", i}] = float(std::stod(mfu));
  }
  log += "Peak memory usage: 23231.91MiB\nTotal training time: 1.59m\n";
  write_text(dir / "nanochat_run.log", log);

  ReportOptions opt;
  opt.exp_dir = dir;
  opt.figures = false;
  opt.tensorboard = dir.parent_path() / "tb";
  write_report(opt);
  const fs::path run_file = tensorboard_file(opt.tensorboard, named("dropless"));
  const fs::path log_file = tensorboard_file(opt.tensorboard, named("nanochat_run"));
  ASSERT_TRUE(fs::exists(run_file)) << run_file;
  ASSERT_TRUE(fs::exists(log_file)) << log_file;
  int records = 0;
  EXPECT_EQ(read_back(run_file, &records), want_run);
  EXPECT_EQ(records, int(want_run.size()) + 1);  // one scalar a record, after the file_version record
  EXPECT_EQ(read_back(log_file), want_log);

  // Reporting again rewrites each run's one file: same scalars, no second file.
  write_report(opt);
  EXPECT_EQ(read_back(run_file), want_run);
  int files = 0;
  for (const auto& e : fs::directory_iterator(run_file.parent_path())) files += e.is_regular_file();
  EXPECT_EQ(files, 1);
  fs::remove_all(dir.parent_path());
}

TEST(ReportTensorBoard, NeverWritesIntoARunFolder) {
  const fs::path dir = fresh_dir("tb_refuse");
  write_text(dir / "run" / "metrics.jsonl", "{\"event\": \"step\", \"step\": 0, \"loss\": 5.0}\n");
  Experiment ex;
  ex.runs.push_back(named("run"));
  EXPECT_THROW(write_tensorboard(ex, dir / "run"), moelab::Error);
  EXPECT_FALSE(fs::exists(tensorboard_file(dir / "run", ex.runs[0])));
  fs::remove_all(dir);
}

}  // namespace
