// The Hugging Face tokenizer.json export: every id present with the spelling of its bytes under
// GPT-2's byte table, merges in id order as the pairs' spellings, specials as added tokens with
// their ids, and the pre-split pattern carried over unchanged.
#include <gtest/gtest.h>

#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "data/tokenizer_hf.hpp"
#include "data_test_util.hpp"

namespace moelab {
namespace {

TEST(TokenizerHf, VocabMergesAndSpecialsMatchTheTokenizer) {
  const Tokenizer& tok = testing::tiny_tokenizer();
  HfExport e = tokenizer_to_hf_json(tok);
  auto j = nlohmann::json::parse(e.json);
  const auto& model = j["model"];
  EXPECT_EQ(model["type"], "BPE");
  EXPECT_EQ(j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"], tok.pattern());
  ASSERT_EQ(int64_t(model["merges"].size()), tok.merge_count());
  EXPECT_EQ(int64_t(model["vocab"].size()) + e.duplicate_tokens, 256 + tok.merge_count());
  ASSERT_EQ(j["added_tokens"].size(), tok.specials().size());
  EXPECT_EQ(j["added_tokens"][0]["content"], "<|bos|>");
  EXPECT_EQ(j["added_tokens"][0]["id"], tok.bos_id());

  // The byte table is a bijection onto 256 distinct characters.
  std::map<std::string, int> back;
  for (int b = 0; b < 256; ++b) back[hf_byte_char(static_cast<unsigned char>(b))] = b;
  ASSERT_EQ(back.size(), 256u);
  EXPECT_EQ(hf_byte_char(' '), "\xC4\xA0");  // GPT-2's 'Ġ'
  EXPECT_EQ(hf_byte_char('a'), "a");
  // Each vocabulary entry spells its token's bytes (undo the table character by character).
  for (auto it = model["vocab"].begin(); it != model["vocab"].end(); ++it) {
    const std::string& s = it.key();
    std::string bytes;
    for (size_t i = 0; i < s.size();) {
      size_t len = (static_cast<unsigned char>(s[i]) < 0x80) ? 1 : 2;
      auto b = back.find(s.substr(i, len));
      ASSERT_NE(b, back.end()) << s;
      bytes += char(b->second);
      i += len;
    }
    EXPECT_EQ(bytes, tok.token_text(it.value().get<int32_t>()));
  }
  // Merge i joins the spellings of its two ids, in id order.
  for (int64_t i = 0; i < tok.merge_count(); ++i) {
    auto [a, b] = tok.merges()[size_t(i)];
    std::string want;
    for (unsigned char c : tok.token_text(a)) want += hf_byte_char(c);
    want += " ";
    for (unsigned char c : tok.token_text(b)) want += hf_byte_char(c);
    EXPECT_EQ(model["merges"][size_t(i)], want) << "merge " << i;
  }
}

}  // namespace
}  // namespace moelab
