// The report end to end: a folder of nanochat logs gives the seed report's rows; run folders
// give CSVs, figures and the extra sections; damaged inputs still give a report.
#include <gtest/gtest.h>

#include "lab/plot.hpp"
#include "lab/report.hpp"
#include "lab_test_util.hpp"

using namespace moelab::lab;
using namespace moelab::lab::labtest;

namespace {

// A nanochat log whose tail values are known: `steps` lines with constant speed.
std::string nanochat_log(int steps, int total, double last_loss, const char* tok, const char* mfu, const char* dt, bool end) {
  std::string log = "Model config: ...\n";
  for (int i = 0; i < steps; ++i) {
    char line[400];
    std::snprintf(line, sizeof line,
                  "step %05d/%05d (%.2f%%) | loss: %.6f | bal: 0.0102 | lrm: 1.00 | dt: %sms | tok/sec: %s | mfu: %s | "
                  "epoch: 1 | total time: 0.10m\n",
                  i, total, 100.0 * i / total, i + 1 == steps ? last_loss : 10.0 - i * 0.01, dt, tok, mfu);
    log += line;
  }
  if (end) log += "Peak memory usage: 23231.91MiB\nTotal training time: 1.59m\n";
  return log;
}

bool is_png(const std::filesystem::path& p) {
  std::string head = read_text(p).substr(0, 8);
  return head == std::string("\x89PNG\r\n\x1a\n", 8) && std::filesystem::file_size(p) > 5000;
}

}  // namespace

