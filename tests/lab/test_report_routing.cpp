// The report's MoE Routing section from synthetic run folders: MaxVio (worst layer and per layer),
// router entropy, z-loss, bias range and drop rate, final and mean, checked against numbers the
// test computes itself from the values it wrote; the MaxVio figure; the CSV and TensorBoard
// columns; older and dense runs without the keys; malformed values named by file and line.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <sstream>
#include <vector>

#include "core/tensorboard_reader.hpp"
#include "lab/plot.hpp"
#include "lab/report.hpp"
#include "lab/tensorboard_export.hpp"
#include "lab_test_util.hpp"

using namespace moelab::lab;
using namespace moelab::lab::labtest;

namespace {

namespace fs = std::filesystem;

std::string num(double v) {
  char b[64];
  std::snprintf(b, sizeof b, "%.17g", v);  // reads back as the same double
  return b;
}

std::string list(const std::vector<double>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + num(v[i]);
  return s + "]";
}

std::string fixed(double v, int decimals) {
  char b[64];
  std::snprintf(b, sizeof b, "%.*f", decimals, v);
  return b;
}

// What the test wrote for one run, step by step.
struct Written {
  std::vector<std::vector<double>> max_vio, entropy, bias;  // [step][layer]
  std::vector<double> z_loss, drop;
};

// A run folder with `steps` random step records over `layers` MoE layers of 8 experts.
Written write_run(const fs::path& dir, moelab::Rng& rng, int steps, int layers, bool aux_free, bool capacity) {
  Written w;
  std::string m;
  for (int i = 0; i < steps; ++i) {
    std::vector<double> vio, ent, bias, load_row;
    for (int l = 0; l < layers; ++l) {
      vio.push_back(3.0 * rng.uniform() / (1 + 0.1 * i));
      ent.push_back(std::log(8.0) * (0.5 + 0.5 * rng.uniform()));
      bias.push_back(0.02 * rng.uniform() * i);
    }
    double z = 2 + 5 * rng.uniform(), drop = capacity ? 0.2 * rng.uniform() : 0.0;
    std::string load = "[";
    for (int l = 0; l < layers; ++l) load += std::string(l ? ", " : "") + "[0.125, 0.125, 0.125, 0.125, 0.125, 0.125, 0.125, 0.125]";
    load += "]";
    m += "{\"event\": \"step\", \"step\": " + std::to_string(i) + ", \"steps\": " + std::to_string(steps) +
         ", \"loss\": " + num(6 - 0.01 * i) + ", \"bal\": 0.01, \"dt_ms\": 100, \"tok_sec\": 1000, \"mfu\": null, " +
         "\"drop_rate\": " + num(drop) + ", \"expert_load\": " + load + ", \"max_vio\": " + list(vio) +
         ", \"router_entropy\": " + list(ent) + ", \"z_loss\": " + num(z) + (aux_free ? ", \"bias_range\": " + list(bias) : "") +
         "}\n";
    w.max_vio.push_back(vio);
    w.entropy.push_back(ent);
    if (aux_free) w.bias.push_back(bias);
    w.z_loss.push_back(z);
    w.drop.push_back(drop);
  }
  m += "{\"event\": \"end\", \"step\": " + std::to_string(steps - 1) + ", \"peak_mem_mib\": 10, \"total_time_min\": 0.1}\n";
  write_text(dir / "metrics.jsonl", m);
  write_text(dir / "status.json", "{\"status\": \"completed\", \"step\": " + std::to_string(steps - 1) + "}");
  return w;
}

// The expected summary, computed here from the written values (not with the lab's code).
struct Expected {
  double vio_final, vio_mean, ent_final, ent_mean, z_final, z_mean, bias_final, drop_final, drop_mean;
  std::vector<double> vio_layer_final, vio_layer_mean;
};

Expected expect(const Written& w) {
  Expected e{};
  const size_t n = w.max_vio.size(), layers = w.max_vio[0].size();
  double vio_sum = 0, ent_sum = 0, z_sum = 0, drop_sum = 0;
  e.vio_layer_mean.assign(layers, 0);
  for (size_t i = 0; i < n; ++i) {
    double worst = -1, mean_ent = 0;
    for (size_t l = 0; l < layers; ++l) {
      worst = std::max(worst, w.max_vio[i][l]);
      mean_ent += w.entropy[i][l] / double(layers);
      e.vio_layer_mean[l] += w.max_vio[i][l] / double(n);
    }
    vio_sum += worst;
    ent_sum += mean_ent;
    z_sum += w.z_loss[i];
    drop_sum += w.drop[i];
    if (i + 1 == n) {
      e.vio_final = worst;
      e.ent_final = mean_ent;
    }
  }
  e.vio_mean = vio_sum / double(n);
  e.ent_mean = ent_sum / double(n);
  e.z_final = w.z_loss.back();
  e.z_mean = z_sum / double(n);
  e.drop_final = w.drop.back();
  e.drop_mean = drop_sum / double(n);
  e.vio_layer_final = w.max_vio.back();
  e.bias_final = w.bias.empty() ? NAN : *std::max_element(w.bias.back().begin(), w.bias.back().end());
  return e;
}

bool is_png(const fs::path& p) {
  std::string head = read_text(p).substr(0, 8);
  return head == std::string("\x89PNG\r\n\x1a\n", 8) && fs::file_size(p) > 5000;
}

// The cells of the markdown table row that starts with "| name |".
std::vector<std::string> md_row(const std::string& md, const std::string& name) {
  size_t at = md.find("\n| " + name + " |");
  if (at == std::string::npos) return {};
  std::string line = md.substr(at + 1, md.find('\n', at + 1) - at - 1);
  std::vector<std::string> cells;
  std::stringstream ss(line.substr(1));
  std::string c;
  while (std::getline(ss, c, '|')) cells.push_back(c.substr(1, c.size() - 2));
  return cells;
}

// The CSV row of `name` split at commas, keyed by the header's column names.
std::map<std::string, std::string> csv_row(const std::string& csv, const std::string& name) {
  std::vector<std::string> lines;
  std::stringstream ss(csv);
  for (std::string l; std::getline(ss, l);) lines.push_back(l);
  auto split = [](const std::string& l) {
    std::vector<std::string> out;
    std::stringstream s(l);
    for (std::string c; std::getline(s, c, ',');) out.push_back(c);
    if (!l.empty() && l.back() == ',') out.push_back("");
    return out;
  };
  std::map<std::string, std::string> row;
  auto head = split(lines.at(0));
  for (size_t i = 1; i < lines.size(); ++i) {
    auto cells = split(lines[i]);
    if (cells.empty() || cells[0] != name) continue;
    EXPECT_EQ(cells.size(), head.size()) << lines[i];
    for (size_t c = 0; c < std::min(cells.size(), head.size()); ++c) row[head[c]] = cells[c];
  }
  return row;
}

double rel_err(double got, double want) { return std::abs(got - want) / std::max(std::abs(want), 1e-12); }

}  // namespace

