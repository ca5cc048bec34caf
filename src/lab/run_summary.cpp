// Run Summary numbers and their formatting (see run_summary.hpp).
#include "lab/run_summary.hpp"

#include <algorithm>
#include <charconv>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <map>
#include <tuple>
#include <utility>

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

double worst(const std::vector<double>& v) {
  double w = kUnknown;
  for (double x : v)
    if (known(x)) w = known(w) ? std::max(w, x) : x;
  return w;
}

double average(const std::vector<double>& v) {
  double sum = 0;
  int64_t n = 0;
  for (double x : v)
    if (known(x)) {
      sum += x;
      ++n;
    }
  return n ? sum / double(n) : kUnknown;
}

// final (last step with a value) and mean over the steps with one, of f(step).
template <class F>
std::pair<double, double> final_and_mean(const std::vector<StepRow>& steps, F&& f) {
  double last = kUnknown, sum = 0;
  int64_t n = 0;
  for (const auto& row : steps) {
    double v = f(row);
    if (!known(v)) continue;
    last = v;
    sum += v;
    ++n;
  }
  return {last, n ? sum / double(n) : kUnknown};
}

void summarize_routing(const RunRecord& rec, RunSummary& s) {
  std::tie(s.final_max_vio, s.mean_max_vio) = final_and_mean(rec.steps, [](const StepRow& r) { return worst(r.max_vio); });
  std::tie(s.final_router_entropy, s.mean_router_entropy) =
      final_and_mean(rec.steps, [](const StepRow& r) { return average(r.router_entropy); });
  std::tie(s.final_z_loss, s.mean_z_loss) = final_and_mean(rec.steps, [](const StepRow& r) { return r.z_loss; });
  s.final_bias_range = final_and_mean(rec.steps, [](const StepRow& r) { return worst(r.bias_range); }).first;
  std::tie(s.final_drop_rate, s.mean_drop_rate) = final_and_mean(rec.steps, [](const StepRow& r) { return r.drop_rate; });
  // Per layer: each layer's last known value and its mean over the steps that recorded it.
  std::vector<double> sum;
  std::vector<int64_t> count;
  for (const auto& row : rec.steps) {
    if (row.max_vio.size() > s.final_max_vio_layers.size()) {
      s.final_max_vio_layers.resize(row.max_vio.size(), kUnknown);
      sum.resize(row.max_vio.size(), 0);
      count.resize(row.max_vio.size(), 0);
    }
    for (size_t l = 0; l < row.max_vio.size(); ++l)
      if (known(row.max_vio[l])) {
        s.final_max_vio_layers[l] = row.max_vio[l];
        sum[l] += row.max_vio[l];
        ++count[l];
      }
  }
  for (size_t l = 0; l < sum.size(); ++l) s.mean_max_vio_layers.push_back(count[l] ? sum[l] / double(count[l]) : kUnknown);
}

}  // namespace

RunSummary summarize_run(const RunRecord& rec, int64_t tail) {
  RunSummary s;
  s.name = rec.name;
  s.state = rec.state;
  if (rec.state == RunState::failed) s.error = rec.error;
  s.steps_observed = int64_t(rec.steps.size());
  if (!rec.steps.empty()) {
    s.last_step = rec.steps.back().step;
    s.last_loss = rec.steps.back().loss;
  }
  s.diverged = rec.diverged_step >= 0 && !known(s.last_loss);
  s.tail_tok_sec = tail_mean(rec.steps, tail, &StepRow::tok_sec);
  s.tail_mfu = tail_mean(rec.steps, tail, &StepRow::mfu);
  s.tail_dt_ms = tail_mean(rec.steps, tail, &StepRow::dt_ms);
  s.peak_mem_mib = rec.peak_mem_mib;
  s.total_time_min = rec.total_time_min;
  s.tail_drop_rate = tail_mean(rec.steps, tail, &StepRow::drop_rate);
  s.tail_load_imbalance = tail_imbalance(rec.steps, tail);
  for (const auto& v : rec.vals) {
    if (known(v.loss)) {
      s.last_val_loss = v.loss;
      s.best_val_loss = known(s.best_val_loss) ? std::min(s.best_val_loss, v.loss) : v.loss;
    }
    if (known(v.bpb)) {
      s.last_val_bpb = v.bpb;
      s.best_val_bpb = known(s.best_val_bpb) ? std::min(s.best_val_bpb, v.bpb) : v.bpb;
    }
  }
  if (known(rec.min_val_bpb)) s.best_val_bpb = known(s.best_val_bpb) ? std::min(s.best_val_bpb, rec.min_val_bpb) : rec.min_val_bpb;
  for (auto it = rec.steps.rbegin(); it != rec.steps.rend(); ++it) {
    if (it->expert_load.empty()) continue;
    s.moe_layers = int64_t(it->expert_load.size());
    for (const auto& l : it->expert_load) s.experts = std::max<int64_t>(s.experts, int64_t(l.size()));
    break;
  }
  summarize_routing(rec, s);
  if (s.moe_layers == 0) s.moe_layers = int64_t(s.final_max_vio_layers.size());  // a run that logs no expert_load
  return s;
}

