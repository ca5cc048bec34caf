// A training child process: started with fork/exec in its own process group (so a signal to
// the group reaches everything it started), set to die with the sweep (PR_SET_PDEATHSIG, so a
// sweep killed with SIGKILL leaves no orphan training on), stdout and stderr sent to files, polled without
// blocking so one sweep loop can watch many children, and stopped with SIGTERM then SIGKILL
// after a grace period. Exit is reported as a code or the signal that ended it.
#pragma once
#include <sys/types.h>

#include <chrono>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace moelab::lab {

struct ChildExit {
  bool signaled = false;
  int code = 0;    // exit status when !signaled
  int signal = 0;  // terminating signal when signaled
};

// "exit code 1", "killed by signal 11 (segmentation fault)", "killed by signal 9 (SIGKILL: out of
// memory killer, or killed by hand)".
std::string describe_exit(const ChildExit& e);

class ChildProcess {
 public:
  // Start argv[0] with argv; env entries "KEY=VALUE" are added to (or replace in) the current
  // environment. Throws moelab::Error when the program cannot be started.
  ChildProcess(const std::vector<std::string>& argv, const std::vector<std::string>& env,
               const std::filesystem::path& stdout_file, const std::filesystem::path& stderr_file);
  ~ChildProcess();  // kills the group if still running
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  pid_t pid() const { return pid_; }
  // Non-blocking: the exit once the child has ended, else nullopt.
  std::optional<ChildExit> poll();
  // Ask the whole group to stop (SIGTERM); kill it (SIGKILL) if still alive after `grace`.
  // Returns the exit.
  ChildExit stop(std::chrono::milliseconds grace);
  double seconds_running() const;

 private:
  pid_t pid_ = -1;
  std::optional<ChildExit> exit_;
  std::chrono::steady_clock::time_point started_;
};

}  // namespace moelab::lab
