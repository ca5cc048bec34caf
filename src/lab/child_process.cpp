// posix_spawn-based child process (see child_process.hpp).
#include "lab/child_process.hpp"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include "core/error.hpp"

extern char** environ;

namespace moelab::lab {

std::string describe_exit(const ChildExit& e) {
  if (!e.signaled) return "exit code " + std::to_string(e.code);
  std::string what;
  switch (e.signal) {
    case SIGSEGV: what = "segmentation fault"; break;
    case SIGBUS: what = "bus error"; break;
    case SIGABRT: what = "aborted"; break;
    case SIGFPE: what = "floating-point exception"; break;
    case SIGILL: what = "illegal instruction"; break;
    case SIGKILL: what = "SIGKILL: out-of-memory killer, or killed by hand"; break;
    case SIGTERM: what = "SIGTERM"; break;
    case SIGINT: what = "SIGINT"; break;
    default: {
      const char* s = strsignal(e.signal);
      what = s ? s : "unknown signal";
    }
  }
  return "killed by signal " + std::to_string(e.signal) + " (" + what + ")";
}

namespace {
ChildExit from_status(int status) {
  ChildExit e;
  if (WIFSIGNALED(status)) {
    e.signaled = true;
    e.signal = WTERMSIG(status);
  } else {
    e.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  return e;
}
}  // namespace

ChildProcess::ChildProcess(const std::vector<std::string>& argv, const std::vector<std::string>& env,
                           const std::filesystem::path& stdout_file, const std::filesystem::path& stderr_file) {
  if (argv.empty()) throw Error("internal: empty command for a child process");
  std::vector<std::string> envs;
  for (char** e = environ; e && *e; ++e) {
    std::string kv = *e;
    bool replaced = false;
    for (const auto& add : env)
      if (kv.substr(0, kv.find('=') + 1) == add.substr(0, add.find('=') + 1)) replaced = true;
    if (!replaced) envs.push_back(kv);
  }
  envs.insert(envs.end(), env.begin(), env.end());
  std::vector<char*> cargv, cenv;
  for (const auto& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  for (const auto& e : envs) cenv.push_back(const_cast<char*>(e.c_str()));
  cenv.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attr;
  posix_spawn_file_actions_init(&actions);
  posix_spawnattr_init(&attr);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, stdout_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, 2, stderr_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  // Own process group: Ctrl-C in the terminal reaches only the sweep, which then stops each
  // child's whole group itself and records why.
  posix_spawnattr_setpgroup(&attr, 0);
  sigset_t defaults;
  sigemptyset(&defaults);
  sigaddset(&defaults, SIGINT);
  sigaddset(&defaults, SIGTERM);
  sigaddset(&defaults, SIGPIPE);
  posix_spawnattr_setsigdefault(&attr, &defaults);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);
  int rc = posix_spawn(&pid_, cargv[0], &actions, &attr, cargv.data(), cenv.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) {
    pid_ = -1;
    throw Error("cannot start " + argv[0] + ": " + std::strerror(rc));
  }
  started_ = std::chrono::steady_clock::now();
}

ChildProcess::~ChildProcess() {
  if (pid_ > 0 && !exit_) stop(std::chrono::milliseconds(2000));
}

std::optional<ChildExit> ChildProcess::poll() {
  if (exit_ || pid_ <= 0) return exit_;
  int status = 0;
  pid_t r = waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    exit_ = from_status(status);
    // Anything the child left in its group (helpers, data workers) goes with it.
    kill(-pid_, SIGKILL);
  }
  return exit_;
}

ChildExit ChildProcess::stop(std::chrono::milliseconds grace) {
  if (auto e = poll()) return *e;
  kill(-pid_, SIGTERM);
  auto deadline = std::chrono::steady_clock::now() + grace;
  while (std::chrono::steady_clock::now() < deadline) {
    if (auto e = poll()) return *e;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  kill(-pid_, SIGKILL);
  int status = 0;
  while (waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
  }
  exit_ = from_status(status);
  return *exit_;
}

double ChildProcess::seconds_running() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
}

}  // namespace moelab::lab
