// A flat open-addressing hash map from a token pair (two ids packed in 64 bits) to a value.
// BPE training and encoding do tens of millions of pair lookups; a flat table with linear
// probing is several times faster there than std::unordered_map's node per entry. Entries are
// never erased (a count that falls to zero stays), which keeps probing simple.
#pragma once
#include <cstdint>
#include <vector>

namespace moelab {

inline uint64_t pair_key(int32_t a, int32_t b) { return uint64_t(uint32_t(a)) << 32 | uint32_t(b); }
inline int32_t pair_first(uint64_t key) { return int32_t(key >> 32); }
inline int32_t pair_second(uint64_t key) { return int32_t(key & 0xffffffffu); }

template <class Value>
class PairMap {
 public:
  explicit PairMap(size_t expected = 1024) { rehash(capacity_for(expected)); }

  // Value for key, inserted as Value{} when absent.
  Value& operator[](uint64_t key) {
    if ((size_ + 1) * 4 > keys_.size() * 3) rehash(keys_.size() * 2);
    size_t i = slot(key);
    if (keys_[i] != key) {
      keys_[i] = key;
      values_[i] = Value{};
      ++size_;
    }
    return values_[i];
  }
  // Pointer to the value, or nullptr when absent.
  const Value* find(uint64_t key) const {
    size_t i = slot(key);
    return keys_[i] == key ? &values_[i] : nullptr;
  }
  size_t size() const { return size_; }

  template <class F>
  void for_each(F&& f) const {
    for (size_t i = 0; i < keys_.size(); ++i)
      if (keys_[i] != kEmpty) f(keys_[i], values_[i]);
  }

 private:
  // Pairs of non-negative ids never have all bits set, so that value marks an empty slot.
  static constexpr uint64_t kEmpty = ~uint64_t(0);

  static size_t capacity_for(size_t n) {
    size_t c = 16;
    while (c * 3 < n * 4) c *= 2;
    return c;
  }
  static uint64_t mix(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    return k;
  }
  size_t slot(uint64_t key) const {
    size_t mask = keys_.size() - 1, i = size_t(mix(key)) & mask;
    while (keys_[i] != kEmpty && keys_[i] != key) i = (i + 1) & mask;
    return i;
  }
  void rehash(size_t capacity) {
    std::vector<uint64_t> old_keys(capacity, kEmpty);
    std::vector<Value> old_values(capacity);
    old_keys.swap(keys_);
    old_values.swap(values_);
    for (size_t i = 0; i < old_keys.size(); ++i)
      if (old_keys[i] != kEmpty) {
        size_t j = slot(old_keys[i]);
        keys_[j] = old_keys[i];
        values_[j] = std::move(old_values[i]);
      }
  }

  std::vector<uint64_t> keys_;
  std::vector<Value> values_;
  size_t size_ = 0;
};

}  // namespace moelab
