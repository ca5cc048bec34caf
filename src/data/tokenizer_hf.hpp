// The tokenizer as a Hugging Face `tokenizer.json` (the `tokenizers` library's format), so other
// tools read moelab's token ids: a byte-level BPE whose vocabulary and merges are ours, the same
// pre-split pattern (a Split pre-tokenizer, then ByteLevel without its own regex), and the
// specials in the vocabulary with their ids (not as added tokens, which the library would match
// in a text's "<|bos|>"). Token strings use GPT-2's byte-to-character table.
#pragma once
#include <string>

#include "data/tokenizer.hpp"

namespace moelab {

struct HfExport {
  std::string json;
  // Merges whose result spells a token that an earlier merge already made: the HF vocabulary holds
  // one id per string, so text using this merge gets the earlier token's id there.
  int64_t duplicate_tokens = 0;
};

HfExport tokenizer_to_hf_json(const Tokenizer& tok);

// GPT-2's printable character (UTF-8) for a byte.
std::string hf_byte_char(unsigned char b);

}  // namespace moelab
