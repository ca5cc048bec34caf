// Experiment folder reader and run status rules (see experiment_reader.hpp).
#include "lab/experiment_reader.hpp"

#include <algorithm>
#include <map>
#include <optional>
#include <sstream>

#include <nlohmann/json.hpp>
#include <toml++/toml.h>

#include "core/folder_lock.hpp"
#include "lab/file_io.hpp"
#include "lab/lenient_number.hpp"
#include "lab/metrics_reader.hpp"
#include "lab/nanochat_log_reader.hpp"

namespace moelab::lab {
namespace {

using nlohmann::json;

constexpr size_t kMaxLogBytes = size_t(256) << 20;

std::string minutes_text(double seconds) {
  std::ostringstream os;
  os.precision(1);
  os << std::fixed << seconds / 60.0 << "m";
  return os.str();
}

// Newest change among the run's files (smallest age), or unknown when none exists.
double newest_age(const std::vector<fs::path>& files) {
  double age = kUnknown;
  for (const auto& f : files)
    if (auto a = seconds_since_modified(f)) age = known(age) ? std::min(age, *a) : *a;
  return age;
}

// The running-or-gone decision shared by run folders and logs. `writer_alive` is what the folder's
// lock says (a run folder's trainer holds it while it runs; nullopt: no lock to ask, as for a
// log file): a run whose writer is gone is not running, however recent its files.
void apply_liveness(RunRecord& rec, const ReadOptions& opt, std::optional<bool> writer_alive = std::nullopt) {
  if (rec.state != RunState::running && rec.state != RunState::unknown) return;
  if (rec.state == RunState::unknown && rec.saw_end) {
    rec.state = RunState::completed;
    return;
  }
  bool has_data = !rec.steps.empty() || rec.state == RunState::running;
  if (!has_data) return;  // nothing written at all: stays unknown
  if (writer_alive != std::optional<bool>(false) && known(rec.age_s) && rec.age_s <= opt.stale_s) {
    rec.state = RunState::running;
    return;
  }
  rec.state = RunState::failed;
  if (rec.error.empty() && writer_alive == std::optional<bool>(false)) {
    std::string where = rec.steps.empty() ? "before its first step" : "after step " + std::to_string(rec.steps.back().step);
    rec.error = "stopped " + where + " without an end record (its trainer is gone: the folder is not locked)";
  } else if (rec.error.empty()) {
    std::string where = rec.steps.empty() ? "before its first step" : "after step " + std::to_string(rec.steps.back().step);
    rec.error = "stopped " + where + " without an end record (no update for " +
                (known(rec.age_s) ? minutes_text(rec.age_s) : std::string("a while")) + ")";
  }
}

void flatten_toml(const toml::table& table, const std::string& prefix, std::vector<std::pair<std::string, std::string>>& out) {
  for (const auto& [key, node] : table) {
    std::string name = prefix.empty() ? std::string(key.str()) : prefix + "." + std::string(key.str());
    if (const auto* sub = node.as_table()) {
      flatten_toml(*sub, name, out);
    } else if (const auto* s = node.as_string()) {
      out.emplace_back(name, s->get());
    } else {
      std::ostringstream os;
      node.visit([&os](const auto& v) { os << v; });
      out.emplace_back(name, os.str());
    }
  }
}

void read_sweep_json(const fs::path& file, RunRecord& rec) {
  auto text = read_file(file, 1 << 20);
  if (!text) return;
  json obj = json::parse(*text, nullptr, false);
  if (obj.is_discarded() || !obj.is_object()) {
    note_problem(rec, "sweep.json: not a JSON object, ignored");
    return;
  }
  if (auto it = obj.find("origin"); it != obj.end() && it->is_string()) rec.origin = *it;
  if (auto it = obj.find("attempt_kind"); it != obj.end() && it->is_string()) rec.attempt_kind = *it;
  if (auto it = obj.find("overrides"); it != obj.end() && it->is_object())
    for (const auto& [k, v] : it->items()) rec.overrides.emplace_back(k, v.is_string() ? v.get<std::string>() : v.dump());
  if (auto it = obj.find("changes"); it != obj.end() && it->is_object())
    for (const auto& [k, v] : it->items()) rec.changes.emplace_back(k, v.is_string() ? v.get<std::string>() : v.dump());
}

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }

}  // namespace

