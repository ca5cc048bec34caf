// Sweep file loading and expansion into planned runs (see sweep_spec.hpp).
#include "lab/sweep_spec.hpp"

#include <algorithm>

#include <functional>
#include <map>
#include <set>
#include <sstream>

#include <toml++/toml.h>

#include "core/error.hpp"
#include "core/regex.hpp"
#include "lab/file_io.hpp"
#include "lab/run_naming.hpp"

namespace moelab::lab {
namespace {

std::string where(const std::filesystem::path& file, const toml::node& node) {
  const auto& src = node.source();
  std::string out = file.string();
  if (src.begin) {
    out += ':';
    out += std::to_string(src.begin.line);
  }
  return out;
}

// A TOML scalar as the override text `moelab train --set key=value` expects.
std::string scalar_text(const toml::node& node, const std::filesystem::path& file, const std::string& key) {
  if (const auto* s = node.as_string()) return s->get();
  if (const auto* i = node.as_integer()) return std::to_string(i->get());
  if (const auto* b = node.as_boolean()) return b->get() ? "true" : "false";
  if (const auto* f = node.as_floating_point()) {
    std::ostringstream os;
    os.precision(17);
    os << f->get();
    std::string t = os.str();
    if (t.find_first_of(".eEn") == std::string::npos) t += ".0";
    return t;
  }
  throw Error(where(file, node) + ": override \"" + key +
              "\" must be a string, number or boolean (arrays and dates are not config values)");
}

void flatten_set(const toml::table& t, const std::string& prefix, const std::filesystem::path& file, Overrides& out) {
  for (const auto& [k, node] : t) {
    std::string key = prefix.empty() ? std::string(k.str()) : prefix + "." + std::string(k.str());
    if (const auto* sub = node.as_table()) flatten_set(*sub, key, file, out);
    else out = merge_overrides(std::move(out), {{key, scalar_text(node, file, key)}});
  }
}

Overrides read_set(const toml::table& parent, const char* field, const std::filesystem::path& file) {
  Overrides out;
  const toml::node* node = parent.get(field);
  if (!node) return out;
  const auto* t = node->as_table();
  if (!t) throw Error(where(file, *node) + ": \"" + field + "\" must be a table, e.g. set = { \"moe.dispatch\" = \"capacity\" }");
  flatten_set(*t, "", file, out);
  return out;
}

std::string get_string(const toml::table& t, const char* key, const std::filesystem::path& file, std::string fallback = "") {
  const toml::node* n = t.get(key);
  if (!n) return fallback;
  if (const auto* s = n->as_string()) return s->get();
  throw Error(where(file, *n) + ": \"" + key + "\" must be a string");
}

int64_t get_int(const toml::table& t, const char* key, const std::filesystem::path& file, int64_t fallback, int64_t lo) {
  const toml::node* n = t.get(key);
  if (!n) return fallback;
  const auto* i = n->as_integer();
  if (!i || i->get() < lo)
    throw Error(where(file, *n) + ": \"" + key + "\" must be an integer >= " + std::to_string(lo));
  return i->get();
}

void check_name(const std::string& name, const std::filesystem::path& file, const toml::node& node) {
  if (name.empty() || name == "." || name == ".." || name == "metrics" || name == "figures")
    throw Error(where(file, node) + ": run name \"" + name + "\" is not allowed; pick another");
  for (char c : name)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.'))
      throw Error(where(file, node) + ": run name \"" + name +
                  "\" may hold only letters, digits, '_', '-' and '.' (it becomes a folder name)");
}

// Fill "{key}" placeholders of a grid's name template from the combination's values.
std::string fill_template(const std::string& tmpl, const Overrides& values, const std::filesystem::path& file,
                          const toml::node& node) {
  std::string out;
  for (size_t i = 0; i < tmpl.size(); ++i) {
    if (tmpl[i] != '{') {
      out += tmpl[i];
      continue;
    }
    size_t close = tmpl.find('}', i);
    if (close == std::string::npos) throw Error(where(file, node) + ": unclosed '{' in grid name \"" + tmpl + "\"");
    std::string key = tmpl.substr(i + 1, close - i - 1);
    bool found = false;
    for (const auto& [k, v] : values)
      if (k == key) {
        out += v;
        found = true;
      }
    if (!found)
      throw Error(where(file, node) + ": grid name \"" + tmpl + "\" names {" + key + "}, which is not one of the grid's axes");
    i = close;
  }
  return out;
}

void expand_grid(const toml::table& grid, const std::filesystem::path& file, const Overrides& common,
                 std::vector<PlannedRun>& runs) {
  const toml::node* axes_node = grid.get("axes");
  if (!axes_node || !axes_node->as_table())
    throw Error(where(file, grid) + ": a [[grid]] needs axes = { \"key\" = [values, ...], ... }");
  std::vector<std::pair<std::string, std::vector<std::string>>> axes;
  std::function<void(const toml::table&, const std::string&)> collect = [&](const toml::table& t, const std::string& prefix) {
    for (const auto& [k, node] : t) {
      std::string key = prefix.empty() ? std::string(k.str()) : prefix + "." + std::string(k.str());
      if (const auto* sub = node.as_table()) {
        collect(*sub, key);
        continue;
      }
      const auto* arr = node.as_array();
      if (!arr || arr->empty())
        throw Error(where(file, node) + ": grid axis \"" + key + "\" must be a non-empty array of values");
      std::vector<std::string> values;
      for (const auto& v : *arr) values.push_back(scalar_text(v, file, key));
      axes.emplace_back(key, std::move(values));
    }
  };
  collect(*axes_node->as_table(), "");
  std::string tmpl = get_string(grid, "name", file);
  if (tmpl.empty()) {
    for (const auto& [k, v] : axes) {
      std::string last = k.substr(k.rfind('.') + 1);
      tmpl += (tmpl.empty() ? "" : "_") + last + "{" + k + "}";
    }
  }
  Overrides grid_set = merge_overrides(common, read_set(grid, "set", file));
  std::vector<size_t> idx(axes.size(), 0);
  for (size_t combos = 0; combos < 100000; ++combos) {
    Overrides values;
    for (size_t a = 0; a < axes.size(); ++a) values.emplace_back(axes[a].first, axes[a].second[idx[a]]);
    std::string name = fill_template(tmpl, values, file, grid);
    check_name(name, file, grid);
    runs.push_back({name, merge_overrides(grid_set, values), 0});
    size_t a = axes.size();
    while (a > 0) {
      --a;
      if (++idx[a] < axes[a].second.size()) break;
      idx[a] = 0;
      if (a == 0) return;
    }
    if (axes.empty()) return;
  }
}

template <class F>
void each_table(const toml::table& root, const char* key, const std::filesystem::path& file, F&& f) {
  const toml::node* n = root.get(key);
  if (!n) return;
  if (const auto* t = n->as_table()) {
    f(*t);
    return;
  }
  const auto* arr = n->as_array();
  if (!arr) throw Error(where(file, *n) + ": \"" + key + "\" must be a table or an array of tables ([[" + key + "]])");
  for (const auto& item : *arr) {
    const auto* t = item.as_table();
    if (!t) throw Error(where(file, item) + ": each \"" + key + "\" entry must be a table");
    f(*t);
  }
}

}  // namespace

Overrides merge_overrides(Overrides base, const Overrides& more) {
  for (const auto& [k, v] : more) {
    bool replaced = false;
    for (auto& [bk, bv] : base)
      if (bk == k) {
        bv = v;
        replaced = true;
      }
    if (!replaced) base.emplace_back(k, v);
  }
  return base;
}

double parse_duration(const std::string& text, const std::string& what) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  std::string unit = text.substr(used);
  double scale = unit.empty() || unit == "s" ? 1 : unit == "m" ? 60 : unit == "h" ? 3600 : -1;
  if (used == 0 || scale < 0 || !(v >= 0))
    throw Error(what + ": \"" + text + "\" is not a duration; write seconds (600) or \"90s\", \"10m\", \"1.5h\"");
  return v * scale;
}

