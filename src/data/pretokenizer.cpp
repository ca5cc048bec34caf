// PCRE2 wrapper for the pre-split regex. Per-thread match data and JIT stack (thread_local)
// keep split() free of locks and of allocation per call.
#include "data/pretokenizer.hpp"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "core/error.hpp"

namespace moelab {

const char* const kGpt4SplitPattern =
    R"('(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+)";

struct PreTokenizer::Compiled {
  pcre2_code* code = nullptr;
  bool jit = false;
  ~Compiled() { pcre2_code_free(code); }
};

namespace {

// Scratch one thread needs to run matches: match data for one (whole-match) pair of offsets
// and a JIT stack larger than PCRE2's 32 KiB default, for very long runs of one class.
struct MatchScratch {
  pcre2_match_data* data = pcre2_match_data_create(1, nullptr);
  pcre2_match_context* context = pcre2_match_context_create(nullptr);
  pcre2_jit_stack* stack = pcre2_jit_stack_create(32 * 1024, 4 * 1024 * 1024, nullptr);
  MatchScratch() { pcre2_jit_stack_assign(context, nullptr, stack); }
  ~MatchScratch() {
    pcre2_jit_stack_free(stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(data);
  }
};

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(code, buf, sizeof buf);
  return reinterpret_cast<const char*>(buf);
}

}  // namespace

PreTokenizer::PreTokenizer(const std::string& pattern) : pattern_(pattern), compiled_(std::make_unique<Compiled>()) {
  int err = 0;
  PCRE2_SIZE offset = 0;
  compiled_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                  PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &offset, nullptr);
  if (!compiled_->code)
    throw Error("tokenizer split pattern does not compile at offset " + std::to_string(offset) + ": " +
                pcre2_message(err) + " (pattern: " + pattern + ")");
  compiled_->jit = pcre2_jit_compile(compiled_->code, PCRE2_JIT_COMPLETE) == 0;
}

PreTokenizer::~PreTokenizer() = default;

void PreTokenizer::split(std::string_view text, const std::function<void(std::string_view)>& emit) const {
  thread_local MatchScratch scratch;
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t pos = 0;
  while (pos < text.size()) {
    int rc = compiled_->jit ? pcre2_jit_match(compiled_->code, subject, text.size(), pos, 0, scratch.data, scratch.context)
                            : pcre2_match(compiled_->code, subject, text.size(), pos, 0, scratch.data, scratch.context);
    if (rc == PCRE2_ERROR_NOMATCH) {
      emit(text.substr(pos));  // trailing bytes no alternative matches (invalid UTF-8)
      return;
    }
    if (rc < 0) throw Error("tokenizer pre-split failed at byte offset " + std::to_string(pos) + ": " + pcre2_message(rc));
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(scratch.data);
    size_t begin = ov[0], end = ov[1];
    if (begin > pos) emit(text.substr(pos, begin - pos));  // a run of invalid UTF-8
    if (end == begin) {  // cannot happen with the patterns used (each alternative eats a byte); stay safe
      end = begin + 1;
      emit(text.substr(begin, 1));
    } else {
      emit(text.substr(begin, end - begin));
    }
    pos = end;
  }
}

}  // namespace moelab
