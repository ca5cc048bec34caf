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

const char* json_kind(const json& v) {
  switch (v.type()) {
    case json::value_t::string: return "a string";
    case json::value_t::object: return "an object";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::array: return "a list";
    default: return "a number";
  }
}

// The MoE layer count a step's per-layer lists must agree with, and what set it (for the message).
struct LayerCount {
  size_t n = 0;  // 0: not known yet
  std::string from;
};

// A per-MoE-layer list of the routing statistics (max_vio, router_entropy, bias_range). Absent
// or null: empty (older and dense runs). Not a list, or a list whose length disagrees with the
// run's MoE layers: empty, with a problem naming the line and the key, so one broken writer
// cannot show a plausible-looking number for the wrong layer. A non-number element is unknown.
std::vector<double> layer_list_field(const json& obj, const char* key, LayerCount& layers, RunRecord& rec,
                                     size_t line_no) {
  std::vector<double> out;
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return out;
  const std::string where = "metrics.jsonl line " + std::to_string(line_no) + ": " + key;
  if (!it->is_array()) {
    note_problem(rec, where + " is " + json_kind(*it) + ", not a list of one number per MoE layer; shown as unknown");
    return out;
  }
  if (it->empty() || it->size() > kMaxLayers) {
    note_problem(rec, where + " has " + std::to_string(it->size()) + " values, not one per MoE layer; shown as unknown");
    return out;
  }
  if (layers.n != 0 && it->size() != layers.n) {
    note_problem(rec, where + " has " + std::to_string(it->size()) + " values but the run has " + std::to_string(layers.n) +
                          " MoE layers (" + layers.from + "); shown as unknown");
    return out;
  }
  if (layers.n == 0) {
    layers.n = it->size();
    layers.from = std::string("as ") + key + " on this line";
  }
  bool bad = false;
  out.reserve(it->size());
  for (const auto& v : *it) {
    double x = v.is_number() ? v.get<double>() : kUnknown;
    bad = bad || !std::isfinite(x);
    out.push_back(std::isfinite(x) ? x : kUnknown);
  }
  if (bad) note_problem(rec, where + " holds a value that is not a finite number; that layer is shown as unknown");
  return out;
}

// z_loss: one number per step. metrics.jsonl is written by moelab, so a string is a broken
// writer rather than a log's formatting and is refused with a message.
double strict_number_field(const json& obj, const char* key, RunRecord& rec, size_t line_no) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return kUnknown;
  if (it->is_number()) {
    double v = it->get<double>();
    if (std::isfinite(v)) return v;
  }
  note_problem(rec, "metrics.jsonl line " + std::to_string(line_no) + ": " + key + " is " +
                        (it->is_number() ? std::string("not finite") : std::string(json_kind(*it))) +
                        ", not a number; shown as unknown");
  return kUnknown;
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
  // The per-layer lists must agree with each other, with expert_load and with the step before.
  LayerCount layers;
  if (!row.expert_load.empty()) {
    layers = {row.expert_load.size(), "as expert_load on this line"};
  } else if (!rec.steps.empty()) {
    const StepRow& prev = rec.steps.back();
    size_t n = prev.expert_load.size();
    for (const auto* list : {&prev.max_vio, &prev.router_entropy, &prev.bias_range})
      if (n == 0) n = list->size();
    if (n) layers = {n, "as on line(s) before"};
  }
  row.max_vio = layer_list_field(obj, "max_vio", layers, rec, line_no);
  row.router_entropy = layer_list_field(obj, "router_entropy", layers, rec, line_no);
  row.bias_range = layer_list_field(obj, "bias_range", layers, rec, line_no);
  row.z_loss = strict_number_field(obj, "z_loss", rec, line_no);
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
