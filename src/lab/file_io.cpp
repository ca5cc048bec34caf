// File helpers: tolerant reads of files being written, atomic writes of files being read.
#include "lab/file_io.hpp"

#include <chrono>
#include <ctime>
#include <fstream>
#include <sstream>
#include <system_error>

#include "core/error.hpp"

namespace moelab::lab {

std::optional<std::string> read_file(const fs::path& path, size_t max_bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  std::string text;
  char buf[1 << 16];
  while (in && text.size() < max_bytes) {
    in.read(buf, sizeof buf);
    text.append(buf, size_t(in.gcount()));
  }
  if (text.size() > max_bytes) text.resize(max_bytes);
  return text;
}

std::string read_tail(const fs::path& path, size_t max_bytes) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return "";
  std::streamoff size = in.tellg();
  if (size < 0) return "";
  std::streamoff start = size > std::streamoff(max_bytes) ? size - std::streamoff(max_bytes) : 0;
  in.seekg(start);
  std::string text(size_t(size - start), '\0');
  in.read(text.data(), std::streamsize(text.size()));
  text.resize(size_t(in.gcount()));
  return text;
}

std::optional<double> seconds_since_modified(const fs::path& path) {
  std::error_code ec;
  auto t = fs::last_write_time(path, ec);
  if (ec) return std::nullopt;
  auto now = fs::file_time_type::clock::now();
  return std::chrono::duration<double>(now - t).count();
}

bool looks_binary(const std::string& head) {
  size_t n = std::min<size_t>(head.size(), 4096);
  size_t control = 0;
  for (size_t i = 0; i < n; ++i) {
    unsigned char c = static_cast<unsigned char>(head[i]);
    if (c == 0) return true;
    if (c < 8 || (c > 13 && c < 32 && c != 27)) ++control;
  }
  return n > 0 && control * 10 > n;  // more than 10% control bytes: not a log
}

std::string local_time_text(bool for_folder_name) {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  localtime_r(&now, &tm);
  char buf[64];
  std::strftime(buf, sizeof buf, for_folder_name ? "%Y%m%d_%H%M%S" : "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

}  // namespace moelab::lab
