// The project's one regular-expression engine: PCRE2 (8-bit, bytes, no UTF), set up to match as
// std::regex's default ECMAScript grammar does where the two could differ: `.` matches neither
// \n nor \r, and `$` (without (?m)) matches only at the very end of the text, not before a final
// newline. Patterns are compiled once (JIT where available); matching is thread-safe.
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace moelab {

// The groups of one match: group 0 is the whole match; a group that took no part in it (an
// optional group skipped) is not matched, and its text is "".
class RegexMatch {
 public:
  size_t size() const { return groups_.size(); }
  bool matched(size_t i) const { return i < groups_.size() && groups_[i].has_value(); }
  std::string str(size_t i) const { return matched(i) ? *groups_[i] : std::string(); }

 private:
  friend class Regex;
  std::vector<std::optional<std::string>> groups_;
};

class Regex {
 public:
  // Compiles pattern; throws moelab::Error with PCRE2's message and the offset where it failed.
  explicit Regex(const std::string& pattern, bool ignore_case = false);

  // The first match anywhere in text (as std::regex_search), or nullopt.
  std::optional<RegexMatch> search(std::string_view text) const;
  // A match of the whole text (as std::regex_match), or nullopt.
  std::optional<RegexMatch> full_match(std::string_view text) const;
  bool found_in(std::string_view text) const { return search(text).has_value(); }

  const std::string& pattern() const { return pattern_; }

 private:
  struct Compiled;
  std::optional<RegexMatch> match(std::string_view text, bool whole) const;
  std::string pattern_;
  std::shared_ptr<const Compiled> compiled_;
};

}  // namespace moelab
