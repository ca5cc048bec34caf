// nanochat stdout log reader (see nanochat_log_reader.hpp).
#include "lab/nanochat_log_reader.hpp"

#include <cctype>
#include <string>

#include "lab/lenient_number.hpp"
#include "lab/metrics_reader.hpp"

namespace moelab::lab {
namespace {

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }

bool contains_ci(std::string_view s, std::string_view needle) {
  if (needle.size() > s.size()) return false;
  for (size_t i = 0; i + needle.size() <= s.size(); ++i) {
    size_t k = 0;
    while (k < needle.size() && std::tolower(static_cast<unsigned char>(s[i + k])) == needle[k]) ++k;
    if (k == needle.size()) return true;
  }
  return false;
}

// Lines that announce a failure even without a traceback (our own CLI, CUDA, C++ aborts).
bool is_error_line(std::string_view line) {
  return starts_with(line, "moelab: error:") || starts_with(line, "terminate called") ||
         contains_ci(line, "error:") || contains_ci(line, "out of memory") ||
         contains_ci(line, "segmentation fault");
}

// "step 00019 | validation loss: 4.71 | bpb: 1.32" (moelab), "Step 00250 | Validation bpb: 1.2345"
// (nanochat): a validation, its step taken from the line or else the last step seen.
bool parse_validation_line(std::string_view line, int64_t last_step, ValRow& out) {
  if (!contains_ci(line, "validation loss:") && !contains_ci(line, "validation bpb:")) return false;
  if (contains_ci(line, "minimum validation")) return false;
  ValRow v;
  v.step = last_step;
  size_t start = 0;
  while (start <= line.size()) {
    size_t bar = line.find('|', start);
    std::string_view field = trim(line.substr(start, bar == std::string_view::npos ? std::string_view::npos : bar - start));
    start = bar == std::string_view::npos ? line.size() + 1 : bar + 1;
    size_t colon = field.find(':');
    std::string key;
    for (char c : field.substr(0, colon == std::string_view::npos ? field.size() : colon))
      key += char(std::tolower(static_cast<unsigned char>(c)));
    if (colon == std::string_view::npos) {
      // "step 00019" / "Step 00250"
      if (key.rfind("step ", 0) == 0)
        if (auto s = parse_lenient_number(std::string_view(key).substr(5)); s && *s >= 0 && *s < 1e12) v.step = int64_t(*s);
      continue;
    }
    std::string_view value = field.substr(colon + 1);
    if (key == "validation loss" || key == "val loss") v.loss = parse_lenient_number(value).value_or(kUnknown);
    else if (key == "validation bpb" || key == "bpb" || key == "val bpb") v.bpb = parse_lenient_number(value).value_or(kUnknown);
  }
  if (!known(v.loss) && !known(v.bpb)) return false;
  out = v;
  return true;
}

}  // namespace

namespace {
// Whether a step line's "loss:" field reads nan or inf (any case, signed), as a diverged run prints it.
bool loss_is_non_finite(std::string_view line) {
  size_t at = line.find("| loss:");
  if (at == std::string_view::npos) return false;
  std::string_view v = line.substr(at + 7);
  v = trim(v.substr(0, v.find('|')));
  if (!v.empty() && (v.front() == '-' || v.front() == '+')) v.remove_prefix(1);
  auto ci = [&](std::string_view word) {
    if (v.size() < word.size()) return false;
    for (size_t i = 0; i < word.size(); ++i)
      if (std::tolower(static_cast<unsigned char>(v[i])) != word[i]) return false;
    return true;
  };
  return ci("nan") || ci("inf");
}
}  // namespace

bool parse_nanochat_step_line(std::string_view line, StepRow& row, int64_t* planned_steps) {
  line = trim(line);
  if (!starts_with(line, "step ")) return false;
  std::string_view rest = line.substr(5);
  size_t bar = rest.find('|');
  std::string_view head = trim(rest.substr(0, bar));  // "00139/00140 (99.29%)"
  // "NNNNN/TTTTT" must be whole: a line cut inside it could be mistaken for an earlier step.
  size_t slash = head.find('/');
  if (slash == std::string_view::npos) return false;
  auto step = parse_lenient_number(head.substr(0, slash));
  std::string_view total_text = head.substr(slash + 1);
  auto total = parse_lenient_number(total_text.substr(0, total_text.find(' ')));
  if (!step || *step < 0 || *step > 1e12 || *step != double(int64_t(*step))) return false;
  if (!total || *total <= 0 || *total > 1e12) return false;
  row = StepRow{};
  row.step = int64_t(*step);
  if (planned_steps) *planned_steps = int64_t(*total);
  while (bar != std::string_view::npos) {
    rest = rest.substr(bar + 1);
    bar = rest.find('|');
    std::string_view field = trim(rest.substr(0, bar));
    size_t colon = field.find(':');
    if (colon == std::string_view::npos) continue;
    std::string_view key = trim(field.substr(0, colon));
    std::string_view value = field.substr(colon + 1);
    if (key == "loss") row.loss = parse_lenient_number(value).value_or(kUnknown);
    else if (key == "bal") row.bal = parse_lenient_number(value).value_or(kUnknown);
    else if (key == "dt") row.dt_ms = parse_lenient_number(value, {"ms"}).value_or(kUnknown);
    else if (key == "tok/sec") row.tok_sec = parse_lenient_number(value).value_or(kUnknown);
    else if (key == "mfu" || key == "bf16_mfu") row.mfu = parse_lenient_number(value).value_or(kUnknown);
    else if (key == "drop") row.drop_rate = parse_lenient_number(value).value_or(kUnknown);
  }
  for (double* v : {&row.dt_ms, &row.tok_sec})  // never average a negative rate or duration in
    if (known(*v) && *v < 0) *v = kUnknown;
  return true;
}

