// The Hugging Face tokenizer.json export: every id present with the spelling of its bytes under
// GPT-2's byte table, merges in id order as the pairs' spellings, specials in the vocabulary with
// their ids (no added tokens), and the pre-split pattern carried over unchanged.
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
  EXPECT_EQ(int64_t(model["vocab"].size()) + e.duplicate_tokens, tok.vocab_size());
  // Specials live in the vocabulary, not among added tokens (which the library would match in text).
  EXPECT_TRUE(j["added_tokens"].empty());
  EXPECT_EQ(model["vocab"]["<|bos|>"], tok.bos_id());
  for (const std::string& sp : tok.specials()) EXPECT_EQ(model["vocab"][sp], tok.special_id(sp)) << sp;

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
  // The library's BPE looks a whole pre-split word up in the vocabulary only with ignore_merges;
  // without it, it emits bytes and merge results alone.
  EXPECT_FALSE(model.value("ignore_merges", false));
  // No merge yields a special's spelling, so the library's BPE can never emit a special id.
  std::set<std::string> specials(tok.specials().begin(), tok.specials().end());
  for (const auto& m : model["merges"]) {
    const std::string pair = m.get<std::string>();
    const size_t space = pair.find(' ');
    EXPECT_EQ(specials.count(pair.substr(0, space) + pair.substr(space + 1)), 0u) << pair;
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

namespace moelab {
namespace {

// "<|bos|>" written in a text: moelab encodes it as text, never as the special id. The export
// agrees: the library extracts only added tokens from a text (there are none), and its BPE emits
// only bytes and merge results, none of which spells a special (checked above), so every id it
// can give such a text is an ordinary one, as moelab's are.
TEST(TokenizerHf, SpecialSpellingInTextEncodesAsText) {
  const Tokenizer& tok = testing::tiny_tokenizer();
  auto j = nlohmann::json::parse(tokenizer_to_hf_json(tok).json);
  EXPECT_TRUE(j["added_tokens"].empty());
  for (const std::string& text : {std::string("<|bos|>"), std::string("the <|bos|> and <|user_start|>x")}) {
    const std::vector<int32_t> ids = tok.encode(text);
    ASSERT_FALSE(ids.empty());
    for (int32_t id : ids) EXPECT_FALSE(tok.is_special(id)) << text;
    EXPECT_EQ(tok.decode(ids), text);
  }
  // The special's id still decodes to its spelling, through the vocabulary entry the export gives it.
  EXPECT_EQ(tok.decode({tok.bos_id()}), "<|bos|>");
  EXPECT_EQ(j["model"]["vocab"]["<|bos|>"].get<int32_t>(), tok.bos_id());
}

}  // namespace
}  // namespace moelab