void compare_with_baseline(std::vector<RunSummary>& rows, const std::string& baseline) {
  const RunSummary* base = nullptr;
  for (const auto& r : rows)
    if (r.name == baseline) base = &r;
  auto change = [](double v, double b) { return known(b) && b > 0 && known(v) ? (v / b - 1.0) * 100.0 : kUnknown; };
  RunSummary none;
  const RunSummary& b = base ? *base : none;
  const double tok = b.tail_tok_sec, loss = b.last_val_loss, bpb = b.last_val_bpb;  // copies: rows change below
  for (auto& r : rows) {
    r.tok_sec_change_pct = change(r.tail_tok_sec, tok);
    r.val_loss_change_pct = change(r.last_val_loss, loss);
    r.val_bpb_change_pct = change(r.last_val_bpb, bpb);
  }
}

namespace {
std::string repeat_origin(const std::string& name) {
  // NAME_repeat, NAME_repeat2, ...: the suffix sweep_spec's repeat_name gives.
  auto at = name.rfind("_repeat");
  if (at == std::string::npos || at == 0) return name;
  std::string tail = name.substr(at + 7);
  for (char c : tail)
    if (!std::isdigit(static_cast<unsigned char>(c))) return name;
  return name.substr(0, at);
}

RepeatGroup::Stat stat_of(const std::vector<const RunSummary*>& runs, double RunSummary::*field) {
  RepeatGroup::Stat s;
  double sum = 0, sq = 0;
  for (const auto* r : runs)
    if (known(r->*field)) {
      sum += r->*field;
      ++s.n;
    }
  if (s.n == 0) return s;
  s.mean = sum / double(s.n);
  for (const auto* r : runs)
    if (known(r->*field)) sq += (r->*field - s.mean) * (r->*field - s.mean);
  s.sd = s.n > 1 ? std::sqrt(sq / double(s.n - 1)) : kUnknown;
  return s;
}
}  // namespace

std::vector<RepeatGroup> repeat_groups(const std::vector<RunSummary>& rows) {
  std::vector<std::string> order;
  std::map<std::string, std::vector<const RunSummary*>> members;
  for (const auto& r : rows) {
    std::string o = repeat_origin(r.name);
    if (!members.count(o)) order.push_back(o);
    members[o].push_back(&r);
  }
  std::vector<RepeatGroup> out;
  for (const auto& o : order) {
    const auto& m = members[o];
    if (m.size() < 2) continue;
    RepeatGroup g;
    g.name = o;
    for (const auto* r : m) g.runs.push_back(r->name);
    g.last_loss = stat_of(m, &RunSummary::last_loss);
    g.last_val_loss = stat_of(m, &RunSummary::last_val_loss);
    g.best_val_loss = stat_of(m, &RunSummary::best_val_loss);
    g.last_val_bpb = stat_of(m, &RunSummary::last_val_bpb);
    g.tail_tok_sec = stat_of(m, &RunSummary::tail_tok_sec);
    out.push_back(std::move(g));
  }
  return out;
}

