// Table-driven inflate: each Huffman code is decoded with one lookup of the next 15 input bits
// (codes are at most 15 bits), which keeps decompression of the few-MB corpus well under a second.
#include "data/gunzip.hpp"

#include <array>
#include <vector>

#include "core/error.hpp"

namespace moelab {
namespace {

constexpr int kTableBits = 15;

[[noreturn]] void fail(const std::string& what, const std::string& why) {
  throw Error(what + ": not a valid gzip stream (" + why + "); re-create it with gzip or data/derive_brown.py");
}

// LSB-first bit reader over the input; past the end it feeds zeros and counts them, so a
// truncated stream is reported instead of being decoded from padding.
struct BitReader {
  const uint8_t* p;
  const uint8_t* end;
  const std::string& what;
  uint64_t buf = 0;
  int count = 0;
  int padded = 0;

  void refill() {
    while (count <= 56) {
      uint64_t b = 0;
      if (p < end) {
        b = *p++;
      } else if (++padded > 16) {
        fail(what, "truncated: the data ends inside a compressed block");
      }
      buf |= b << count;
      count += 8;
    }
  }
  uint32_t peek(int n) {
    if (count < n) refill();
    return uint32_t(buf & ((uint64_t(1) << n) - 1));
  }
  void drop(int n) { buf >>= n; count -= n; }
  uint32_t bits(int n) {
    if (n == 0) return 0;
    uint32_t v = peek(n);
    drop(n);
    return v;
  }
  void align() { drop(count % 8); }
  // Byte offset of the next unread whole byte.
  const uint8_t* byte_pos() const { return p - (count / 8) + padded; }
};

// Entry: symbol << 4 | code length; length 0 marks bit patterns no code starts with.
struct Huffman {
  std::vector<uint32_t> table = std::vector<uint32_t>(size_t(1) << kTableBits, 0);

  void build(const uint8_t* lengths, int n, const std::string& what) {
    std::array<int, 16> counts{};
    for (int i = 0; i < n; ++i) counts[lengths[i]]++;
    counts[0] = 0;
    int left = 1;
    for (int len = 1; len <= 15; ++len) {
      left = (left << 1) - counts[len];
      if (left < 0) fail(what, "over-subscribed Huffman code");
    }
    std::array<uint32_t, 16> next{};
    uint32_t code = 0;
    for (int len = 1; len <= 15; ++len) {
      code = (code + counts[len - 1]) << 1;
      next[len] = code;
    }
    std::fill(table.begin(), table.end(), 0u);
    for (int sym = 0; sym < n; ++sym) {
      int len = lengths[sym];
      if (!len) continue;
      uint32_t c = next[len]++, rev = 0;
      for (int i = 0; i < len; ++i) rev |= ((c >> i) & 1u) << (len - 1 - i);
      for (uint32_t k = rev; k < table.size(); k += uint32_t(1) << len) table[k] = uint32_t(sym) << 4 | uint32_t(len);
    }
  }