TEST(ReportRouting, SectionFigureAndCsvShowTheRoutingNumbers) {
  const fs::path dir = fresh_dir("routing") / "exp";
  moelab::Rng rng(fresh_seed());
  const int layers = 2 + int(rng.below(4));
  const int steps_a = 20 + int(rng.below(30)), steps_b = 20 + int(rng.below(30));
  // Two routing runs (aux loss with capacity drops; aux_free with its bias), an older MoE run
  // that logged only expert_load, and a dense run (drop rate 0, nothing else).
  const Written aux = write_run(dir / "softmax_aux", rng, steps_a, layers, false, true);
  const Written free = write_run(dir / "sigmoid_auxfree", rng, steps_b, layers, true, false);
  std::string old, dense;
  for (int i = 0; i < 10; ++i) {
    old += "{\"event\": \"step\", \"step\": " + std::to_string(i) +
           ", \"loss\": 5.0, \"drop_rate\": 0.0, \"expert_load\": [[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]]}\n";
    dense += "{\"event\": \"step\", \"step\": " + std::to_string(i) + ", \"loss\": 5.5, \"drop_rate\": 0.0, \"expert_load\": []}\n";
  }
  write_text(dir / "old_moe" / "metrics.jsonl", old);
  write_text(dir / "dense" / "metrics.jsonl", dense);
  for (const char* name : {"old_moe", "dense"}) write_text(dir / name / "status.json", "{\"status\": \"completed\", \"step\": 9}");
  write_text(dir / "experiment.json",
             R"({"name": "routing", "title": "Routing", "runs": ["softmax_aux", "sigmoid_auxfree", "old_moe", "dense"]})");

  ReportOptions opt;
  opt.exp_dir = dir;
  opt.tensorboard = dir.parent_path() / "tb";
  ReportResult r = write_report(opt);
  const std::string md = read_text(r.markdown);
  ASSERT_NE(md.find("## MoE Routing"), std::string::npos) << md;
  EXPECT_EQ(md.find("## Unreadable Inputs"), std::string::npos) << md;  // well-formed inputs: no complaint
  const std::string section = md.substr(md.find("## MoE Routing"));

  // The table: the routing runs' numbers as computed here.
  const std::vector<std::string> head = md_row(section, "run");
  ASSERT_GE(head.size(), 14u) << md;
  EXPECT_EQ(head[5], "max_vio_final");
  for (const auto& [name, w] : {std::pair{"softmax_aux", &aux}, std::pair{"sigmoid_auxfree", &free}}) {
    SCOPED_TRACE(name);
    const Expected e = expect(*w);
    const auto row = md_row(section, name);
    ASSERT_EQ(row.size(), head.size()) << md;
    EXPECT_EQ(row[1], std::to_string(layers));
    EXPECT_EQ(row[2], "8");
    EXPECT_EQ(row[5], fixed(e.vio_final, 3));
    EXPECT_EQ(row[6], fixed(e.vio_mean, 3));
    EXPECT_EQ(row[7], fixed(e.ent_final, 3));
    EXPECT_EQ(row[8], fixed(e.ent_mean, 3));
    EXPECT_EQ(row[9], fixed(e.z_final, 3));
    EXPECT_EQ(row[10], fixed(e.z_mean, 3));
    EXPECT_EQ(row[11], std::isnan(e.bias_final) ? "-" : fixed(e.bias_final, 4));
    EXPECT_EQ(row[12], fixed(e.drop_final * 100, 2) + "%");
    EXPECT_EQ(row[13], fixed(e.drop_mean * 100, 2) + "%");
    // Per layer: "final / mean" for each MoE layer.
    size_t at = section.find("MaxVio per MoE layer");
    ASSERT_NE(at, std::string::npos);
    const auto lrow = md_row(section.substr(at), name);
    ASSERT_EQ(lrow.size(), size_t(layers) + 1);
    for (int l = 0; l < layers; ++l)
      EXPECT_EQ(lrow[l + 1], fixed(e.vio_layer_final[l], 3) + " / " + fixed(e.vio_layer_mean[l], 3)) << "layer " << l;
    // The summary the report returns and its CSV: unrounded, within rounding of the summation order.
    const RunSummary* s = nullptr;
    for (const auto& row_s : r.rows)
      if (row_s.name == name) s = &row_s;
    ASSERT_NE(s, nullptr);
    EXPECT_LT(rel_err(s->mean_max_vio, e.vio_mean), 1e-12);
    EXPECT_LT(rel_err(s->mean_router_entropy, e.ent_mean), 1e-12);
    EXPECT_LT(rel_err(s->mean_z_loss, e.z_mean), 1e-12);
    auto csv = csv_row(read_text(dir / "metrics" / "routing_summary.csv"), name);
    EXPECT_LT(rel_err(std::stod(csv.at("max_vio_final")), e.vio_final), 1e-15);
    EXPECT_LT(rel_err(std::stod(csv.at("max_vio_mean")), e.vio_mean), 1e-12);
    EXPECT_LT(rel_err(std::stod(csv.at("z_loss_mean")), e.z_mean), 1e-12);
    EXPECT_LT(rel_err(std::stod(csv.at("router_entropy_final")), e.ent_final), 1e-12);
    EXPECT_LT(std::abs(std::stod(csv.at("drop_rate_mean")) - e.drop_mean), 1e-12);
    if (std::isnan(e.bias_final)) EXPECT_EQ(csv.at("bias_range_final"), "");
    else EXPECT_EQ(std::stod(csv.at("bias_range_final")), e.bias_final);
    std::stringstream per_layer(csv.at("max_vio_mean_per_layer"));
    for (int l = 0; l < layers; ++l) {
      double v = NAN;
      per_layer >> v;
      EXPECT_LT(rel_err(v, e.vio_layer_mean[l]), 1e-12) << "layer " << l;
    }
  }
  // The older MoE run and the dense run: in the table, dashes where they recorded nothing.
  const auto old_row = md_row(section, "old_moe");
  ASSERT_EQ(old_row.size(), head.size()) << md;
  EXPECT_EQ(old_row[1], "2");
  EXPECT_EQ(old_row[4], "2.00");  // tail load imbalance from expert_load: 0.5 / 0.25
  for (int c = 5; c <= 11; ++c) EXPECT_EQ(old_row[c], "-") << head[c];
  const auto dense_row = md_row(section, "dense");
  ASSERT_EQ(dense_row.size(), head.size()) << md;
  EXPECT_EQ(dense_row[1], "-");
  EXPECT_EQ(dense_row[2], "-");
  for (int c = 5; c <= 11; ++c) EXPECT_EQ(dense_row[c], "-") << head[c];
  EXPECT_EQ(dense_row[12], "0.00%");

  // Steps CSV: the worst layer per step; routing CSV: each layer of each step.
  const std::string steps_csv_text = read_text(dir / "metrics" / "routing_steps.csv");
  EXPECT_EQ(steps_csv_text.rfind("run,step,loss,bal,dt_ms,tok_sec,mfu,drop_rate,max_vio,router_entropy,z_loss,bias_range\n", 0), 0u);
  {
    const int i = int(rng.below(uint64_t(steps_a)));
    const double worst = *std::max_element(aux.max_vio[i].begin(), aux.max_vio[i].end());
    const std::string prefix = "softmax_aux," + std::to_string(i) + ",";
    size_t at = steps_csv_text.find("\n" + prefix);
    ASSERT_NE(at, std::string::npos);
    std::stringstream line(steps_csv_text.substr(at + 1, steps_csv_text.find('\n', at + 1) - at - 1));
    std::vector<std::string> cells;
    for (std::string c; std::getline(line, c, ',');) cells.push_back(c);
    ASSERT_GE(cells.size(), 11u);
    EXPECT_EQ(std::stod(cells[8]), worst);
    EXPECT_EQ(std::stod(cells[10]), aux.z_loss[i]);
  }
  const std::string routing = read_text(dir / "metrics" / "routing_routing.csv");
  EXPECT_EQ(routing.rfind("run,step,moe_layer,max_vio,router_entropy,bias_range\n", 0), 0u);
  EXPECT_EQ(std::count(routing.begin(), routing.end(), '\n'), 1 + (steps_a + steps_b) * layers);
  {
    const int i = int(rng.below(uint64_t(steps_b))), l = int(rng.below(uint64_t(layers)));
    const std::string prefix = "\nsigmoid_auxfree," + std::to_string(i) + "," + std::to_string(l) + ",";
    size_t at = routing.find(prefix);
    ASSERT_NE(at, std::string::npos);
    std::stringstream line(routing.substr(at + prefix.size(), routing.find('\n', at + 1) - at - prefix.size()));
    std::vector<double> v;
    for (std::string c; std::getline(line, c, ',');) v.push_back(std::stod(c));
    ASSERT_EQ(v.size(), 3u);
    EXPECT_EQ(v[0], free.max_vio[i][l]);
    EXPECT_EQ(v[1], free.entropy[i][l]);
    EXPECT_EQ(v[2], free.bias[i][l]);
  }

  // TensorBoard: the worst layer, the mean entropy and each layer's own MaxVio.
  {
    std::string version;
    int records = 0;
    std::map<std::pair<std::string, int64_t>, float> got;
    RunRecord named;
    named.name = "sigmoid_auxfree";
    for (const auto& s : moelab::test::read_tensorboard_events(tensorboard_file(opt.tensorboard, named), version, records))
      got[{s.tag, s.step}] = s.value;
    const int i = int(rng.below(uint64_t(steps_b)));
    const double worst = *std::max_element(free.max_vio[i].begin(), free.max_vio[i].end());
    double ent = 0;
    for (double v : free.entropy[i]) ent += v / layers;
    EXPECT_FLOAT_EQ(got.at({"train/max_vio", i}), float(worst));
    EXPECT_NEAR(got.at({"train/router_entropy", i}), float(ent), 1e-6 * ent);
    EXPECT_FLOAT_EQ(got.at({"train/z_loss", i}), float(free.z_loss[i]));
    EXPECT_FLOAT_EQ(got.at({"train/bias_range", i}), float(*std::max_element(free.bias[i].begin(), free.bias[i].end())));
    for (int l = 0; l < layers; ++l) EXPECT_FLOAT_EQ(got.at({layer_tag("max_vio", size_t(l)), i}), float(free.max_vio[i][l]));
    EXPECT_EQ(layer_tag("bias_range", 3), "routing/bias_range/layer_03");
  }

  // The figure: one line per run that recorded MaxVio, shown in the routing section with its caption.
  if (plots_available()) {
    EXPECT_TRUE(is_png(dir / "figures" / "routing_maxvio.png"));
    EXPECT_NE(md.find("![MaxVio over training steps, one line per run: the worst MoE layer at each step]"
                      "(figures/routing_maxvio.png)"),
              std::string::npos)
        << md;
    EXPECT_EQ(md.find("![figures/routing_maxvio.png]"), std::string::npos);  // not repeated under Figures
  } else {
    EXPECT_NE(md.find("figures skipped"), std::string::npos);
  }
  fs::remove_all(dir.parent_path());
}

