// `moelab data prepare`: tokenize text into the shard folder `moelab train` reads with
// data.source = "shards" and data.dir = that folder.
#include <cstdio>
#include <memory>

#include "cli/commands.hpp"
#include "data/prepare.hpp"

namespace moelab::cli {

void add_data_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("data", "Prepare token shards for training");
  cmd->require_subcommand(1);
  auto opt = std::make_shared<PrepareOptions>();
  auto* prep = cmd->add_subcommand("prepare", "Tokenize text files (.txt: blank-line separated documents) or JSONL (\"text\") "
                                              "into train/validation shards");
  prep->add_option("--tokenizer", opt->tokenizer, "tokenizer file from `moelab tokenizer train`")->required();
  prep->add_option("--input", opt->inputs, "text or JSONL files")->expected(1, -1);
  prep->add_flag("--default-corpus", opt->default_corpus, "also tokenize the embedded default corpus (Brown), first");
  prep->add_option("--out", opt->out, "output folder (set data.dir to it)")->required();
  prep->add_flag("--force", opt->force, "replace the shards already in --out (they are removed first)");
  prep->add_option("--val-fraction", opt->val_fraction, "fraction of documents held out for validation")->capture_default_str();
  prep->add_option("--shard-tokens", opt->shard_tokens, "tokens per shard file before a new one starts")->capture_default_str();
  prep->callback([opt] {
    ShardFolderInfo info = prepare_shards(*opt);
    std::printf("wrote %s: %lld train tokens (%lld documents) in %zu shard(s), %lld validation tokens (%lld documents); "
                "vocab %lld\ntrain with: data.source = \"shards\", data.dir = \"%s\"\n",
                info.dir.c_str(), (long long)info.train.tokens, (long long)info.train.documents, info.train.shards.size(),
                (long long)info.val.tokens, (long long)info.val.documents, (long long)info.vocab, info.dir.c_str());
  });
}

}  // namespace moelab::cli