  int decode(BitReader& in, const std::string& what) const {
    uint32_t e = table[in.peek(kTableBits)];
    if ((e & 15) == 0) fail(what, "invalid Huffman code");
    in.drop(int(e & 15));
    return int(e >> 4);
  }
};

constexpr uint16_t kLenBase[29] = {3,  4,  5,  6,  7,  8,  9,  10, 11,  13,  15,  17,  19,  23, 27,
                                   31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
constexpr uint8_t kLenExtra[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
constexpr uint16_t kDistBase[30] = {1,   2,   3,   4,   5,   7,    9,    13,   17,   25,   33,   49,   65,    97,    129,
                                    193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577};
constexpr uint8_t kDistExtra[30] = {0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};

void inflate_block(BitReader& in, const Huffman& lit, const Huffman& dist, std::string& out, const std::string& what) {
  for (;;) {
    int sym = lit.decode(in, what);
    if (sym < 256) {
      out.push_back(char(sym));
      continue;
    }
    if (sym == 256) return;
    sym -= 257;
    if (sym >= 29) fail(what, "bad length symbol");
    size_t len = kLenBase[sym] + in.bits(kLenExtra[sym]);
    int ds = dist.decode(in, what);
    if (ds >= 30) fail(what, "bad distance symbol");
    size_t d = kDistBase[ds] + in.bits(kDistExtra[ds]);
    if (d > out.size()) fail(what, "distance reaches before the start of the data");
    size_t from = out.size() - d;
    for (size_t i = 0; i < len; ++i) out.push_back(out[from + i]);  // may overlap itself
  }
}

void read_dynamic_tables(BitReader& in, Huffman& lit, Huffman& dist, const std::string& what) {
  static constexpr uint8_t order[19] = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15};
  int nlit = int(in.bits(5)) + 257, ndist = int(in.bits(5)) + 1, nclen = int(in.bits(4)) + 4;
  if (nlit > 286 || ndist > 30) fail(what, "too many codes in a dynamic block");
  uint8_t cl_len[19] = {};
  for (int i = 0; i < nclen; ++i) cl_len[order[i]] = uint8_t(in.bits(3));
  Huffman cl;
  cl.build(cl_len, 19, what);
  uint8_t lengths[286 + 30] = {};
  int n = 0;
  while (n < nlit + ndist) {
    int sym = cl.decode(in, what);
    if (sym < 16) {
      lengths[n++] = uint8_t(sym);
      continue;
    }
    int repeat;
    uint8_t value = 0;
    if (sym == 16) {
      if (n == 0) fail(what, "repeat with no previous length");
      value = lengths[n - 1];
      repeat = 3 + int(in.bits(2));
    } else if (sym == 17) {
      repeat = 3 + int(in.bits(3));
    } else {
      repeat = 11 + int(in.bits(7));
    }
    if (n + repeat > nlit + ndist) fail(what, "code lengths overflow the table");
    while (repeat--) lengths[n++] = value;
  }
  if (lengths[256] == 0) fail(what, "block has no end-of-block code");
  lit.build(lengths, nlit, what);
  dist.build(lengths + nlit, ndist, what);
}

}  // namespace

uint32_t crc32(std::string_view data, uint32_t crc) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (unsigned char b : data) crc = table[(crc ^ b) & 0xff] ^ (crc >> 8);
  return ~crc;
}

std::string gunzip(std::string_view gz, const std::string& what) {
  const auto* b = reinterpret_cast<const uint8_t*>(gz.data());
  if (gz.size() < 18 || b[0] != 0x1f || b[1] != 0x8b || b[2] != 8) fail(what, "no gzip header");
  uint8_t flags = b[3];
  size_t pos = 10;
  auto need = [&](size_t n) {
    if (pos + n > gz.size()) fail(what, "header runs past the end");
  };
  if (flags & 4) {  // FEXTRA
    need(2);
    pos += 2 + (b[pos] | size_t(b[pos + 1]) << 8);
  }
  for (int f : {8, 16}) {  // FNAME, FCOMMENT: zero-terminated
    if (!(flags & f)) continue;
    while (pos < gz.size() && b[pos]) ++pos;
    ++pos;
  }
  if (flags & 2) pos += 2;  // FHCRC
  need(8);
  const uint8_t* tail = b + gz.size() - 4;
  uint32_t isize = tail[0] | uint32_t(tail[1]) << 8 | uint32_t(tail[2]) << 16 | uint32_t(tail[3]) << 24;

  std::string out;
  out.reserve(isize);
  BitReader in{b + pos, b + gz.size(), what};
  Huffman lit, dist;
  Huffman fixed_lit, fixed_dist;
  bool fixed_built = false;
  for (bool last = false; !last;) {
    last = in.bits(1);
    int type = int(in.bits(2));
    if (type == 0) {
      in.align();
      uint32_t len = in.bits(16), nlen = in.bits(16);
      if ((len ^ 0xffff) != nlen) fail(what, "stored block length check failed");
      for (uint32_t i = 0; i < len; ++i) out.push_back(char(in.bits(8)));
    } else if (type == 1) {
      if (!fixed_built) {
        uint8_t l[288];
        for (int i = 0; i < 288; ++i) l[i] = i < 144 ? 8 : i < 256 ? 9 : i < 280 ? 7 : 8;
        fixed_lit.build(l, 288, what);
        uint8_t d[30];
        std::fill(d, d + 30, uint8_t(5));
        fixed_dist.build(d, 30, what);
        fixed_built = true;
      }
      inflate_block(in, fixed_lit, fixed_dist, out, what);
    } else if (type == 2) {
      read_dynamic_tables(in, lit, dist, what);
      inflate_block(in, lit, dist, out, what);
    } else {
      fail(what, "reserved block type");
    }
  }
  in.align();
  const uint8_t* t = in.byte_pos();
  if (in.padded > 0 || t + 8 > b + gz.size()) fail(what, "truncated: the trailer is missing");
  uint32_t crc = t[0] | uint32_t(t[1]) << 8 | uint32_t(t[2]) << 16 | uint32_t(t[3]) << 24;
  if (crc != crc32(out)) fail(what, "CRC-32 mismatch: the data is damaged");
  if (uint32_t(out.size()) != isize) fail(what, "length mismatch with the trailer");
  return out;
}

}  // namespace moelab
