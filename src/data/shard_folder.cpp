// meta.json of a shard folder: written last by `data prepare` (so a folder with a meta.json is
// complete), read first by the loader.
#include "data/shard_folder.hpp"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.hpp"
#include "data/text_input.hpp"

namespace moelab {

ShardFolderInfo read_shard_folder(const std::string& dir) {
  std::string path = dir + "/meta.json";
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec))
    throw Error("data.dir = " + dir + ": no such folder; make one with `moelab data prepare --tokenizer TOK --input FILE --out " +
                dir + "`");
  if (!std::filesystem::exists(path, ec))
    throw Error(path + ": missing, so " + dir + " is not a folder written by `moelab data prepare` (or it did not finish); " +
                "run it again");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_input_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw Error(path + ": not valid JSON (" + std::string(e.what()) + "); re-run `moelab data prepare`");
  }
  ShardFolderInfo info;
  info.dir = dir;
  try {
    if (j.at("format").get<std::string>() != "moelab-shards") throw Error(path + ": \"format\" is not \"moelab-shards\"");
    int version = j.at("version").get<int>();
    if (version != kShardFolderVersion)
      throw Error(path + ": shard folder version " + std::to_string(version) + ", this moelab reads version " +
                  std::to_string(kShardFolderVersion) + "; re-run `moelab data prepare`");
    info.tokenizer = j.at("tokenizer").get<std::string>();
    info.vocab = j.at("vocab").get<int64_t>();
    info.bos_id = j.at("bos_id").get<int32_t>();
    info.val_fraction = j.at("val_fraction").get<double>();
    info.sources = j.at("sources").get<std::vector<std::string>>();
    for (auto [name, split] : {std::pair<const char*, ShardSplitInfo*>{"train", &info.train}, {"val", &info.val}}) {
      const auto& s = j.at(name);
      split->shards = s.at("shards").get<std::vector<std::string>>();
      split->tokens = s.at("tokens").get<int64_t>();
      split->documents = s.at("documents").get<int64_t>();
    }
  } catch (const nlohmann::json::exception& e) {
    throw Error(path + ": missing or mistyped field (" + std::string(e.what()) + "); re-run `moelab data prepare`");
  }
  return info;
}

void write_shard_folder_meta(const ShardFolderInfo& info) {
  nlohmann::json j;
  j["format"] = "moelab-shards";
  j["version"] = kShardFolderVersion;
  j["tokenizer"] = info.tokenizer;
  j["vocab"] = info.vocab;
  j["bos_id"] = info.bos_id;
  j["val_fraction"] = info.val_fraction;
  j["sources"] = info.sources;
  for (auto [name, split] : {std::pair<const char*, const ShardSplitInfo*>{"train", &info.train}, {"val", &info.val}})
    j[name] = {{"shards", split->shards}, {"tokens", split->tokens}, {"documents", split->documents}};
  std::string path = info.path_of("meta.json"), tmp = path + ".tmp";
  {
    std::ofstream f(tmp);
    f << j.dump(2) << "\n";
    if (!f) throw Error(path + ": cannot be written");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw Error(path + ": cannot be replaced");
}

}  // namespace moelab
