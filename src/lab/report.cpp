// write_report: read the experiment, summarize, write CSVs, figures and the markdown (see
// report.hpp). A figure that fails to render is noted in the report instead of failing it: the
// table is what a researcher needs first.
#include "lab/report.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <system_error>

#include "core/error.hpp"
#include "lab/file_io.hpp"
#include "lab/heatmap_bins.hpp"
#include "lab/plot.hpp"
#include "lab/tensorboard_export.hpp"

namespace moelab::lab {
namespace {

Series series_of(const RunRecord& run, double StepRow::*field, double smooth) {
  Series s;
  s.label = run.name;
  double ema = 0;
  int64_t n = 0;
  for (const auto& row : run.steps) {
    double v = row.*field;
    s.x.push_back(double(row.step));
    if (smooth > 0 && known(v)) {
      // Debiased EMA, as nanochat smooths its printed loss.
      ema = smooth * ema + (1 - smooth) * v;
      ++n;
      v = ema / (1 - std::pow(smooth, double(n)));
    }
    s.y.push_back(v);
  }
  return s;
}

// Training tokens after each step: recorded, else summed from tokens/s x step time.
std::vector<double> tokens_of(const RunRecord& run) {
  std::vector<double> x;
  double sum = 0;
  bool exact = true;
  for (const auto& row : run.steps) {
    if (known(row.tokens) && exact) {
      x.push_back(row.tokens);
      sum = row.tokens;
      continue;
    }
    exact = false;
    if (known(row.tok_sec) && known(row.dt_ms)) sum += row.tok_sec * row.dt_ms / 1000.0;
    x.push_back(known(row.tok_sec) && known(row.dt_ms) ? sum : NAN);
  }
  return x;
}

bool has_values(const LineChart& c) {
  for (const auto& s : c.series)
    for (double v : s.y)
      if (known(v)) return true;
  return false;
}


std::string relative_to(const fs::path& p, const fs::path& base) {
  std::error_code ec;
  fs::path r = fs::relative(p, base, ec);
  return (ec || r.empty()) ? p.string() : r.generic_string();
}

}  // namespace

Experiment read_report_inputs(const ReportOptions& opt) {
  std::vector<fs::path> dirs = {opt.exp_dir};
  dirs.insert(dirs.end(), opt.more_dirs.begin(), opt.more_dirs.end());
  Experiment merged;
  for (size_t i = 0; i < dirs.size(); ++i) {
    Experiment ex;
    if (is_run_folder(dirs[i])) {  // one run folder given on its own
      ex.dir = fs::absolute(dirs[i]).lexically_normal();
      ex.name = experiment_name_from_dir(ex.dir);
      ex.title = ex.name + " progress";
      ex.runs.push_back(read_run_folder(dirs[i], opt.read));
    } else {
      ex = read_experiment(dirs[i], opt.read);
    }
    if (dirs.size() > 1)  // runs of several experiments: names say which one they come from
      for (auto& r : ex.runs) {
        std::string prefix = experiment_name_from_dir(ex.dir) + "/";
        r.name = prefix + r.name;
        if (!r.origin.empty()) r.origin = prefix + r.origin;
      }
    if (i == 0) {
      merged = std::move(ex);
      continue;
    }
    for (auto& r : ex.runs) merged.runs.push_back(std::move(r));
    merged.problems.insert(merged.problems.end(), ex.problems.begin(), ex.problems.end());
  }
  if (dirs.size() > 1) {
    merged.name = "comparison";
    merged.title = "comparison of " + std::to_string(dirs.size()) + " experiments";
    merged.baseline.clear();
  }
  return merged;
}

ReportResult write_report(const ReportOptions& opt) {
  // The report never writes into a run folder: a run folder (or several folders) given alone
  // needs --out-md.
  if (opt.out_md.empty() && (is_run_folder(opt.exp_dir) || !opt.more_dirs.empty()))
    throw Error(opt.more_dirs.empty() ? opt.exp_dir.string() + " is a run folder, which the report does not write into; "
                                            "pass --out-md FILE"
                                      : "a report over several folders needs --out-md FILE (it writes into none of them)");
  Experiment ex = read_report_inputs(opt);
  if (ex.runs.empty() && opt.require_runs)
    throw Error("no runs found in " + opt.exp_dir.string() +
                (opt.more_dirs.empty() ? "" : " and the other folders") + " (no run folders and no *.log files)");
  if (!opt.name.empty()) ex.name = experiment_name_from_dir(opt.name);
  std::string baseline = opt.baseline.empty() ? ex.baseline : opt.baseline;
  // A baseline named on the command line must be a run here: otherwise every comparison column
  // would be unknown and the report would look as if the data were missing. (The sweep's own
  // baseline may simply not have started yet.)
  if (!opt.baseline.empty()) {
    std::string names;
    bool found = false;
    for (const auto& r : ex.runs) {
      found = found || r.name == opt.baseline;
      names += (names.empty() ? "" : ", ") + r.name;
    }
    if (!found)
      throw UsageError("--baseline " + opt.baseline + ": no run of that name in " + opt.exp_dir.string() +
                       (opt.more_dirs.empty() ? "" : " and the other folders") + " (runs: " + names +
                       "); name one of them");
  }

  ReportResult result;
  result.markdown = opt.out_md.empty() ? opt.exp_dir / "report.md" : opt.out_md;
  fs::path out_dir = fs::absolute(result.markdown).parent_path();
  std::error_code ec;
  fs::create_directories(out_dir / "metrics", ec);
  if (ec) throw Error("cannot create " + (out_dir / "metrics").string() + ": " + ec.message());

  for (const auto& run : ex.runs) result.rows.push_back(summarize_run(run, opt.tail));
  if (!baseline.empty()) compare_with_baseline(result.rows, baseline);

  std::vector<std::string> artifacts, figures;
  fs::path steps_path = out_dir / "metrics" / (ex.name + "_steps.csv");
  fs::path summary_path = out_dir / "metrics" / (ex.name + "_summary.csv");
  fs::path val_path = out_dir / "metrics" / (ex.name + "_val.csv");
  write_file_atomic(steps_path, steps_csv(ex));
  write_file_atomic(val_path, val_csv(ex));
  write_file_atomic(summary_path, summary_csv(result.rows, opt.tail, baseline));
  artifacts.push_back(relative_to(steps_path, out_dir));
  artifacts.push_back(relative_to(summary_path, out_dir));
  artifacts.push_back(relative_to(val_path, out_dir));
  if (has_layer_routing(ex)) {
    fs::path routing_path = out_dir / "metrics" / (ex.name + "_routing.csv");
    write_file_atomic(routing_path, routing_csv(ex));
    artifacts.push_back(relative_to(routing_path, out_dir));
  }

  if (!opt.tensorboard.empty())
    for (const fs::path& f : write_tensorboard(ex, opt.tensorboard)) result.artifacts.push_back(f);

  if (!opt.figures) {
    result.figures_note = "turned off (--no-figures)";
  } else if (!plots_available()) {
    result.figures_note = "this build has no cairo (MOELAB_PLOTS off)";
  } else {
    fs::create_directories(out_dir / "figures", ec);
    struct Fig {
      const char* suffix;
      const char* y_label;
      double StepRow::*field;
      double smooth;
    };
    std::string loss_label = opt.smooth > 0 ? "loss (EMA " + format_number(opt.smooth, 2) + ")" : "loss";
    std::vector<std::pair<std::string, LineChart>> charts;
    auto chart_of = [&](const std::string& y_label, double StepRow::*field, double smooth, double warmup) {
      LineChart chart;
      chart.title = ex.title + ": " + y_label;
      chart.x_label = "step";
      chart.y_label = y_label;
      chart.warmup_steps = warmup;  // nanochat also times from step 10
      for (const auto& run : ex.runs) chart.series.push_back(series_of(run, field, smooth));
      return chart;
    };
    // Loss against steps, with each run's validation points as a second line.
    LineChart loss = chart_of(loss_label, &StepRow::loss, opt.smooth, 0);
    for (const auto& run : ex.runs) {
      Series v;
      v.label = run.name + " (val)";
      for (const auto& row : run.vals)
        if (row.step >= 0 && known(row.loss)) {
          v.x.push_back(double(row.step));
          v.y.push_back(row.loss);
        }
      if (!v.x.empty()) loss.series.push_back(std::move(v));
    }
    charts.emplace_back("loss", std::move(loss));
    // Loss against training tokens: runs with other batch sizes compare at equal data.
    LineChart by_tokens = chart_of(loss_label, &StepRow::loss, opt.smooth, 0);
    by_tokens.title = ex.title + ": " + loss_label + " against tokens";
    by_tokens.x_label = "training tokens";
    for (size_t i = 0; i < ex.runs.size(); ++i) by_tokens.series[i].x = tokens_of(ex.runs[i]);
    charts.emplace_back("loss_tokens", std::move(by_tokens));
    // Difference to the baseline at the same step: curves that overlap on the loss figure part here.
    if (!baseline.empty()) {
      const RunRecord* base = nullptr;
      for (const auto& run : ex.runs)
        if (run.name == baseline) base = &run;
      if (base) {
        Series b = series_of(*base, &StepRow::loss, opt.smooth);
        std::map<double, double> at;
        for (size_t i = 0; i < b.x.size(); ++i) at[b.x[i]] = b.y[i];
        LineChart delta;
        delta.title = ex.title + ": " + loss_label + " minus " + baseline + "'s (below 0: better)";
        delta.x_label = "step";
        delta.y_label = "loss difference";
        for (const auto& run : ex.runs) {
          if (&run == base) continue;
          Series s = series_of(run, &StepRow::loss, opt.smooth);
          for (size_t i = 0; i < s.x.size(); ++i) {
            auto it = at.find(s.x[i]);
            s.y[i] = it == at.end() ? NAN : s.y[i] - it->second;
          }
          delta.series.push_back(std::move(s));
        }
        if (!delta.series.empty()) charts.emplace_back("loss_delta", std::move(delta));
      }
    }
    charts.emplace_back("toksec", chart_of("tokens / s", &StepRow::tok_sec, 0, 10));
    charts.emplace_back("mfu", chart_of("MFU (%)", &StepRow::mfu, 0, 10));
    charts.emplace_back("dt_ms", chart_of("step time (ms)", &StepRow::dt_ms, 0, 10));
    {  // capacity runs only: the share of assignments dropped
      LineChart drops = chart_of("dropped assignments (%)", &StepRow::drop_rate, 0, 0);
      std::vector<Series> kept;
      for (auto& s : drops.series) {
        bool any = false;
        for (auto& v : s.y) {
          any = any || (known(v) && v > 0);
          v *= 100;
        }
        if (any) kept.push_back(std::move(s));
      }
      drops.series = std::move(kept);
      if (!drops.series.empty()) charts.emplace_back("drop_rate", std::move(drops));
    }
    {  // MaxVio over steps: the worst MoE layer of each step (the number the step line prints)
      LineChart vio;
      vio.title = ex.title + ": MaxVio, worst MoE layer per step (0 = balanced)";
      vio.x_label = "step";
      vio.y_label = "MaxVio (max load / mean load - 1)";
      for (const auto& run : ex.runs) {
        Series s;
        s.label = run.name;
        for (const auto& row : run.steps) {
          if (row.max_vio.empty()) continue;
          double w = kUnknown;
          for (double v : row.max_vio)
            if (known(v)) w = known(w) ? std::max(w, v) : v;
          s.x.push_back(double(row.step));
          s.y.push_back(w);
        }
        if (!s.x.empty()) vio.series.push_back(std::move(s));
      }
      if (!vio.series.empty()) charts.emplace_back("maxvio", std::move(vio));
    }
    for (auto& [suffix, chart] : charts) {
      if (!has_values(chart)) continue;  // e.g. MFU on a CPU, where no peak is known
      fs::path png = out_dir / "figures" / (ex.name + "_" + suffix + ".png");
      try {
        render_line_chart(chart, png);
        figures.push_back(relative_to(png, out_dir));
      } catch (const std::exception& e) {
        result.figures_note += std::string(result.figures_note.empty() ? "" : "; ") + e.what();
      }
    }
    for (const auto& run : ex.runs) {
      ExpertHeatmap map;
      for (const auto& row : run.steps) {
        if (row.expert_load.empty()) continue;
        map.steps.push_back(double(row.step));
        map.load.push_back(row.expert_load);
      }
      if (map.load.empty()) continue;
      map.title = run.name + ": expert load per layer";
      bin_heatmap_steps(map, 400);
      bin_heatmap_experts(map, 32);
      std::string file_name = run.name;
      std::replace(file_name.begin(), file_name.end(), '/', '_');
      fs::path png = out_dir / "figures" / (ex.name + "_experts_" + file_name + ".png");
      try {
        render_expert_heatmap(map, png);
        figures.push_back(relative_to(png, out_dir));
      } catch (const std::exception& e) {
        result.figures_note += std::string(result.figures_note.empty() ? "" : "; ") + e.what();
      }
    }
  }
  artifacts.insert(artifacts.end(), figures.begin(), figures.end());
  for (const auto& a : artifacts) result.artifacts.push_back(out_dir / a);

  ReportOptions effective = opt;
  effective.baseline = baseline;
  write_file_atomic(result.markdown, render_markdown(ex, result.rows, effective, artifacts, figures, result.figures_note));
  return result;
}

}  // namespace moelab::lab
