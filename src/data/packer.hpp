// Best-fit packing of documents into rows that each start with <|bos|>, after nanochat's
// BOS-aligned best-fit loader: fill a row with the largest document that still fits; when none
// fits, crop the shortest to fill the row exactly. One difference, chosen because moelab's data
// is small (the embedded corpus has 500 long documents): the cropped tail is not thrown away
// but goes back to the pool as a piece of its own, led by a <|bos|>, so no text is lost.
#pragma once
#include <cstdint>
#include <vector>

namespace moelab {

// Tokens [begin, begin + length) of shard `shard`, preceded by a <|bos|> when bos_prefix (a
// cropped tail; a whole document's tokens already begin with its <|bos|>).
struct Piece {
  uint32_t shard = 0;
  bool bos_prefix = false;
  int64_t begin = 0, length = 0;
  int64_t size() const { return length + (bos_prefix ? 1 : 0); }
};

// One packed row: its pieces in order; their sizes sum to the row length.
using PackedRow = std::vector<Piece>;

// Packs `pieces` (in the given order, which decides ties) into rows of exactly row_len tokens.
// Tokens left when the pool can no longer fill a row are dropped. Rows start with a <|bos|> as
// long as every whole-document piece starts with one.
std::vector<PackedRow> pack_best_fit(const std::vector<Piece>& pieces, int64_t row_len);

}  // namespace moelab