// Runs that recorded none of the keys (the seed's logs, older moelab runs, dense runs) report as
// before: no routing figure, no routing CSV, no routing section without expert loads.
TEST(ReportRouting, RunsWithoutTheKeysReportAsBefore) {
  const fs::path dir = fresh_dir("routing_none");
  std::string m;
  for (int i = 0; i < 12; ++i)
    m += "{\"event\": \"step\", \"step\": " + std::to_string(i) + ", \"loss\": 4.0, \"drop_rate\": 0.0, \"expert_load\": []}\n";
  for (const char* name : {"dense_a", "dense_b"}) {
    write_text(dir / name / "metrics.jsonl", m);
    write_text(dir / name / "status.json", "{\"status\": \"completed\", \"step\": 11}");
  }
  ReportOptions opt;
  opt.exp_dir = dir;
  ReportResult r = write_report(opt);
  const std::string md = read_text(r.markdown);
  EXPECT_NE(md.find("| dense_a | completed | 12 | 11 | 4.0000 |"), std::string::npos) << md;
  EXPECT_EQ(md.find("## MoE Routing"), std::string::npos) << md;
  EXPECT_EQ(md.find("maxvio"), std::string::npos) << md;
  EXPECT_FALSE(fs::exists(dir / "figures" / (dir.filename().string() + "_maxvio.png")));
  EXPECT_FALSE(fs::exists(dir / "metrics" / (dir.filename().string() + "_routing.csv")));
  // The summary CSV still has the routing columns, empty.
  const std::string csv = read_text(dir / "metrics" / (dir.filename().string() + "_summary.csv"));
  EXPECT_NE(csv.find(",error,moe_layers,experts,"), std::string::npos) << csv;
  EXPECT_NE(csv.find("dense_a,completed,12,11,4,"), std::string::npos) << csv;
  fs::remove_all(dir);
}

