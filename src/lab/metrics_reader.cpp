// metrics.jsonl and status.json readers (see metrics_reader.hpp).
#include "lab/metrics_reader.hpp"

#include <nlohmann/json.hpp>

#include "lab/lenient_number.hpp"

namespace moelab::lab {
namespace {

using nlohmann::json;

constexpr size_t kMaxProblems = 12;
constexpr size_t kMaxLayers = 1024;
constexpr size_t kMaxExperts = 4096;

// A number from a JSON field that may be missing, null, a string ("982,070") or junk.
double number_field(const json& obj, const char* key, bool* malformed = nullptr) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return kUnknown;
  if (it->is_number()) {
    double v = it->get<double>();
    if (std::isfinite(v)) return v;
  } else if (it->is_string()) {
    if (auto v = parse_lenient_number(it->get_ref<const std::string&>())) return *v;
  }
  if (malformed) *malformed = true;
  return kUnknown;
}

std::vector<std::vector<double>> expert_load_field(const json& obj, bool* malformed) {
  std::vector<std::vector<double>> load;
  auto it = obj.find("expert_load");
  if (it == obj.end() || it->is_null()) return load;
  if (!it->is_array() || it->size() > kMaxLayers) {
    *malformed = true;
    return load;
  }
  for (const auto& layer : *it) {
    if (!layer.is_array() || layer.size() > kMaxExperts) {
      *malformed = true;
      return {};
    }
    std::vector<double> row;
    row.reserve(layer.size());
    for (const auto& v : layer) {
      double x = v.is_number() ? v.get<double>() : kUnknown;
      if (!std::isfinite(x)) *malformed = true;
      row.push_back(x);
    }
    load.push_back(std::move(row));
  }
  return load;
}

void take_step(const json& obj, RunRecord& rec, size_t line_no) {
  double step = number_field(obj, "step");
  if (!known(step) || step < 0 || step > 1e12) {
    note_problem(rec, "metrics.jsonl line " + std::to_string(line_no) + ": step event without a valid step");
    return;
  }
  bool malformed = false;
  StepRow row;
  row.step = int64_t(step);
  row.loss = number_field(obj, "loss", &malformed);
  row.bal = number_field(obj, "bal", &malformed);
  row.dt_ms = number_field(obj, "dt_ms", &malformed);
  row.tok_sec = number_field(obj, "tok_sec", &malformed);
  row.mfu = number_field(obj, "mfu", &malformed);
  row.drop_rate = number_field(obj, "drop_rate", &malformed);
  row.tokens = number_field(obj, "tokens", &malformed);
  row.expert_load = expert_load_field(obj, &malformed);
  // A rate or a duration below zero is a broken clock or a broken writer: never average it in.
  for (double* v : {&row.dt_ms, &row.tok_sec})
    if (known(*v) && *v < 0) {
      *v = kUnknown;
      malformed = true;
    }
  double steps = number_field(obj, "steps");
  if (known(steps) && steps > 0 && steps < 1e12) rec.planned_steps = int64_t(steps);
  double peak = number_field(obj, "peak_mem_mib");
  if (known(peak)) rec.peak_mem_mib = peak;
  if (malformed) note_problem(rec, "metrics.jsonl line " + std::to_string(line_no) + ": malformed value(s), shown as unknown");
  // A resumed run repeats steps: the later record replaces everything from that step on.
  while (!rec.steps.empty() && rec.steps.back().step >= row.step) rec.steps.pop_back();
  rec.steps.push_back(std::move(row));
}

}  // namespace

void note_problem(RunRecord& rec, std::string text) {
  if (rec.problems.size() < kMaxProblems) {
    rec.problems.push_back(std::move(text));
  } else if (rec.problems.size() == kMaxProblems) {
    rec.problems.push_back("(further problems not listed)");
  }
}

void parse_metrics_jsonl(std::string_view text, RunRecord& rec) {
  size_t pos = 0, line_no = 0, bad_lines = 0, first_bad = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    bool complete = nl != std::string_view::npos;
    std::string_view line = trim(text.substr(pos, complete ? nl - pos : std::string_view::npos));
    pos = complete ? nl + 1 : text.size();
    ++line_no;
    if (line.empty()) continue;
    json obj = json::parse(line.begin(), line.end(), nullptr, /*allow_exceptions=*/false);
    if (obj.is_discarded() || !obj.is_object()) {
      if (complete) {
        if (bad_lines++ == 0) first_bad = line_no;
      }
      continue;
    }
    auto ev = obj.find("event");
    std::string event = (ev != obj.end() && ev->is_string()) ? ev->get<std::string>() : "";
    if (event == "step") {
      take_step(obj, rec, line_no);
    } else if (event == "end") {
      rec.saw_end = true;
      double peak = number_field(obj, "peak_mem_mib");
      double total = number_field(obj, "total_time_min");
      if (known(peak)) rec.peak_mem_mib = peak;
      if (known(total)) rec.total_time_min = total;
    } else if (event == "val") {
      ValRow v;
      double step = number_field(obj, "step");
      v.step = known(step) && step >= 0 && step < 1e12 ? int64_t(step) : -1;
      v.loss = number_field(obj, "val_loss");
      v.bpb = number_field(obj, "val_bpb");
      if (known(v.loss) || known(v.bpb)) {
        while (!rec.vals.empty() && v.step >= 0 && rec.vals.back().step >= v.step) rec.vals.pop_back();  // resumed
        rec.vals.push_back(v);
      }
    } else if (event.empty()) {
      if (bad_lines++ == 0) first_bad = line_no;
    }
    // Other events (resume, ...) are not part of the progress report.
  }
  if (bad_lines)
    note_problem(rec, "metrics.jsonl: " + std::to_string(bad_lines) + " unreadable line(s) skipped (first at line " +
                          std::to_string(first_bad) + ")");
}

bool parse_status_json(std::string_view text, RunRecord& rec) {
  json obj = json::parse(text.begin(), text.end(), nullptr, false);
  if (obj.is_discarded() || !obj.is_object()) {
    note_problem(rec, "status.json: not a JSON object, ignored");
    return false;
  }
  auto st = obj.find("status");
  if (st != obj.end() && st->is_string()) {
    const std::string& s = st->get_ref<const std::string&>();
    if (s == "running") rec.state = RunState::running;
    else if (s == "completed") rec.state = RunState::completed;
    else if (s == "failed") rec.state = RunState::failed;
    else if (s == "queued") rec.state = RunState::queued;
    else note_problem(rec, "status.json: unknown status \"" + s.substr(0, 40) + "\"");
  } else {
    note_problem(rec, "status.json: no status field");
  }
  auto err = obj.find("error");
  if (err != obj.end() && err->is_string()) {
    std::string e = err->get<std::string>();
    auto nl = e.find_first_of("\r\n");
    if (nl != std::string::npos) e.resize(nl);
    if (!e.empty()) rec.error = e;
  }
  double steps = number_field(obj, "steps");
  if (known(steps) && steps > 0 && steps < 1e12) rec.planned_steps = int64_t(steps);
  double peak = number_field(obj, "peak_mem_mib");
  double total = number_field(obj, "total_time_min");
  if (known(peak)) rec.peak_mem_mib = peak;
  if (known(total) && rec.state == RunState::completed) rec.total_time_min = total;
  return true;
}

}  // namespace moelab::lab
