// Run Summary numbers and their formatting (see run_summary.hpp).
#include "lab/run_summary.hpp"

#include <algorithm>
#include <cstdio>

namespace moelab::lab {

double tail_mean(const std::vector<StepRow>& steps, int64_t tail, double StepRow::*field) {
  if (tail <= 0) tail = 1;
  size_t first = steps.size() > size_t(tail) ? steps.size() - size_t(tail) : 0;
  double sum = 0;
  int64_t n = 0;
  for (size_t i = first; i < steps.size(); ++i) {
    double v = steps[i].*field;
    if (known(v)) {
      sum += v;
      ++n;
    }
  }
  return n ? sum / double(n) : kUnknown;
}

namespace {

// Worst layer's max/mean expert load, averaged over the tail steps that recorded loads.
double tail_imbalance(const std::vector<StepRow>& steps, int64_t tail) {
  size_t t = size_t(std::max<int64_t>(tail, 1));
  size_t first = steps.size() > t ? steps.size() - t : 0;
  double sum = 0;
  int64_t n = 0;
  for (size_t i = first; i < steps.size(); ++i) {
    double worst = kUnknown;
    for (const auto& layer : steps[i].expert_load) {
      double total = 0, peak = 0;
      size_t count = 0;
      for (double v : layer)
        if (known(v)) {
          total += v;
          peak = std::max(peak, v);
          ++count;
        }
      if (count == 0 || total <= 0) continue;
      double ratio = peak / (total / double(count));
      worst = known(worst) ? std::max(worst, ratio) : ratio;
    }
    if (known(worst)) {
      sum += worst;
      ++n;
    }
  }
  return n ? sum / double(n) : kUnknown;
}

}  // namespace

RunSummary summarize_run(const RunRecord& rec, int64_t tail) {
  RunSummary s;
  s.name = rec.name;
  s.state = rec.state;
  s.steps_observed = int64_t(rec.steps.size());
  if (!rec.steps.empty()) {
    s.last_step = rec.steps.back().step;
    s.last_loss = rec.steps.back().loss;
  }
  s.tail_tok_sec = tail_mean(rec.steps, tail, &StepRow::tok_sec);
  s.tail_mfu = tail_mean(rec.steps, tail, &StepRow::mfu);
  s.tail_dt_ms = tail_mean(rec.steps, tail, &StepRow::dt_ms);
  s.peak_mem_mib = rec.peak_mem_mib;
  s.total_time_min = rec.total_time_min;
  s.tail_drop_rate = tail_mean(rec.steps, tail, &StepRow::drop_rate);
  s.tail_load_imbalance = tail_imbalance(rec.steps, tail);
  for (auto it = rec.steps.rbegin(); it != rec.steps.rend(); ++it) {
    if (it->expert_load.empty()) continue;
    s.moe_layers = int64_t(it->expert_load.size());
    for (const auto& l : it->expert_load) s.experts = std::max<int64_t>(s.experts, int64_t(l.size()));
    break;
  }
  return s;
}

void compare_with_baseline(std::vector<RunSummary>& rows, const std::string& baseline) {
  double base = kUnknown;
  for (const auto& r : rows)
    if (r.name == baseline) base = r.tail_tok_sec;
  for (auto& r : rows)
    r.tok_sec_change_pct = (known(base) && base > 0 && known(r.tail_tok_sec)) ? (r.tail_tok_sec / base - 1.0) * 100.0 : kUnknown;
}

std::string format_number(double v, int decimals) {
  if (!known(v)) return "-";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

std::string format_change(double pct) {
  if (!known(pct)) return "-";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%+.1f%%", pct);
  return buf;
}

std::vector<std::string> summary_columns(int64_t tail, const std::string& baseline) {
  std::string t = "tail" + std::to_string(tail);
  std::vector<std::string> cols = {"run", "status", "steps_observed", "last_step", "last_loss", t + "_tok/sec",
                                   t + "_mfu", t + "_dt_ms", "peak_mem_mib", "total_time_min"};
  if (!baseline.empty()) cols.push_back("tok/sec_vs_" + baseline);
  return cols;
}

std::vector<std::string> summary_cells(const RunSummary& s, bool with_baseline) {
  std::vector<std::string> cells = {s.name,
                                    state_name(s.state),
                                    std::to_string(s.steps_observed),
                                    s.last_step >= 0 ? std::to_string(s.last_step) : "-",
                                    format_number(s.last_loss, 4),
                                    format_number(s.tail_tok_sec, 0),
                                    format_number(s.tail_mfu, 2),
                                    format_number(s.tail_dt_ms, 1),
                                    format_number(s.peak_mem_mib, 2),
                                    format_number(s.total_time_min, 2)};
  if (with_baseline) cells.push_back(format_change(s.tok_sec_change_pct));
  return cells;
}

}  // namespace moelab::lab
