// Atomic replace and UTC timestamps.
#include "core/atomic_file.hpp"

#include <ctime>
#include <filesystem>
#include <fstream>
#include <system_error>

#include "core/error.hpp"

namespace moelab {

void write_file_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  std::error_code dir_ec;
  if (std::filesystem::is_directory(path, dir_ec))
    throw Error("'" + path + "' is a folder; give the path of a file to write");
  // A write that fails (a full disk) leaves neither a partial file nor its .tmp behind.
  auto fail = [&](const std::string& why) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    throw Error(why);
  };
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw Error("cannot write '" + tmp + "': check that the folder exists and is writable");
    out << text;
    out.flush();
    out.close();
    if (!out) fail("write to '" + tmp + "' failed (disk full?): free some space and run again");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) fail("cannot rename '" + tmp + "' to '" + path + "': " + ec.message());
}

std::string utc_timestamp() {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

}  // namespace moelab