TEST(Report, NanochatLogsGiveTheSeedTable) {
  auto dir = fresh_dir("nanochat") / "20260224_154946_moe-fp8-ablation";
  write_text(dir / "moe_fp8_noexperts_static.log", nanochat_log(140, 140, 4.6716, "982,070", "11.88", "537.80", true));
  write_text(dir / "moe_fp8_experts_dynamic.log",
             nanochat_log(1, 140, 10.3978, "12,912", "0.16", "40602.20", false) +
                 "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                 "InductorError: AssertionError: -859663773703483/1000000000000000\n");
  write_text(dir / "moe_fp8_dynamic_long.log", nanochat_log(251, 360, 3.6994, "934,082", "11.30", "565.30", false));
  age_file(dir / "moe_fp8_noexperts_static.log", 600);
  age_file(dir / "moe_fp8_experts_dynamic.log", 500);
  ReportOptions opt;
  opt.exp_dir = dir;
  opt.figures = false;
  ReportResult r = write_report(opt);
  std::string md = read_text(r.markdown);
  EXPECT_NE(md.find("| run | status | steps_observed | last_step | last_loss | tail50_tok/sec | tail50_mfu | tail50_dt_ms | "
                    "peak_mem_mib | total_time_min | last_val_loss | best_val_loss | last_val_bpb | best_val_bpb |\n"
                    "| --- | --- | ---: |"),
            std::string::npos)
      << md;
  EXPECT_NE(md.find("| moe_fp8_noexperts_static | completed | 140 | 139 | 4.6716 | 982070 | 11.88 | 537.8 | 23231.91 | 1.59 |"),
            std::string::npos)
      << md;
  EXPECT_NE(md.find("| moe_fp8_experts_dynamic | failed | 1 | 0 | 10.3978 | 12912 | 0.16 | 40602.2 | - | - |"), std::string::npos)
      << md;
  EXPECT_NE(md.find("| moe_fp8_dynamic_long | running | 251 | 250 | 3.6994 | 934082 | 11.30 | 565.3 | - | - |"), std::string::npos)
      << md;
  EXPECT_NE(md.find("- `moe_fp8_experts_dynamic` failed with: `InductorError: AssertionError: -859663773703483/1000000000000000`"),
            std::string::npos);
  EXPECT_NE(md.find("Experiment dir: `"), std::string::npos);
  EXPECT_NE(md.find("Generated at: 20"), std::string::npos);
  EXPECT_NE(md.find("`metrics/moe-fp8-ablation_steps.csv`"), std::string::npos);
  std::string csv = read_text(dir / "metrics" / "moe-fp8-ablation_summary.csv");
  // The CSV: unrounded numbers and the error line; the seed's Dynamic Compile Status section.
  // The routing columns come after the error line, so the older columns keep their places.
  EXPECT_NE(csv.find(",best_val_bpb,error,moe_layers,experts,tail50_drop_rate,"), std::string::npos) << csv;
  EXPECT_NE(csv.find("moe_fp8_experts_dynamic,failed,1,0,10.3978,12912,0.16,40602.2,,,,,,,"
                     "InductorError: AssertionError: -859663773703483/1000000000000000,"),
            std::string::npos)
      << csv;
  {  // tail means unrounded (the mean of 50 equal values need not print as that value)
    const std::string head = "moe_fp8_noexperts_static,completed,140,139,4.6716,982070,";
    const size_t at = csv.find(head);
    ASSERT_NE(at, std::string::npos) << csv;
    size_t used = 0;
    const std::string rest = csv.substr(at + head.size());
    EXPECT_NEAR(std::stod(rest, &used), 11.88, 1e-9);
    EXPECT_NEAR(std::stod(rest.substr(used + 1)), 537.8, 1e-9);
    EXPECT_NE(rest.find(",23231.91,1.59,,,,,,"), std::string::npos) << rest;
  }
  EXPECT_NE(md.find("## Dynamic Compile Status\n\n- `moe_fp8_experts_dynamic` failed with: `InductorError: "
                    "AssertionError: -859663773703483/1000000000000000`\n- `moe_fp8_dynamic_long` status: `running`\n"),
            std::string::npos)
      << md;
  EXPECT_EQ(md.find("- `moe_fp8_noexperts_static` status:"), std::string::npos) << md;
  std::string steps = read_text(dir / "metrics" / "moe-fp8-ablation_steps.csv");
  EXPECT_EQ(steps.rfind("run,step,loss,bal,dt_ms,tok_sec,mfu,", 0), 0u);
  EXPECT_NE(steps.find("moe_fp8_noexperts_static,139,4.671600,0.010200,537.80,982070,11.88,"), std::string::npos);
  std::filesystem::remove_all(dir.parent_path());
}

TEST(Report, RunFoldersGiveFiguresAndExtraSections) {
  auto dir = fresh_dir("runs");
  moelab::Rng rng(fresh_seed());
  for (const char* name : {"dropless", "capacity"}) {
    std::string m;
    for (int i = 0; i < 60; ++i) {
      double a = 0.25 + 0.2 * rng.uniform();
      char line[512];
      std::snprintf(line, sizeof line,
                    "{\"event\": \"step\", \"step\": %d, \"steps\": 60, \"loss\": %.4f, \"bal\": 0.01, \"dt_ms\": %.1f, "
                    "\"tok_sec\": %.0f, \"mfu\": null, \"drop_rate\": %.3f, \"expert_load\": [[%.3f, %.3f, 0.25, 0.25], "
                    "[0.25, 0.25, 0.25, 0.25]]}\n",
                    i, 5.5 - 0.03 * i + 0.1 * rng.normal(), 100 + 10 * rng.uniform(), 9000 + 500 * rng.uniform(),
                    name[0] == 'c' ? 0.05 : 0.0, a, 0.5 - a);
      m += line;
    }
    // Validation at steps 29 and 59; the capacity run validates 10% worse at the end.
    m += "{\"event\": \"val\", \"step\": 29, \"val_loss\": 4.5, \"val_bpb\": 1.5}\n";
    m += std::string("{\"event\": \"val\", \"step\": 59, \"val_loss\": ") + (name[0] == 'c' ? "4.4" : "4.0") +
         ", \"val_bpb\": " + (name[0] == 'c' ? "1.32" : "1.2") + "}\n";
    m += "{\"event\": \"end\", \"step\": 59, \"peak_mem_mib\": 120.5, \"total_time_min\": 0.12}\n";
    write_text(dir / name / "metrics.jsonl", m);
    write_text(dir / name / "status.json", "{\"status\": \"completed\", \"step\": 59, \"steps\": 60}");
    write_text(dir / name / "config.toml",
               std::string("[moe]\nexperts = 4\ndispatch = \"") + (name[0] == 'c' ? "capacity" : "dropless") + "\"\n");
  }
  write_text(dir / "experiment.json", R"({"name": "abl", "title": "Dispatch ablation", "baseline": "dropless", "runs": ["dropless", "capacity"]})");
  ReportOptions opt;
  opt.exp_dir = dir;
  opt.out_md = dir / "out" / "progress.md";
  opt.smooth = 0.9;
  ReportResult r = write_report(opt);
  std::string md = read_text(opt.out_md);
  EXPECT_EQ(md.rfind("# Dispatch ablation\n", 0), 0u);
  EXPECT_NE(md.find("| val_loss_vs_dropless | val_bpb_vs_dropless | tok/sec_vs_dropless |"), std::string::npos) << md;
  // last_val_loss, best_val_loss, last_val_bpb, best_val_bpb, then the changes against dropless.
  EXPECT_NE(md.find(" | 4.4000 | 4.4000 | 1.3200 | 1.3200 | +10.0% | +10.0% | "), std::string::npos) << md;
  std::string val = read_text(dir / "out" / "metrics" / "abl_val.csv");
  EXPECT_NE(val.find("capacity,59,4.400000,1.320000\n"), std::string::npos) << val;
  EXPECT_NE(md.find("## MoE Routing"), std::string::npos);
  EXPECT_NE(md.find("| capacity | 2 | 4 | 5.00% |"), std::string::npos) << md;
  EXPECT_NE(md.find("| run | moe.dispatch |"), std::string::npos) << md;
  EXPECT_NE(md.find("No failed runs."), std::string::npos);
  if (plots_available()) {
    for (const char* f : {"loss", "loss_tokens", "loss_delta", "toksec", "dt_ms", "drop_rate", "experts_capacity"})
      EXPECT_TRUE(is_png(dir / "out" / "figures" / (std::string("abl_") + f + ".png"))) << f;
    // No MFU was recorded (a CPU run): no empty chart for it.
    EXPECT_FALSE(std::filesystem::exists(dir / "out" / "figures" / "abl_mfu.png"));
    EXPECT_NE(md.find("- `figures/abl_loss.png`"), std::string::npos);
  } else {
    EXPECT_NE(md.find("figures skipped"), std::string::npos);
  }
  EXPECT_TRUE(std::filesystem::exists(dir / "out" / "metrics" / "abl_summary.csv"));
  std::filesystem::remove_all(dir);
}

TEST(Report, DamagedInputsStillGiveAReport) {
  auto dir = fresh_dir("damaged");
  write_text(dir / "a" / "metrics.jsonl", "{\"event\": \"step\", \"step\": 0, \"loss\": 1e999}\r\n{\"event\": \"st");
  write_text(dir / "a" / "status.json", "{\"status\": \"completed\"");
  write_text(dir / "b" / "status.json", "{\"status\": \"running\"}");
  write_text(dir / "bin.log", std::string(1000, '\0'));
  write_text(dir / "experiment.json", "not json");
  ReportOptions opt;
  opt.exp_dir = dir;
  ReportResult r = write_report(opt);
  std::string md = read_text(r.markdown);
  EXPECT_NE(md.find("## Unreadable Inputs"), std::string::npos);
  EXPECT_NE(md.find("experiment.json: not a JSON object"), std::string::npos);
  EXPECT_NE(md.find("`bin`: bin.log: binary data"), std::string::npos) << md;
  EXPECT_EQ(r.rows.size(), 3u);
  std::filesystem::remove_all(dir);
}