// A malformed routing value is shown as unknown and named in the report with its file and line;
// the rest of the line and the other lines still count.
TEST(ReportRouting, MalformedValuesAreNamedByFileAndLine) {
  const fs::path dir = fresh_dir("routing_bad");
  moelab::Rng rng(fresh_seed());
  const double good = 0.5 + rng.uniform(), later = 0.5 + rng.uniform();
  const std::string load = "\"expert_load\": [[0.5, 0.5], [0.25, 0.75]]";
  std::string m;
  m += "{\"event\": \"step\", \"step\": 0, \"loss\": 5.0, " + load + ", \"max_vio\": [" + num(good) + ", 0.1], \"z_loss\": 3.0}\n";
  m += "{\"event\": \"step\", \"step\": 1, \"loss\": 4.9, " + load + ", \"max_vio\": [0.2, 0.1, 0.3]}\n";    // line 2: 3 of 2
  m += "{\"event\": \"step\", \"step\": 2, \"loss\": 4.8, \"router_entropy\": \"1.2\"}\n";                  // line 3: a string
  m += "{\"event\": \"step\", \"step\": 3, \"loss\": 4.7, \"z_loss\": \"big\"}\n";                           // line 4
  m += "{\"event\": \"step\", \"step\": 4, \"loss\": 4.6, \"max_vio\": [" + num(later) + ", 0.2]}\n";        // fine
  m += "{\"event\": \"step\", \"step\": 5, \"loss\": 4.5, \"max_vio\": [0.1, 0.2], \"bias_range\": [0.1]}\n";  // line 6: 1 of 2
  m += "{\"event\": \"step\", \"step\": 6, \"loss\": 4.4, \"max_vio\": [0.1, null]}\n";                       // line 7: null inside
  write_text(dir / "run" / "metrics.jsonl", m);
  ReportOptions opt;
  opt.exp_dir = dir;
  ReportResult r = write_report(opt);
  const std::string md = read_text(r.markdown);
  ASSERT_NE(md.find("## Unreadable Inputs"), std::string::npos) << md;
  for (const char* want :
       {"- `run`: metrics.jsonl line 2: max_vio has 3 values but the run has 2 MoE layers (as expert_load on this line)",
        "- `run`: metrics.jsonl line 3: router_entropy is a string, not a list of one number per MoE layer",
        "- `run`: metrics.jsonl line 4: z_loss is a string, not a number",
        "- `run`: metrics.jsonl line 6: bias_range has 1 values but the run has 2 MoE layers (as on line(s) before)",
        "- `run`: metrics.jsonl line 7: max_vio holds a value that is not a finite number"})
    EXPECT_NE(md.find(want), std::string::npos) << want << "\n" << md;
  EXPECT_EQ(md.find("line 5:"), std::string::npos) << md;
  ASSERT_EQ(r.rows.size(), 1u);
  const RunSummary& s = r.rows[0];
  EXPECT_EQ(s.steps_observed, 7);
  EXPECT_EQ(s.last_loss, 4.4);
  // MaxVio from lines 1, 5, 6 and 7 (line 2's list dropped; line 7's unknown layer left out).
  const double worst0 = std::max(good, 0.1), worst4 = std::max(later, 0.2);
  EXPECT_LT(rel_err(s.mean_max_vio, (worst0 + worst4 + 0.2 + 0.1) / 4), 1e-12);
  EXPECT_EQ(s.final_max_vio, 0.1);
  ASSERT_EQ(s.mean_max_vio_layers.size(), 2u);
  EXPECT_LT(rel_err(s.mean_max_vio_layers[0], (good + later + 0.1 + 0.1) / 4), 1e-12);
  EXPECT_LT(rel_err(s.mean_max_vio_layers[1], (0.1 + 0.2 + 0.2) / 3), 1e-12);
  EXPECT_EQ(s.final_z_loss, 3.0);
  EXPECT_FALSE(known(s.final_bias_range));
  EXPECT_FALSE(known(s.final_router_entropy));
  fs::remove_all(dir);
}