SweepSpec sweep_from_toml_text(const std::string& text, const std::filesystem::path& file) {
  toml::table root;
  try {
    root = toml::parse(text, file.string());
  } catch (const toml::parse_error& e) {
    std::ostringstream os;
    os << file.string() << ":" << e.source().begin.line << ": " << e.description();
    throw Error(os.str());
  }
  static const std::set<std::string> known = {"name", "title", "base", "set", "baseline", "repeat", "max_retries", "timeout",
                                              "devices", "workers", "run", "grid", "on_failure"};
  for (const auto& [k, node] : root)
    if (!known.count(std::string(k.str())))
      throw Error(where(file, node) + ": unknown key \"" + std::string(k.str()) +
                  "\" (known: name, title, base, set, baseline, repeat, max_retries, timeout, devices, workers, "
                  "[[run]], [[grid]], [[on_failure]])");

  SweepSpec spec;
  spec.file = file;
  spec.name = get_string(root, "name", file, file.stem().string());
  spec.title = get_string(root, "title", file);
  spec.baseline = get_string(root, "baseline", file);
  std::string base = get_string(root, "base", file);
  if (base.empty()) throw Error(file.string() + ": missing base = \"<config>.toml\" (relative to the sweep file's folder)");
  spec.base_config = std::filesystem::path(base).is_absolute() ? std::filesystem::path(base) : file.parent_path() / base;
  spec.max_retries = int(get_int(root, "max_retries", file, 0, 0));
  int repeat = int(get_int(root, "repeat", file, 1, 1));
  spec.workers = int(get_int(root, "workers", file, 1, 1));
  if (const toml::node* t = root.get("timeout")) {
    if (const auto* s = t->as_string()) spec.timeout_s = parse_duration(s->get(), where(file, *t) + ": timeout");
    else if (auto v = t->value<double>()) spec.timeout_s = *v;
    else throw Error(where(file, *t) + ": timeout must be seconds or a string like \"10m\"");
    if (spec.timeout_s < 0) throw Error(where(file, *t) + ": timeout must not be negative");
  }
  if (const toml::node* d = root.get("devices")) {
    if (const auto* s = d->as_string()) {
      if (s->get() != "cpu") throw Error(where(file, *d) + ": devices must be \"cpu\" or an array of GPU indices like [0, 1]");
    } else if (const auto* arr = d->as_array()) {
      for (const auto& g : *arr) {
        if (const auto* i = g.as_integer(); i && i->get() >= 0) spec.gpus.push_back(std::to_string(i->get()));
        else throw Error(where(file, g) + ": GPU indices in devices must be integers >= 0");
      }
      if (spec.gpus.empty()) throw Error(where(file, *d) + ": devices = [] lists no GPU; write \"cpu\" or [0, 1, ...]");
    } else {
      throw Error(where(file, *d) + ": devices must be \"cpu\" or an array of GPU indices like [0, 1]");
    }
  }
  Overrides common = read_set(root, "set", file);

  std::vector<PlannedRun> planned;
  each_table(root, "run", file, [&](const toml::table& t) {
    std::string name = get_string(t, "name", file);
    check_name(name, file, t);
    planned.push_back({name, merge_overrides(common, read_set(t, "set", file)), 0});
  });
  each_table(root, "grid", file, [&](const toml::table& t) { expand_grid(t, file, common, planned); });
  if (planned.empty()) throw Error(file.string() + ": no runs; add [[run]] name = \"...\" set = {...} or a [[grid]]");

  std::set<std::string> names;
  for (const auto& p : planned)
    for (int r = 0; r < repeat; ++r) {
      PlannedRun run = p;
      run.name = repeat_name(p.name, r);
      run.repeat_index = r;
      if (!names.insert(run.name).second)
        throw Error(file.string() + ": two runs are named \"" + run.name + "\"; names must be unique");
      spec.runs.push_back(std::move(run));
    }
  if (!spec.baseline.empty() && !names.count(spec.baseline))
    throw Error(file.string() + ": baseline \"" + spec.baseline + "\" is not one of the runs");

  each_table(root, "on_failure", file, [&](const toml::table& t) {
    RetryRule rule;
    rule.match = get_string(t, "match", file);
    if (rule.match.empty()) throw Error(where(file, t) + ": an [[on_failure]] rule needs match = \"<regex>\"");
    try {
      Regex check(rule.match, true);  // as the runner matches it
    } catch (const Error& e) {
      throw Error(where(file, t) + ": match \"" + rule.match + "\" is not a valid regex: " + e.what());
    }
    rule.set = read_set(t, "set", file);
    spec.on_failure.push_back(std::move(rule));
  });
  return spec;
}

