// Embeds data/brown.txt.gz with the assembler's .incbin (the build passes its absolute path as
// MOELAB_CORPUS_GZ), which costs no compile time, unlike a multi-megabyte array literal.
#include "data/embedded_corpus.hpp"

#include <filesystem>
#include <fstream>
#include <iterator>
#include <mutex>

#include "core/error.hpp"
#include "data/gunzip.hpp"

#ifdef MOELAB_CORPUS_GZ
__asm__(".pushsection .rodata\n"
        ".balign 16\n"
        "moelab_corpus_gz_begin:\n"
        ".incbin \"" MOELAB_CORPUS_GZ "\"\n"
        "moelab_corpus_gz_end:\n"
        ".popsection\n");
extern "C" const char moelab_corpus_gz_begin[] __asm__("moelab_corpus_gz_begin");
extern "C" const char moelab_corpus_gz_end[] __asm__("moelab_corpus_gz_end");
#endif

namespace moelab {

std::string_view embedded_corpus_compressed() {
#ifdef MOELAB_CORPUS_GZ
  return {moelab_corpus_gz_begin, size_t(moelab_corpus_gz_end - moelab_corpus_gz_begin)};
#else
  static const std::string bytes = [] {
    // The source tree's data/ folder, found from this file's own path.
    auto path = std::filesystem::path(__FILE__).parent_path().parent_path().parent_path() / "data" / "brown.txt.gz";
    std::ifstream f(path, std::ios::binary);
    if (!f)
      throw Error("the default corpus is not embedded in this build and " + path.string() +
                  " cannot be read; rebuild from the source tree or set data.text to a text file");
    return std::string(std::istreambuf_iterator<char>(f), {});
  }();
  return bytes;
#endif
}

const std::string& default_corpus_text() {
  static const std::string text = gunzip(embedded_corpus_compressed(), "embedded default corpus (data/brown.txt.gz)");
  return text;
}

}  // namespace moelab
