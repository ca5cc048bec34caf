// The folder `moelab data prepare` writes: train_NNNNNN.bin and val_NNNNNN.bin shards, a copy of
// the tokenizer (tokenizer.txt) and meta.json, which lists them and is the folder's index.
// Readers go through meta.json, so a stray file in the folder is never read as data.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moelab {

inline constexpr int kShardFolderVersion = 1;

struct ShardSplitInfo {
  std::vector<std::string> shards;  // file names inside the folder
  int64_t tokens = 0, documents = 0;
};

struct ShardFolderInfo {
  std::string dir;
  std::string tokenizer = "tokenizer.txt";  // file name inside the folder
  int64_t vocab = 0;
  int32_t bos_id = 0;
  double val_fraction = 0;
  std::vector<std::string> sources;
  ShardSplitInfo train, val;

  std::string path_of(const std::string& name) const { return dir + "/" + name; }
};

// Reads dir/meta.json; errors name the folder and say how to make one.
ShardFolderInfo read_shard_folder(const std::string& dir);
void write_shard_folder_meta(const ShardFolderInfo& info);

}  // namespace moelab