std::string last_error_line(std::string_view text) {
  static const char* kMarks[] = {"error", "exception", "assert", "fault", "abort", "terminate called",
                                 "killed", "what():", "out of memory", "panic"};
  std::string found;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find_first_of("\r\n", pos);
    std::string_view line = trim(text.substr(pos, end == std::string_view::npos ? std::string_view::npos : end - pos));
    pos = end == std::string_view::npos ? text.size() : end + 1;
    if (line.empty()) continue;
    std::string lower(line.substr(0, 400));
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return char(std::tolower(c)); });
    for (const char* m : kMarks) {
      if (lower.find(m) != std::string::npos) {
        found.assign(line.substr(0, 400));
        break;
      }
    }
  }
  if (starts_with(found, "moelab: error: ")) found.erase(0, 15);
  return found;
}

bool is_run_folder(const fs::path& dir) {
  std::error_code ec;
  for (const char* f : {"status.json", "metrics.jsonl", "config.toml", "sweep.json", "stdout.log"})
    if (fs::exists(dir / f, ec)) return true;
  return false;
}

RunRecord read_run_folder(const fs::path& dir, const ReadOptions& opt) {
  RunRecord rec;
  rec.name = dir.filename().string();
  rec.source = dir.string();
  read_sweep_json(dir / "sweep.json", rec);

  bool have_status = false;
  if (auto status = read_file(dir / "status.json", 1 << 20)) have_status = parse_status_json(*status, rec);
  // Keep what status.json said; metrics only fill in numbers.
  RunState from_status = rec.state;
  std::string status_error = rec.error;

  if (auto metrics = read_file(dir / "metrics.jsonl", kMaxLogBytes)) {
    if (looks_binary(metrics->substr(0, 4096))) note_problem(rec, "metrics.jsonl: binary data, not read");
    else parse_metrics_jsonl(*metrics, rec);
  } else if (auto out = read_file(dir / "stdout.log", kMaxLogBytes); out && !looks_binary(out->substr(0, 4096))) {
    // No metrics file (an older trainer, or another program): the step lines of stdout will do.
    RunRecord from_log;
    parse_nanochat_log(*out, from_log);
    rec.steps = std::move(from_log.steps);
    if (known(from_log.peak_mem_mib)) rec.peak_mem_mib = from_log.peak_mem_mib;
    if (known(from_log.total_time_min)) rec.total_time_min = from_log.total_time_min;
    rec.saw_end = rec.saw_end || from_log.saw_end;
    if (!rec.steps.empty()) note_problem(rec, "no metrics.jsonl: steps read from stdout.log");
  }
  if (rec.steps.empty() && from_status != RunState::queued && !fs::exists(dir / "metrics.jsonl"))
    note_problem(rec, "no metrics.jsonl");

  if (fs::exists(dir / "config.toml")) {
    try {
      toml::table t = toml::parse_file((dir / "config.toml").string());
      flatten_toml(t, "", rec.config);
    } catch (const std::exception& e) {
      note_problem(rec, "config.toml: unreadable, not compared");
    }
  }

  rec.state = have_status ? from_status : RunState::unknown;
  rec.error = status_error;
  rec.age_s = newest_age({dir / "status.json", dir / "metrics.jsonl", dir / "stdout.log", dir / "stderr.log"});
  std::optional<bool> writer_alive;
  try {
    writer_alive = FolderLock::is_held(dir);
  } catch (...) {
  }
  apply_liveness(rec, opt, writer_alive);
  if (rec.state == RunState::failed && rec.error.empty())
    rec.error = last_error_line(read_tail(dir / "stderr.log", 64 << 10));
  if (rec.state != RunState::completed && !rec.saw_end) rec.total_time_min = kUnknown;
  return rec;
}

