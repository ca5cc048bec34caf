// Files that other processes read while this one writes them (status.json, reports, sweep
// records) are replaced atomically: written beside as PATH.tmp, then renamed over PATH.
#pragma once
#include <string>

namespace moelab {

// Throws moelab::Error naming the path when the folder is missing or not writable.
void write_file_atomic(const std::string& path, const std::string& text);
// Current UTC time as "YYYY-MM-DDTHH:MM:SSZ".
std::string utc_timestamp();

}  // namespace moelab
