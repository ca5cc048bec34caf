// Builds and caches the shard folder of the embedded corpus.
#include "data/corpus_shards.hpp"

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <unistd.h>

#include "core/error.hpp"
#include "data/embedded_corpus.hpp"
#include "data/prepare.hpp"
#include "data/tokenizer.hpp"

namespace moelab {
namespace fs = std::filesystem;

std::string corpus_shards_dir(const DataConfig& cfg) {
  if (!cfg.dir.empty()) return cfg.dir;
  std::string root;
  if (const char* c = std::getenv("MOELAB_CACHE"); c && *c) root = c;
  else if (const char* h = std::getenv("HOME"); h && *h) root = std::string(h) + "/.cache/moelab";
  else root = ".moelab-cache";
  char name[96];
  std::snprintf(name, sizeof name, "brown-bpe%lld-val%g", (long long)cfg.vocab_size, cfg.val_fraction);
  return root + "/" + name;
}

std::string ensure_corpus_shards(const DataConfig& cfg) {
  const std::string dir = corpus_shards_dir(cfg);
  if (fs::exists(dir + "/meta.json")) return dir;
  std::error_code ec;
  fs::create_directories(fs::path(dir).parent_path(), ec);
  if (ec) throw Error("cannot create the corpus cache folder '" + fs::path(dir).parent_path().string() + "': " +
                      ec.message() + "; set MOELAB_CACHE or data.dir to a writable folder");
  const std::string work = dir + ".building." + std::to_string(::getpid());
  fs::remove_all(work);
  fs::create_directories(work);
  std::fprintf(stderr, "data: first use of the embedded corpus at vocab %lld: training a tokenizer and writing shards to %s\n",
               (long long)cfg.vocab_size, dir.c_str());
  try {
    Tokenizer tok = train_tokenizer({std::string_view(default_corpus_text())}, cfg.vocab_size);
    tok.save(work + "/corpus-tokenizer.txt");
    PrepareOptions opt;
    opt.tokenizer = work + "/corpus-tokenizer.txt";
    opt.default_corpus = true;
    opt.out = work + "/shards";
    opt.val_fraction = cfg.val_fraction;
    opt.progress = false;
    prepare_shards(opt);
    fs::rename(work + "/shards", work + "/ready", ec);
    if (ec) throw Error("cannot finish '" + work + "': " + ec.message());
    fs::rename(work + "/ready", dir, ec);  // fails harmlessly if another process got there first
    fs::remove_all(work);
  } catch (...) {
    fs::remove_all(work);
    throw;
  }
  if (!fs::exists(dir + "/meta.json"))
    throw Error("corpus shards in '" + dir + "' are incomplete (no meta.json); delete the folder and retry");
  return dir;
}

}  // namespace moelab
