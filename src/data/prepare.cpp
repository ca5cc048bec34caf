// Shard preparation: all inputs are checked before any shard is written, so a typo in the last
// file name does not cost a long tokenization run; meta.json is written last, so a folder that
// has one is complete.
#include "data/prepare.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <memory>

#include "core/error.hpp"
#include "data/documents.hpp"
#include "data/embedded_corpus.hpp"
#include "data/progress.hpp"
#include "data/shard.hpp"
#include "data/text_input.hpp"
#include "data/tokenizer.hpp"

namespace moelab {
namespace {

// Writes one split's shards, starting a new file past shard_tokens.
class SplitWriter {
 public:
  SplitWriter(const ShardFolderInfo& info, std::string prefix, int64_t shard_tokens, ShardSplitInfo& split)
      : info_(info), prefix_(std::move(prefix)), shard_tokens_(shard_tokens), split_(split) {}

  void add_document(const std::vector<int32_t>& ids) {
    if (!writer_ || writer_->tokens() >= shard_tokens_) roll();
    writer_->append(ids.data(), ids.size());
    split_.tokens += int64_t(ids.size());
    split_.documents += 1;
  }
  void finish() {
    if (writer_) writer_->finish();
    writer_.reset();
  }

 private:
  void roll() {
    finish();
    char name[64];
    std::snprintf(name, sizeof name, "%s_%06zu.bin", prefix_.c_str(), split_.shards.size());
    split_.shards.push_back(name);
    writer_ = std::make_unique<ShardWriter>(info_.path_of(name), info_.vocab, info_.bos_id);
  }
  const ShardFolderInfo& info_;
  std::string prefix_;
  int64_t shard_tokens_;
  ShardSplitInfo& split_;
  std::unique_ptr<ShardWriter> writer_;
};

}  // namespace

namespace {
ShardFolderInfo write_shards(const PrepareOptions& opt, const Tokenizer& tok, double total_bytes);

// The files of a shard folder in dir (meta.json, tokenizer.txt, train_*.bin, val_*.bin, and their
// .tmp files), by name; empty when dir does not exist.
std::vector<std::string> shard_folder_files(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) return out;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    std::string name = e.path().filename().string();
    const std::string base = name.size() > 4 && name.substr(name.size() - 4) == ".tmp" ? name.substr(0, name.size() - 4) : name;
    const bool shard = (base.rfind("train_", 0) == 0 || base.rfind("val_", 0) == 0) && base.size() > 4 &&
                       base.substr(base.size() - 4) == ".bin";
    if (shard || base == "meta.json" || base == ShardFolderInfo{}.tokenizer) out.push_back(name);
  }
  return out;
}
}  // namespace

ShardFolderInfo prepare_shards(const PrepareOptions& opt) {
  if (opt.inputs.empty() && !opt.default_corpus)
    throw Error("data prepare: give at least one --input FILE (or --default-corpus)");
  if (!(opt.val_fraction > 0 && opt.val_fraction < 1))
    throw Error("--val-fraction " + std::to_string(opt.val_fraction) + " must be in (0, 1); e.g. 0.05");
  if (opt.shard_tokens < 1) throw Error("--shard-tokens must be positive");
  Tokenizer tok = Tokenizer::load(opt.tokenizer);

  // Check every input before writing anything.
  double total_bytes = opt.default_corpus ? double(default_corpus_text().size()) : 0.0;
  for (const auto& path : opt.inputs) {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec)) read_input_file(path);  // throws the precise reason
    auto size = std::filesystem::file_size(path, ec);
    if (ec || size == 0) throw Error(path + ": file is empty; give a file with text in it");
    total_bytes += double(size);
  }

  // A folder that already holds shards is refused (its meta.json and first shards would be
  // replaced and the later ones of another tokenizer left beside them), unless --force, which
  // clears them first. From here on, a failure removes what this call wrote.
  const std::vector<std::string> old_files = shard_folder_files(opt.out);
  if (!old_files.empty() && !opt.force)
    throw Error("data prepare: " + opt.out + " already holds a shard folder (" + std::to_string(old_files.size()) +
                " file(s): meta.json, tokenizer, shards); choose another --out, or pass --force to replace them");
  for (const auto& f : old_files) std::filesystem::remove(std::filesystem::path(opt.out) / f);
  const bool created = !std::filesystem::exists(opt.out);
  std::filesystem::create_directories(opt.out);
  try {
    return write_shards(opt, tok, total_bytes);
  } catch (...) {
    std::error_code ec;
    for (const auto& f : shard_folder_files(opt.out)) std::filesystem::remove(std::filesystem::path(opt.out) / f, ec);
    if (created) std::filesystem::remove(opt.out, ec);  // only if nothing else is in it
    throw;
  }
}

