// Helpers shared by the data tests: a scratch folder removed at the end of a test, a small
// tokenizer trained once on a slice of the default corpus, and prepare options that use it.
#pragma once
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/rng.hpp"
#include "data/embedded_corpus.hpp"
#include "data/prepare.hpp"
#include "data/tokenizer.hpp"

namespace moelab::testing {

class ScratchDir {
 public:
  ScratchDir() {
    static uint64_t counter = 0;
    path_ = std::filesystem::temp_directory_path() /
            ("moelab_data_test_" + std::to_string(Rng(uint64_t(::getpid()), counter++).next_u64()));
    std::filesystem::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string write(const std::string& name, const std::string& bytes) const {
    std::ofstream(file(name), std::ios::binary) << bytes;
    return file(name);
  }
  std::string str() const { return path_.string(); }

 private:
  std::filesystem::path path_;
};

// 512 ids, trained on the first 300 kB of the corpus.
inline const Tokenizer& tiny_tokenizer() {
  static const Tokenizer tok = train_tokenizer({std::string_view(default_corpus_text()).substr(0, 300'000)}, 512, 2);
  return tok;
}

// Quiet options to prepare `inputs` into `out` (a file name in dir) with the tiny tokenizer,
// saved as dir/tok.txt.
inline PrepareOptions tiny_prepare(const ScratchDir& dir, std::vector<std::string> inputs, const std::string& out = "out") {
  PrepareOptions opt;
  opt.tokenizer = dir.file("tok.txt");
  tiny_tokenizer().save(opt.tokenizer);
  opt.inputs = std::move(inputs);
  opt.out = dir.file(out);
  opt.progress = false;
  return opt;
}

}  // namespace moelab::testing
