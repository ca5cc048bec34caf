// `moelab tokenizer train | encode | decode | export`: train a byte-level BPE tokenizer on text
// files, use it from the shell, or export it as a Hugging Face tokenizer.json (ids as text, one per line, or as little-endian uint32 with --binary).
#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "cli/commands.hpp"
#include "core/error.hpp"
#include "data/documents.hpp"
#include "data/embedded_corpus.hpp"
#include "data/progress.hpp"
#include "data/tokenizer.hpp"
#include "data/tokenizer_hf.hpp"
#include "core/atomic_file.hpp"

namespace moelab::cli {
namespace {

std::string read_stdin() {
  std::ios::sync_with_stdio(false);
  std::freopen(nullptr, "rb", stdin);
  return std::string(std::istreambuf_iterator<char>(std::cin), {});
}

void write_stdout(const std::string& bytes) {
  std::freopen(nullptr, "wb", stdout);
  if (std::fwrite(bytes.data(), 1, bytes.size(), stdout) != bytes.size()) throw Error("cannot write to stdout");
  std::fflush(stdout);
}

struct TrainArgs {
  std::vector<std::string> inputs;
  int64_t vocab_size = 32768;
  std::string out;
  int threads = 0;
  bool default_corpus = false;
};

void run_train(const TrainArgs& a) {
  auto t0 = std::chrono::steady_clock::now();
  // Documents are read (and checked) from every file before training starts.
  if (a.inputs.empty() && !a.default_corpus) throw Error("tokenizer train: give at least one --input FILE (or --default-corpus)");
  std::vector<std::string> docs;
  size_t bytes = 0;
  if (a.default_corpus)
    for_each_document_in(default_corpus_text(), false, kDefaultCorpusName, [&](std::string_view d) {
      docs.emplace_back(d);
      bytes += d.size();
    });
  for (const auto& path : a.inputs)
    for_each_document(path, [&](std::string_view d) {
      docs.emplace_back(d);
      bytes += d.size();
    });
  std::vector<std::string_view> views(docs.begin(), docs.end());
  std::fprintf(stderr, "tokenizer train: %zu documents, %.2f MB from %zu input(s)\n", docs.size(), double(bytes) / 1e6,
               a.inputs.size() + (a.default_corpus ? 1 : 0));
  // Each merge joins two tokens of the text into one, so the text's bytes bound the merges.
  ProgressBar bar("tokenizer train",
                  std::min(double(a.vocab_size - 256 - int64_t(kSpecialTokens.size())), double(bytes)), "merges");
  Tokenizer tok = train_tokenizer(views, a.vocab_size, a.threads, [&](const TrainProgress& p) { bar.update(double(p.merges_done)); });
  bar.finish(double(tok.merge_count()));
  tok.save(a.out);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  size_t tokens = 0;
  for (auto v : views) tokens += tok.encode(v).size();
  std::printf("wrote %s: vocab %lld (%lld merges + %zu specials), %.2f bytes per token on the training text, %.1f s\n",
              a.out.c_str(), (long long)tok.vocab_size(), (long long)tok.merge_count(), tok.specials().size(),
              tokens ? double(bytes) / double(tokens) : 0.0, secs);
  if (tok.vocab_size() < a.vocab_size)
    std::printf("note: the text ran out of pairs to merge before --vocab-size %lld; give more text for a larger vocabulary\n",
                (long long)a.vocab_size);
}

void run_encode(const std::string& tokenizer, bool binary) {
  Tokenizer tok = Tokenizer::load(tokenizer);
  std::string text = read_stdin();
  std::vector<int32_t> ids = tok.encode(text);
  std::string out;
  if (binary) {
    out.resize(ids.size() * 4);
    for (size_t i = 0; i < ids.size(); ++i)
      for (int k = 0; k < 4; ++k) out[i * 4 + size_t(k)] = char(uint32_t(ids[i]) >> (8 * k));
  } else {
    for (int32_t id : ids) out += std::to_string(id) + "\n";
  }
  write_stdout(out);
}

void run_decode(const std::string& tokenizer, bool binary) {
  Tokenizer tok = Tokenizer::load(tokenizer);
  std::string in = read_stdin();
  std::vector<int32_t> ids;
  if (binary) {
    if (in.size() % 4)
      throw Error("stdin: " + std::to_string(in.size()) + " bytes is not a whole number of 4-byte token ids (truncated at byte offset " +
                  std::to_string(in.size() - in.size() % 4) + ")");
    for (size_t i = 0; i < in.size(); i += 4) {
      uint32_t v = 0;
      for (int k = 0; k < 4; ++k) v |= uint32_t(static_cast<unsigned char>(in[i + size_t(k)])) << (8 * k);
      ids.push_back(int32_t(v));
    }
  } else {
    size_t line = 1;
    for (size_t i = 0; i < in.size();) {
      char c = in[i];
      if (c == '\n') ++line;
      if (c == ' ' || c == '\t' || c == '\r' || c == '\n') {
        ++i;
        continue;
      }
      size_t j = i;
      int64_t v = 0;
      while (j < in.size() && in[j] >= '0' && in[j] <= '9' && v < (int64_t(1) << 40)) v = v * 10 + (in[j++] - '0');
      if (j == i || (j < in.size() && !std::isspace(static_cast<unsigned char>(in[j])))) {
        size_t e = in.find_first_of(" \t\r\n", i);
        throw Error("stdin: line " + std::to_string(line) + ": \"" + in.substr(i, std::min<size_t>(e - i, 20)) +
                    "\" is not a token id (expected non-negative integers, one per line)");
      }
      if (v >= tok.vocab_size())
        throw Error("stdin: line " + std::to_string(line) + ": token id " + std::to_string(v) + " is outside the vocabulary of " +
                    std::to_string(tok.vocab_size()) + " ids");
      ids.push_back(int32_t(v));
      i = j;
    }
  }
  write_stdout(tok.decode(ids));
}

}  // namespace

void add_tokenizer_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("tokenizer", "Train a byte-level BPE tokenizer, or encode and decode with one");
  cmd->require_subcommand(1);

