// Errors: every host-side failure is a moelab::Error whose text names the file, field or step at
// fault and says how to fix it. The CLI prints the text and exits non-zero; the trainer also
// records it in status.json.
#pragma once
#include <stdexcept>
#include <string>

namespace moelab {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// The kinds of Error that the CLI exits with their own status (the README's exit codes): a
// command line that cannot be run as given (2), and a stop asked for by the user (130, Ctrl-C
// or SIGTERM). Every other Error exits 1.
class UsageError : public Error {
 public:
  explicit UsageError(const std::string& what) : Error(what) {}
};
class Interrupted : public Error {
 public:
  explicit Interrupted(const std::string& what) : Error(what) {}
};

// Invariant checks inside the engine (not user input): name the condition and the location.
#define MOELAB_CHECK(cond, msg)                                                                  \
  do {                                                                                           \
    if (!(cond))                                                                                 \
      throw ::moelab::Error(std::string("internal check failed: ") + #cond + " (" + (msg) +     \
                            ") at " + __FILE__ + ":" + std::to_string(__LINE__));                \
  } while (0)

}  // namespace moelab