void parse_nanochat_log(std::string_view text, RunRecord& rec) {
  bool in_traceback = false, saw_peak = false, saw_total = false;
  std::string traceback_last, error_line;
  size_t pos = 0, unreadable_steps = 0;
  while (pos < text.size()) {
    // Lines end in \n, \r\n, or (progress bars) a bare \r.
    size_t end = text.find_first_of("\r\n", pos);
    std::string_view line = text.substr(pos, end == std::string_view::npos ? std::string_view::npos : end - pos);
    pos = end == std::string_view::npos ? text.size() : end + 1;
    bool indented = !line.empty() && (line.front() == ' ' || line.front() == '\t');
    line = trim(line);
    if (line.empty()) continue;
    if (ValRow v; parse_validation_line(line, rec.steps.empty() ? -1 : rec.steps.back().step, v)) {
      while (!rec.vals.empty() && v.step >= 0 && rec.vals.back().step >= v.step) rec.vals.pop_back();
      rec.vals.push_back(v);
      continue;
    }
    if (contains_ci(line, "minimum validation bpb:")) {
      if (auto v = parse_lenient_number(line.substr(line.find(':') + 1))) rec.min_val_bpb = *v;
      continue;
    }
    if (starts_with(line, "step ")) {
      // Training went on, so an earlier traceback (a warning's) was not the end of the run.
      in_traceback = false;
      traceback_last.clear();
      StepRow row;
      if (parse_nanochat_step_line(line, row, &rec.planned_steps)) {
        if (!known(row.loss) && rec.diverged_step < 0 && loss_is_non_finite(line)) rec.diverged_step = row.step;
        while (!rec.steps.empty() && rec.steps.back().step >= row.step) rec.steps.pop_back();
        rec.steps.push_back(std::move(row));
      } else {
        ++unreadable_steps;
      }
      continue;
    }
    if (starts_with(line, "Peak memory usage:")) {
      if (auto v = parse_lenient_number(line.substr(18), {"MiB"})) rec.peak_mem_mib = *v;
      saw_peak = true;
      continue;
    }
    if (starts_with(line, "Total training time:")) {
      if (auto v = parse_lenient_number(line.substr(20), {"m"})) rec.total_time_min = *v;
      saw_total = true;
      continue;
    }
    if (starts_with(line, "Traceback (most recent call last)")) {
      in_traceback = true;
      traceback_last.clear();
      continue;
    }
    if (in_traceback) {
      // Frames are indented; the exception line that ends a traceback is not. With chained
      // exceptions the last such line is the one that ended the run.
      if (!indented && !starts_with(line, "During handling") && !starts_with(line, "The above exception"))
        traceback_last = std::string(line.substr(0, 400));
      continue;
    }
    if (is_error_line(line)) error_line = std::string(line.substr(0, 400));
  }
  if (unreadable_steps) note_problem(rec, std::to_string(unreadable_steps) + " unreadable step line(s) skipped");
  rec.saw_end = saw_peak || saw_total;
  if (!traceback_last.empty()) {
    rec.state = RunState::failed;
    rec.error = traceback_last;
  } else if (rec.diverged_step >= 0) {
    // A run whose loss became nan may still print its end lines: it failed all the same.
    rec.state = RunState::failed;
    rec.error = "diverged: the loss is nan/inf from step " + std::to_string(rec.diverged_step);
  } else if (rec.saw_end) {
    rec.state = RunState::completed;
  } else if (!error_line.empty()) {
    rec.state = RunState::failed;
    rec.error = error_line;
  }
  if (rec.state != RunState::completed) rec.total_time_min = kUnknown;
}

}  // namespace moelab::lab
