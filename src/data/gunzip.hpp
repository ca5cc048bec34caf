// gzip decompression for the embedded corpus, by zlib (which cairo links anyway). The gzip
// trailer's CRC-32 and length are checked, so a damaged blob is an error rather than wrong text.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace moelab {

// Decompresses a whole gzip member. `what` names the source in error messages.
std::string gunzip(std::string_view gz, const std::string& what);

// CRC-32 (IEEE, as gzip and PNG use it) of `data`, continuing from `crc` (0 to start).
uint32_t crc32(std::string_view data, uint32_t crc = 0);

}  // namespace moelab