namespace {
ShardFolderInfo write_shards(const PrepareOptions& opt, const Tokenizer& tok, double total_bytes) {
  ShardFolderInfo info;
  info.dir = opt.out;
  info.vocab = tok.vocab_size();
  info.bos_id = tok.bos_id();
  info.val_fraction = opt.val_fraction;
  if (opt.default_corpus) info.sources.push_back(kDefaultCorpusName);
  info.sources.insert(info.sources.end(), opt.inputs.begin(), opt.inputs.end());
  std::filesystem::remove(info.path_of("meta.json"));  // the folder is incomplete until the end
  tok.save(info.path_of(info.tokenizer));

  SplitWriter train(info, "train", opt.shard_tokens, info.train), val(info, "val", opt.shard_tokens, info.val);
  ProgressBar bar("data prepare", total_bytes, "MB", 1e6);
  double done_before = 0;
  int64_t doc_index = 0;
  std::vector<int32_t> ids;
  // A document held back so that, with very few documents, the last one can still go to
  // validation when the even spacing has chosen none.
  std::vector<int32_t> pending;
  bool has_pending = false;
  std::vector<std::string> names = opt.inputs;
  if (opt.default_corpus) names.insert(names.begin(), kDefaultCorpusName);
  for (const auto& path : names) {
    const bool builtin = opt.default_corpus && &path == &names.front();
    std::string file_data = builtin ? std::string() : read_input_file(path);
    std::string_view data = builtin ? std::string_view(default_corpus_text()) : std::string_view(file_data);
    const char* base = data.data();
    for_each_document_in(data, !builtin && is_jsonl_path(path), path, [&](std::string_view doc) {
      ids.clear();
      ids.push_back(tok.bos_id());
      tok.encode_append(doc, ids);
      bool to_val = std::floor(double(doc_index + 1) * opt.val_fraction) > std::floor(double(doc_index) * opt.val_fraction);
      ++doc_index;
      if (to_val) {
        val.add_document(ids);
      } else {
        if (has_pending) train.add_document(pending);
        pending.swap(ids);
        has_pending = true;
      }
      if (opt.progress && doc.data() >= base && doc.data() <= base + data.size())
        bar.update(done_before + double(doc.data() + doc.size() - base));
    });
    done_before += double(data.size());
  }
  if (has_pending && doc_index == 1 && pending.size() >= 3) {
    // One document (a text file without blank lines): split it by position, its last
    // val_fraction of tokens to validation (after a BOS of their own), as a byte split would.
    const size_t n = pending.size() - 1;  // tokens after the BOS
    const size_t n_val = std::clamp<size_t>(size_t(std::llround(double(n) * opt.val_fraction)), 1, n - 1);
    std::vector<int32_t> head(pending.begin(), pending.end() - std::ptrdiff_t(n_val));
    std::vector<int32_t> tail = {tok.bos_id()};
    tail.insert(tail.end(), pending.end() - std::ptrdiff_t(n_val), pending.end());
    train.add_document(head);
    val.add_document(tail);
  } else if (has_pending) {
    if (info.val.documents == 0 && info.train.documents > 0)
      val.add_document(pending);
    else
      train.add_document(pending);
  }
  train.finish();
  val.finish();
  if (opt.progress) bar.finish();
  if (info.train.documents == 0 || info.val.documents == 0)
    throw Error("data prepare: the inputs hold " + std::to_string(doc_index) +
                " document(s) and too few tokens for both a training and a validation split; give more text");
  write_shard_folder_meta(info);
  return info;
}
}  // namespace

}  // namespace moelab
