// tokenizer.json export (see tokenizer_hf.hpp).
#include "data/tokenizer_hf.hpp"

#include <array>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.hpp"

namespace moelab {
namespace {

// GPT-2's table: printable Latin-1 bytes map to themselves, the others to U+0100 onwards in order.
const std::array<std::string, 256>& byte_chars() {
  static const std::array<std::string, 256> table = [] {
    std::array<std::string, 256> t;
    auto utf8 = [](uint32_t cp) {
      std::string s;
      if (cp < 0x80) {
        s += char(cp);
      } else {
        s += char(0xC0 | (cp >> 6));
        s += char(0x80 | (cp & 0x3F));
      }
      return s;
    };
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      t[size_t(b)] = utf8(printable ? uint32_t(b) : next++);
    }
    return t;
  }();
  return table;
}

std::string spell(const std::string& bytes) {
  std::string s;
  for (unsigned char c : bytes) s += byte_chars()[c];
  return s;
}

}  // namespace

std::string hf_byte_char(unsigned char b) { return byte_chars()[b]; }

HfExport tokenizer_to_hf_json(const Tokenizer& tok) {
  using nlohmann::json;
  HfExport out;
  json vocab = json::object(), merges = json::array(), added = json::array();
  std::set<std::string> seen;
  const int32_t first_special = 256 + int32_t(tok.merge_count());
  for (int32_t id = 0; id < first_special; ++id) {
    std::string s = spell(tok.token_text(id));
    if (!seen.insert(s).second) {
      ++out.duplicate_tokens;
      continue;
    }
    vocab[s] = id;
  }
  for (const auto& [a, b] : tok.merges()) merges.push_back(spell(tok.token_text(a)) + " " + spell(tok.token_text(b)));
  // The specials go into the BPE vocabulary under their spelling, not into added_tokens: the
  // library matches an added token's spelling anywhere in a text, while moelab (as nanochat's
  // encode_ordinary) encodes "<|bos|>" in a text as text. In the vocabulary a special keeps its id
  // (token_to_id, decode) and no merge produces it, so both encode the literal text alike.
  for (int32_t id = first_special; id < int32_t(tok.vocab_size()); ++id) {
    std::string s = spell(tok.token_text(id));
    if (!seen.insert(s).second)
      throw Error("tokenizer export: special token " + tok.token_text(id) + " is spelled like an ordinary token");
    vocab[s] = id;
  }
  json j = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         json::array({{{"type", "Split"}, {"pattern", {{"Regex", tok.pattern()}}}, {"behavior", "Isolated"}, {"invert", false}},
                      {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}}})}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr},
        {"fuse_unk", false},
        {"byte_fallback", false},
        {"vocab", vocab},
        {"merges", merges}}}};
  out.json = j.dump(1) + "\n";
  return out;
}

}  // namespace moelab
