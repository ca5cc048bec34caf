// Helpers shared by the lab's tests: a fresh temporary folder per test, file writing, and a
// fresh random seed (printed so a failure can be replayed).
#pragma once
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include "core/rng.hpp"
#include "lab/run_record.hpp"

namespace moelab::lab::labtest {

inline std::filesystem::path fresh_dir(const std::string& tag) {
  static std::random_device rd;
  auto dir = std::filesystem::temp_directory_path() /
             ("moelab_lab_" + tag + "_" + std::to_string(rd()) + std::to_string(rd()));
  std::filesystem::create_directories(dir);
  return dir;
}

inline void write_text(const std::filesystem::path& p, const std::string& text) {
  std::filesystem::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << text;
}

inline std::string read_text(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

inline uint64_t fresh_seed() {
  uint64_t seed = std::random_device{}() ^ uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
  ::testing::Test::RecordProperty("seed", std::to_string(seed));
  return seed;
}

// Make a file look untouched for `seconds` (for the "stale" status rule).
inline void age_file(const std::filesystem::path& p, double seconds) {
  auto t = std::filesystem::file_time_type::clock::now() - std::chrono::duration_cast<std::filesystem::file_time_type::duration>(
                                                              std::chrono::duration<double>(seconds));
  std::filesystem::last_write_time(p, t);
}

// The record that parse(text, record) makes of text (a reader of metrics.jsonl, status.json or a
// nanochat log).
template <class Parse>
RunRecord record_of(std::string_view text, Parse parse) {
  RunRecord rec;
  parse(text, rec);
  return rec;
}

}  // namespace moelab::lab::labtest
