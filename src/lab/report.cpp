// write_report: read the experiment, summarize, write CSVs, figures and the markdown (see
// report.hpp). A figure that fails to render is noted in the report instead of failing it: the
// table is what a researcher needs first.
#include "lab/report.hpp"

#include <system_error>

#include "core/error.hpp"
#include "lab/file_io.hpp"
#include "lab/plot.hpp"

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

std::string relative_to(const fs::path& p, const fs::path& base) {
  std::error_code ec;
  fs::path r = fs::relative(p, base, ec);
  return (ec || r.empty()) ? p.string() : r.generic_string();
}

}  // namespace

ReportResult write_report(const ReportOptions& opt) {
  Experiment ex = read_experiment(opt.exp_dir, opt.read);
  if (!opt.name.empty()) ex.name = experiment_name_from_dir(opt.name);
  std::string baseline = opt.baseline.empty() ? ex.baseline : opt.baseline;

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
  write_file_atomic(steps_path, steps_csv(ex));
  write_file_atomic(summary_path, summary_csv(result.rows, opt.tail, baseline));
  artifacts.push_back(relative_to(steps_path, out_dir));
  artifacts.push_back(relative_to(summary_path, out_dir));

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
    const Fig figs[] = {{"loss", loss_label.c_str(), &StepRow::loss, opt.smooth},
                        {"toksec", "tokens / s", &StepRow::tok_sec, 0},
                        {"mfu", "MFU (%)", &StepRow::mfu, 0},
                        {"dt_ms", "step time (ms)", &StepRow::dt_ms, 0}};
    for (const auto& f : figs) {
      LineChart chart;
      chart.title = ex.title + ": " + f.y_label;
      chart.x_label = "step";
      chart.y_label = f.y_label;
      chart.warmup_steps = f.field == &StepRow::loss ? 0 : 10;  // nanochat also times from step 10
      for (const auto& run : ex.runs) chart.series.push_back(series_of(run, f.field, f.smooth));
      fs::path png = out_dir / "figures" / (ex.name + "_" + f.suffix + ".png");
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
      fs::path png = out_dir / "figures" / (ex.name + "_experts_" + run.name + ".png");
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
