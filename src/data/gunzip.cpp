// gzip decompression through zlib (see gunzip.hpp). zlib checks the gzip header, the deflate
// stream and the trailer's CRC-32 and length; anything short of a whole, intact member is an error.
#include "data/gunzip.hpp"

#include <zlib.h>

#include "core/error.hpp"

namespace moelab {

std::string gunzip(std::string_view gz, const std::string& what) {
  z_stream z{};
  // 16 + MAX_WBITS: expect a gzip wrapper (header and trailer), not a raw or zlib stream.
  if (inflateInit2(&z, 16 + MAX_WBITS) != Z_OK) throw Error(what + ": cannot start zlib's inflater");
  std::string out;
  out.resize(gz.size() * 4 + 1024);
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(gz.data()));
  z.avail_in = uInt(gz.size());
  int rc = Z_OK;
  while (rc == Z_OK) {
    if (z.total_out == out.size()) out.resize(out.size() * 2);
    z.next_out = reinterpret_cast<Bytef*>(out.data() + z.total_out);
    z.avail_out = uInt(out.size() - z.total_out);
    rc = inflate(&z, Z_NO_FLUSH);
    if (rc == Z_BUF_ERROR && z.avail_out == 0) rc = Z_OK;  // only the output was full
  }
  const std::string msg = z.msg ? z.msg : "";
  const size_t produced = z.total_out, left = z.avail_in;
  inflateEnd(&z);
  if (rc != Z_STREAM_END)
    throw Error(what + ": not a whole gzip stream (" +
                (rc == Z_BUF_ERROR ? std::string("truncated") : msg.empty() ? "zlib error " + std::to_string(rc) : msg) +
                ")");
  if (left != 0) throw Error(what + ": " + std::to_string(left) + " bytes after the gzip stream");
  out.resize(produced);
  return out;
}

uint32_t crc32(std::string_view data, uint32_t crc) {
  return uint32_t(::crc32(uLong(crc), reinterpret_cast<const Bytef*>(data.data()), uInt(data.size())));
}

}  // namespace moelab
