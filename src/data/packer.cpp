// Best-fit packing over an ordered set of (size, arrival) pairs: the largest piece that fits is
// one upper_bound away, and the shortest (to crop) is the first element.
#include "data/packer.hpp"

#include <set>

#include "core/error.hpp"

namespace moelab {

std::vector<PackedRow> pack_best_fit(const std::vector<Piece>& pieces, int64_t row_len) {
  MOELAB_CHECK(row_len >= 2, "rows need room for <|bos|> and one token");
  std::vector<Piece> pool(pieces);
  std::set<std::pair<int64_t, size_t>> by_size;  // (size, index in pool)
  for (size_t i = 0; i < pool.size(); ++i)
    if (pool[i].size() > 0) by_size.insert({pool[i].size(), i});
  std::vector<PackedRow> rows;
  while (!by_size.empty()) {
    PackedRow row;
    int64_t remaining = row_len;
    while (remaining > 0 && !by_size.empty()) {
      auto it = by_size.upper_bound({remaining, SIZE_MAX});
      if (it != by_size.begin()) {
        --it;  // the largest piece that fits whole
        row.push_back(pool[it->second]);
        remaining -= it->first;
        by_size.erase(it);
        continue;
      }
      // Nothing fits: crop the shortest piece to fill the row; its tail returns as a new piece.
      it = by_size.begin();
      Piece whole = pool[it->second];
      by_size.erase(it);
      int64_t take = remaining - (whole.bos_prefix ? 1 : 0);  // tokens of the shard taken
      Piece head = whole;
      head.length = take;
      row.push_back(head);
      remaining = 0;
      Piece tail{whole.shard, true, whole.begin + take, whole.length - take};
      if (tail.length > 0) {
        pool.push_back(tail);
        by_size.insert({tail.size(), pool.size() - 1});
      }
    }
    if (remaining > 0) break;  // the pool ran dry mid-row: drop that partial row
    rows.push_back(std::move(row));
  }
  return rows;
}

}  // namespace moelab