  auto train_args = std::make_shared<TrainArgs>();
  auto* train = cmd->add_subcommand("train", "Learn BPE merges from text files (.txt: blank-line separated documents; .jsonl: \"text\")");
  train->add_option("--input", train_args->inputs, "text or JSONL files")->expected(1, -1);
  train->add_flag("--default-corpus", train_args->default_corpus, "also train on the embedded default corpus (Brown)");
  train->add_option("--vocab-size", train_args->vocab_size, "ids in the vocabulary, specials included (at least 265)")
      ->capture_default_str();
  train->add_option("--out", train_args->out, "tokenizer file to write")->required();
  train->add_option("--threads", train_args->threads, "threads for counting chunks (0: all cores)")->capture_default_str();
  train->callback([train_args] { run_train(*train_args); });

  auto tok_path = std::make_shared<std::string>();
  auto binary = std::make_shared<bool>(false);
  auto* enc = cmd->add_subcommand("encode", "Encode stdin (bytes) to token ids on stdout");
  enc->add_option("--tokenizer", *tok_path, "tokenizer file")->required();
  enc->add_flag("--binary", *binary, "write little-endian uint32 ids instead of one decimal id per line");
  enc->callback([tok_path, binary] { run_encode(*tok_path, *binary); });

  auto hf_out = std::make_shared<std::string>();
  auto* hf = cmd->add_subcommand("export", "Write the tokenizer as a Hugging Face tokenizer.json (tokenizers library)");
  hf->add_option("--tokenizer", *tok_path, "tokenizer file")->required();
  hf->add_option("--out", *hf_out, "tokenizer.json to write")->required();
  hf->callback([tok_path, hf_out] {
    Tokenizer tok = Tokenizer::load(*tok_path);
    HfExport e = tokenizer_to_hf_json(tok);
    write_file_atomic(*hf_out, e.json);
    std::printf("wrote %s: vocab %lld, %lld merges, %zu specials\n", hf_out->c_str(), (long long)tok.vocab_size(),
                (long long)tok.merge_count(), tok.specials().size());
    if (e.duplicate_tokens)
      std::printf("note: %lld merge(s) spell a token an earlier merge made; the tokenizer.json maps each such string to "
                  "the earlier id\n",
                  (long long)e.duplicate_tokens);
  });

  auto* dec = cmd->add_subcommand("decode", "Decode token ids on stdin back to bytes on stdout");
  dec->add_option("--tokenizer", *tok_path, "tokenizer file")->required();
  dec->add_flag("--binary", *binary, "read little-endian uint32 ids instead of decimal ids");
  dec->callback([tok_path, binary] { run_decode(*tok_path, *binary); });
}

}  // namespace moelab::cli
