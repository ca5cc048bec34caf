// Small file helpers for the lab. The lab reads files that other processes are writing at the
// same moment (metrics, logs, status), so reads never throw on a missing or vanishing file: they
// return what was there. Writes of files that others read are atomic (write beside, rename).
#pragma once
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include "core/atomic_file.hpp"  // write_file_atomic for the files others read

namespace moelab::lab {

namespace fs = std::filesystem;

// Whole file, or nullopt when it cannot be opened. At most max_bytes (the tail is dropped).
std::optional<std::string> read_file(const fs::path& path, size_t max_bytes = size_t(1) << 30);
// The last max_bytes of a file (all of it when smaller); "" when it cannot be read.
std::string read_tail(const fs::path& path, size_t max_bytes);
// Seconds since the file was last modified; nullopt when it does not exist.
std::optional<double> seconds_since_modified(const fs::path& path);
// True when the first bytes look like binary data (NUL bytes) rather than text.
bool looks_binary(const std::string& head);
// Local time as "YYYY-MM-DD HH:MM:SS" (report) or "YYYYMMDD_HHMMSS" (folder names).
std::string local_time_text(bool for_folder_name = false);

}  // namespace moelab::lab