void select_runs(SweepSpec& spec, const std::vector<std::string>& names) {
  std::string unknown;
  for (const auto& n : names) {
    bool found = false;
    for (const auto& r : spec.runs) found = found || r.name == n;
    if (!found) unknown += (unknown.empty() ? "\"" : ", \"") + n + "\"";
  }
  if (!unknown.empty()) {
    std::string all;
    for (const auto& r : spec.runs) all += (all.empty() ? "" : ", ") + r.name;
    throw Error(spec.file.string() + ": --only names no run " + unknown + "; its runs are: " + all);
  }
  std::vector<PlannedRun> kept;
  for (auto& r : spec.runs)
    if (std::find(names.begin(), names.end(), r.name) != names.end()) kept.push_back(std::move(r));
  spec.runs = std::move(kept);
}

void vary_repeat_seeds(SweepSpec& spec, int64_t base_seed) {
  for (auto& run : spec.runs) {
    if (run.repeat_index == 0) continue;
    int64_t seed = base_seed;
    for (const auto& [k, v] : run.overrides)
      if (k == "train.seed") {
        try {
          size_t used = 0;
          seed = std::stoll(v, &used);
          if (used != v.size()) throw std::invalid_argument(v);
        } catch (const std::exception&) {
          throw Error(spec.file.string() + ": run \"" + run.name + "\": train.seed = " + v + " is not an integer");
        }
      }
    run.overrides = merge_overrides(run.overrides, {{"train.seed", std::to_string(seed + run.repeat_index)}});
  }
}

SweepSpec load_sweep(const std::filesystem::path& file) {
  auto text = read_file(file, 1 << 20);
  if (!text) throw Error("cannot read sweep file " + file.string() + ": check the path");
  return sweep_from_toml_text(*text, file);
}

}  // namespace moelab::lab