std::string format_stat(const RepeatGroup::Stat& s, int decimals) {
  if (s.n == 0) return "-";
  return format_number(s.mean, decimals) + " ± " + format_number(s.sd, decimals) + " (n=" + std::to_string(s.n) + ")";
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
                                   t + "_mfu", t + "_dt_ms", "peak_mem_mib", "total_time_min",
                                   "last_val_loss", "best_val_loss", "last_val_bpb", "best_val_bpb"};
  if (!baseline.empty())
    cols.insert(cols.end(), {"val_loss_vs_" + baseline, "val_bpb_vs_" + baseline, "tok/sec_vs_" + baseline});
  return cols;
}

std::string format_exact(double v) {
  if (!known(v)) return "-";
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);  // shortest text that reads back as v
  return ec == std::errc() ? std::string(buf, end) : format_number(v, 6);
}

bool has_routing(const RunSummary& s) {
  return s.experts > 0 || !s.final_max_vio_layers.empty() || known(s.final_router_entropy) || known(s.final_z_loss) ||
         known(s.final_bias_range);
}

std::vector<std::string> routing_columns(int64_t tail) {
  std::string t = "tail" + std::to_string(tail);
  return {"run",
          "moe_layers",
          "experts",
          t + "_drop_rate",
          t + "_load_imbalance",
          "max_vio_final",
          "max_vio_mean",
          "router_entropy_final",
          "router_entropy_mean",
          "z_loss_final",
          "z_loss_mean",
          "bias_range_final",
          "drop_rate_final",
          "drop_rate_mean"};
}

std::string format_layers(const std::vector<double>& v, int decimals, bool exact) {
  if (v.empty()) return "-";
  std::string out;
  for (double x : v) {
    if (!out.empty()) out += ' ';
    out += exact ? format_exact(x) : format_number(x, decimals);
  }
  return out;
}

std::vector<std::string> routing_cells(const RunSummary& s, bool exact) {
  auto num = [&](double v, int decimals) { return exact ? format_exact(v) : format_number(v, decimals); };
  // Drop rates read as percentages in the table; the CSV keeps the fraction metrics.jsonl has.
  auto pct = [&](double v) { return exact ? format_exact(v) : known(v) ? format_number(v * 100, 2) + "%" : "-"; };
  return {s.name,
          s.moe_layers ? std::to_string(s.moe_layers) : "-",
          s.experts ? std::to_string(s.experts) : "-",
          pct(s.tail_drop_rate),
          num(s.tail_load_imbalance, 2),
          num(s.final_max_vio, 3),
          num(s.mean_max_vio, 3),
          num(s.final_router_entropy, 3),
          num(s.mean_router_entropy, 3),
          num(s.final_z_loss, 3),
          num(s.mean_z_loss, 3),
          num(s.final_bias_range, 4),
          pct(s.final_drop_rate),
          pct(s.mean_drop_rate)};
}

std::vector<std::string> summary_cells(const RunSummary& s, bool with_baseline, bool exact) {
  auto num = [&](double v, int decimals) { return exact ? format_exact(v) : format_number(v, decimals); };
  std::vector<std::string> cells = {s.name,
                                    state_name(s.state),
                                    std::to_string(s.steps_observed),
                                    s.last_step >= 0 ? std::to_string(s.last_step) : "-",
                                    s.diverged ? std::string("nan") : num(s.last_loss, 4),
                                    num(s.tail_tok_sec, 0),
                                    num(s.tail_mfu, 2),
                                    num(s.tail_dt_ms, 1),
                                    num(s.peak_mem_mib, 2),
                                    num(s.total_time_min, 2),
                                    num(s.last_val_loss, 4),
                                    num(s.best_val_loss, 4),
                                    num(s.last_val_bpb, 4),
                                    num(s.best_val_bpb, 4)};
  if (with_baseline)
    cells.insert(cells.end(), {format_change(s.val_loss_change_pct), format_change(s.val_bpb_change_pct),
                               format_change(s.tok_sec_change_pct)});
  return cells;
}

}  // namespace moelab::lab
