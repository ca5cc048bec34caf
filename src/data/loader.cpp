// make_loader: picks the data source named by data.source.
#include "data/loader.hpp"

#include "core/error.hpp"
#include "data/byte_loader.hpp"
#include "data/corpus_shards.hpp"
#include "data/embedded_corpus.hpp"
#include "data/shard_loader.hpp"
#include "data/text_input.hpp"

namespace moelab {

std::unique_ptr<DataLoader> make_loader(const DataConfig& cfg, uint64_t seed, int rank, int world) {
  if (cfg.source == "bytes") {
    if (cfg.text.empty())
      return std::make_unique<ByteLoader>(default_corpus_text(), std::string(), "the embedded default corpus (Brown)",
                                          cfg.val_fraction, seed, rank, world);
    std::string text = read_input_file(cfg.text);
    check_is_text(text, cfg.text);
    return std::make_unique<ByteLoader>(std::string_view(), std::move(text), cfg.text, cfg.val_fraction, seed, rank, world);
  }
  if (cfg.source == "shards") return make_shard_loader(cfg, seed, rank, world);
  if (cfg.source == "corpus") {
    DataConfig shards = cfg;
    shards.source = "shards";
    shards.dir = ensure_corpus_shards(cfg);
    shards.tokenizer.clear();  // the one inside the cached folder
    return make_shard_loader(shards, seed, rank, world);
  }
  throw Error("data.source = \"" + cfg.source + "\" is not a data source; use bytes, shards or corpus");
}

}  // namespace moelab