RunRecord read_log_file(const fs::path& file, const ReadOptions& opt) {
  RunRecord rec;
  rec.name = file.stem().string();
  rec.source = file.string();
  auto text = read_file(file, kMaxLogBytes);
  if (!text) {
    note_problem(rec, "cannot read " + file.filename().string());
    return rec;
  }
  if (looks_binary(text->substr(0, 4096))) {
    note_problem(rec, file.filename().string() + ": binary data, not a training log");
    return rec;
  }
  parse_nanochat_log(*text, rec);
  rec.age_s = newest_age({file});
  apply_liveness(rec, opt);
  if (rec.steps.empty() && rec.state == RunState::unknown) note_problem(rec, "no step lines found");
  return rec;
}

std::string experiment_name_from_dir(const fs::path& dir) {
  fs::path d = dir;
  if (d.filename().empty()) d = d.parent_path();
  std::string name = d.filename().string();
  // Drop a "YYYYMMDD_HHMMSS_" prefix.
  if (name.size() > 16 && name[8] == '_' && name[15] == '_' &&
      std::all_of(name.begin(), name.begin() + 8, ::isdigit) && std::all_of(name.begin() + 9, name.begin() + 15, ::isdigit))
    name = name.substr(16);
  for (char& c : name)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.')) c = '_';
  return name.empty() ? "experiment" : name;
}

Experiment read_experiment(const fs::path& dir, const ReadOptions& opt) {
  Experiment ex;
  ex.dir = fs::absolute(dir).lexically_normal();
  if (ex.dir.filename().empty()) ex.dir = ex.dir.parent_path();
  ex.name = experiment_name_from_dir(ex.dir);
  std::vector<std::string> order;
  if (auto meta = read_file(dir / "experiment.json", 1 << 20)) {
    json obj = json::parse(*meta, nullptr, false);
    if (obj.is_object()) {
      if (auto it = obj.find("name"); it != obj.end() && it->is_string() && !it->get<std::string>().empty())
        ex.name = experiment_name_from_dir(it->get<std::string>());
      if (auto it = obj.find("title"); it != obj.end() && it->is_string()) ex.title = *it;
      if (auto it = obj.find("baseline"); it != obj.end() && it->is_string()) ex.baseline = *it;
      if (auto it = obj.find("runs"); it != obj.end() && it->is_array())
        for (const auto& r : *it)
          if (r.is_string()) order.push_back(r);
    } else {
      ex.problems.push_back("experiment.json: not a JSON object, ignored");
    }
  }
  if (ex.title.empty()) ex.title = ex.name + " progress";

  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    ex.problems.push_back(dir.string() + " is not a folder");
    return ex;
  }
  struct Found {
    RunRecord rec;
    double age;
  };
  std::vector<Found> found;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const fs::path p = it->path();
    std::error_code e2;
    if (it->is_directory(e2)) {
      if (is_run_folder(p)) found.push_back({read_run_folder(p, opt), 0});
    } else if (it->is_regular_file(e2) && p.extension() == ".log") {
      found.push_back({read_log_file(p, opt), 0});
    }
  }
  for (auto& f : found) f.age = known(f.rec.age_s) ? f.rec.age_s : 0;
  std::map<std::string, size_t> rank;
  for (size_t i = 0; i < order.size(); ++i) rank.emplace(order[i], i);
  // Recorded sweep order first; others oldest first (the order they were started in).
  std::stable_sort(found.begin(), found.end(), [&](const Found& a, const Found& b) {
    auto ra = rank.find(a.rec.name), rb = rank.find(b.rec.name);
    bool ka = ra != rank.end(), kb = rb != rank.end();
    if (ka != kb) return ka;
    if (ka) return ra->second < rb->second;
    if (a.age != b.age) return a.age > b.age;
    return a.rec.name < b.rec.name;
  });
  for (auto& f : found) ex.runs.push_back(std::move(f.rec));
  return ex;
}

}  // namespace moelab::lab
