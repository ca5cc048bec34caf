#include "core/regex.hpp"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "core/error.hpp"

namespace moelab {

namespace {

std::string pcre2_error_text(int code) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(code, buf, sizeof buf);
  return reinterpret_cast<const char*>(buf);
}

}  // namespace

struct Regex::Compiled {
  pcre2_code* code = nullptr;
  bool jit = false;
  ~Compiled() { pcre2_code_free(code); }
};

Regex::Regex(const std::string& pattern, bool ignore_case) : pattern_(pattern) {
  auto compiled = std::make_shared<Compiled>();
  // ECMAScript's line terminators are \n and \r: both end `.`, and `$` holds at the end only.
  pcre2_compile_context* context = pcre2_compile_context_create(nullptr);
  pcre2_set_newline(context, PCRE2_NEWLINE_ANYCRLF);
  const uint32_t options = PCRE2_DOLLAR_ENDONLY | (ignore_case ? PCRE2_CASELESS : 0u);
  int err = 0;
  PCRE2_SIZE offset = 0;
  compiled->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), options, &err, &offset,
                                 context);
  pcre2_compile_context_free(context);
  if (!compiled->code)
    throw Error("invalid regular expression \"" + pattern + "\": " + pcre2_error_text(err) + " at offset " +
                std::to_string(offset));
  compiled->jit = pcre2_jit_compile(compiled->code, PCRE2_JIT_COMPLETE) == 0;
  compiled_ = std::move(compiled);
}

std::optional<RegexMatch> Regex::match(std::string_view text, bool whole) const {
  pcre2_match_data* data = pcre2_match_data_create_from_pattern(compiled_->code, nullptr);
  if (!data) throw Error("out of memory matching regular expression \"" + pattern_ + "\"");
  const auto subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  // The JIT's fast path takes no anchoring options it was not compiled for: a whole-text match
  // goes through the interpreter.
  const uint32_t options = whole ? PCRE2_ANCHORED | PCRE2_ENDANCHORED : 0u;
  const int rc = compiled_->jit && !whole ? pcre2_jit_match(compiled_->code, subject, text.size(), 0, 0, data, nullptr)
                                          : pcre2_match(compiled_->code, subject, text.size(), 0, options, data, nullptr);
  if (rc == PCRE2_ERROR_NOMATCH) {
    pcre2_match_data_free(data);
    return std::nullopt;
  }
  if (rc < 0) {
    pcre2_match_data_free(data);
    throw Error("matching regular expression \"" + pattern_ + "\" failed: " + pcre2_error_text(rc));
  }
  RegexMatch m;
  const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(data);
  const uint32_t pairs = pcre2_get_ovector_count(data);
  m.groups_.resize(pairs);
  for (uint32_t i = 0; i < pairs && i < uint32_t(rc); ++i)
    if (ov[2 * i] != PCRE2_UNSET) m.groups_[i] = std::string(text.substr(ov[2 * i], ov[2 * i + 1] - ov[2 * i]));
  pcre2_match_data_free(data);
  return m;
}

std::optional<RegexMatch> Regex::search(std::string_view text) const { return match(text, false); }

std::optional<RegexMatch> Regex::full_match(std::string_view text) const { return match(text, true); }

}  // namespace moelab
