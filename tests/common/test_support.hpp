// Helpers every test area shares: the message a refused call gives, a file's text, and a run of
// the moelab binary with its output.
#pragma once
#include <sys/wait.h>

#include <cstdio>
#include <fstream>
#include <functional>
#include <iterator>
#include <sstream>
#include <string>

#include "core/error.hpp"

namespace moelab::test {

// The message of the E that f throws (moelab::Error unless named), or `accepted` when f returns.
template <class E = Error>
std::string error_of(const std::function<void()>& f, const std::string& accepted = "") {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  return accepted;
}

// A whole file as bytes ("" if it cannot be read).
inline std::string file_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

struct CliResult {
  int code;            // the exit status, -1 if the command did not exit normally
  std::string output;  // stdout and stderr together
};

// Runs `moelab ARGS` (the binary under test, MOELAB_BINARY) through the shell.
inline CliResult run_moelab(const std::string& args) {
  const std::string cmd = std::string(MOELAB_BINARY) + " " + args + " 2>&1";
  CliResult r{-1, ""};
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) r.output.append(buf, n);
  const int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

}  // namespace moelab::test
