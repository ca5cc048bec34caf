// Data pipeline speed: tokenizer training (10 MB to 32768 ids), encoding throughput on one core,
// shard-loader and raw-bytes batches (to show the loader is never the step's bottleneck), and
// decompressing the embedded corpus. Results go to bench/RESULTS.md under "## Data".
#include <benchmark/benchmark.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <unistd.h>

#include "data/byte_loader.hpp"
#include "data/embedded_corpus.hpp"
#include "data/gunzip.hpp"
#include "data/prepare.hpp"
#include "data/shard_loader.hpp"
#include "data/tokenizer.hpp"

namespace moelab {
namespace {

// 10 MB of English: the corpus (6 MB) followed by its first 4 MB with every letter rotated by
// 13, which keeps English's statistics but adds as many new distinct words as fresh text would.
const std::string& ten_mb_text() {
  static const std::string text = [] {
    const std::string& c = default_corpus_text();
    std::string s = c;
    for (size_t i = 0; s.size() < 10'000'000; ++i) {
      char ch = c[i];
      if (ch >= 'a' && ch <= 'z') ch = char('a' + (ch - 'a' + 13) % 26);
      if (ch >= 'A' && ch <= 'Z') ch = char('A' + (ch - 'A' + 13) % 26);
      s.push_back(ch);
    }
    return s;
  }();
  return text;
}

const Tokenizer& corpus_tokenizer(int64_t vocab) {
  static std::map<int64_t, std::unique_ptr<Tokenizer>> cache;
  auto& t = cache[vocab];
  if (!t) t = std::make_unique<Tokenizer>(train_tokenizer({default_corpus_text()}, vocab, 2));
  return *t;
}

void BM_TokenizerTrain10MB(benchmark::State& state) {
  const std::string& text = ten_mb_text();
  const int64_t vocab = state.range(0);
  const int threads = int(state.range(1));
  int64_t trained = 0;
  for (auto _ : state) {
    Tokenizer tok = train_tokenizer({text}, vocab, threads);
    trained = tok.vocab_size();
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(text.size()));
  state.counters["vocab"] = double(trained);
}
BENCHMARK(BM_TokenizerTrain10MB)->Args({32768, 2})->Args({32768, 1})->Args({4096, 2})->Iterations(1)->Unit(benchmark::kSecond)->UseRealTime();

// One core, cold chunk cache (a fresh tokenizer object each iteration, as a new process has).
// range(1) = 0: the corpus the tokenizer learned from; 1: rotated text it has never seen.
void BM_Encode(benchmark::State& state) {
  const std::string file = corpus_tokenizer(state.range(0)).serialize();
  std::string_view text = state.range(1) ? std::string_view(ten_mb_text()).substr(6'000'000, 4'000'000)
                                         : std::string_view(default_corpus_text()).substr(0, 4'000'000);
  int64_t tokens = 0;
  for (auto _ : state) {
    state.PauseTiming();
    Tokenizer tok = Tokenizer::parse(file, "bench");
    state.ResumeTiming();
    tokens = int64_t(tok.encode(text).size());
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(text.size()));
  state.counters["bytes/token"] = double(text.size()) / double(tokens);
}
BENCHMARK(BM_Encode)->Args({4096, 0})->Args({32768, 0})->Args({32768, 1})->Unit(benchmark::kMillisecond);

void BM_Decode(benchmark::State& state) {
  const Tokenizer& tok = corpus_tokenizer(32768);
  auto ids = tok.encode(std::string_view(default_corpus_text()).substr(0, 2'000'000));
  for (auto _ : state) benchmark::DoNotOptimize(tok.decode(ids));
  state.SetBytesProcessed(int64_t(state.iterations()) * 2'000'000);
}
BENCHMARK(BM_Decode)->Unit(benchmark::kMillisecond);

void BM_Gunzip(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(gunzip(embedded_corpus_compressed(), "corpus").size());
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(default_corpus_text().size()));
}
BENCHMARK(BM_Gunzip)->Unit(benchmark::kMillisecond);

// One batch of rows x seq_len tokens (a micro-batch the trainer asks for each step).
void BM_ShardLoaderBatch(benchmark::State& state) {
  static const std::string dir = [] {
    std::string d = (std::filesystem::temp_directory_path() / ("moelab_bench_shards_" + std::to_string(::getpid()))).string();
    std::filesystem::create_directories(d);
    std::string tok = d + "/tok.txt", txt = d + "/brown.txt";
    corpus_tokenizer(32768).save(tok);
    { std::ofstream(txt) << default_corpus_text(); }
    PrepareOptions opt;
    opt.tokenizer = tok;
    opt.inputs = {txt};
    opt.out = d + "/shards";
    opt.progress = false;
    prepare_shards(opt);
    return opt.out;
  }();
  DataConfig cfg;
  cfg.source = "shards";
  cfg.dir = dir;
  auto loader = make_loader(cfg, 1);
  const int64_t rows = state.range(0), seq = state.range(1);
  for (auto _ : state) benchmark::DoNotOptimize(loader->next_train(rows, seq).inputs.data());
  state.SetItemsProcessed(int64_t(state.iterations()) * rows * seq);
}
BENCHMARK(BM_ShardLoaderBatch)->Args({16, 2048})->Args({32, 256})->Unit(benchmark::kMicrosecond);

void BM_ByteLoaderBatch(benchmark::State& state) {
  DataConfig cfg;
  auto loader = make_loader(cfg, 1);
  const int64_t rows = state.range(0), seq = state.range(1);
  for (auto _ : state) benchmark::DoNotOptimize(loader->next_train(rows, seq).inputs.data());
  state.SetItemsProcessed(int64_t(state.iterations()) * rows * seq);
}
BENCHMARK(BM_ByteLoaderBatch)->Args({16, 2048})->Args({32, 256})->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace moelab

BENCHMARK_MAIN();
