// fork/exec child process (see child_process.hpp).
#include "lab/child_process.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
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

  // Everything the child needs is made before fork: between fork and exec it calls only
  // async-signal-safe functions.
  auto open_or_throw = [](const char* path, int flags) {
    int fd = ::open(path, flags | O_CLOEXEC, 0644);
    if (fd < 0) throw Error(std::string("cannot open ") + path + " for a child process: " + std::strerror(errno));
    return fd;
  };
  int in_fd = open_or_throw("/dev/null", O_RDONLY);
  int out_fd = -1, err_fd = -1, status_pipe[2] = {-1, -1};
  try {
    out_fd = open_or_throw(stdout_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC);
    err_fd = open_or_throw(stderr_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC);
    if (::pipe2(status_pipe, O_CLOEXEC) != 0) throw Error(std::string("cannot make a pipe: ") + std::strerror(errno));
  } catch (...) {
    for (int fd : {in_fd, out_fd, err_fd})
      if (fd >= 0) ::close(fd);
    throw;
  }
  const pid_t parent = ::getpid();
  pid_ = ::fork();
  if (pid_ == 0) {
    // Own process group: Ctrl-C in the terminal reaches only the sweep, which then stops each
    // child's whole group itself and records why.
    ::setpgid(0, 0);
    // Die with the sweep: a sweep killed by SIGKILL leaves no trainer running on without it.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);  // the sweep died before prctl took effect
    ::dup2(in_fd, 0);
    ::dup2(out_fd, 1);
    ::dup2(err_fd, 2);
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    for (int sig : {SIGINT, SIGTERM, SIGPIPE}) ::sigaction(sig, &dfl, nullptr);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::execve(cargv[0], cargv.data(), cenv.data());
    int err = errno;
    ssize_t ignored = ::write(status_pipe[1], &err, sizeof err);
    (void)ignored;
    ::_exit(127);
  }
  const int fork_errno = errno;
  for (int fd : {in_fd, out_fd, err_fd, status_pipe[1]}) ::close(fd);
  if (pid_ < 0) {
    ::close(status_pipe[0]);
    pid_ = -1;
    throw Error("cannot start " + argv[0] + ": fork failed: " + std::strerror(fork_errno));
  }
  ::setpgid(pid_, pid_);  // also from here, so the group exists before we might signal it
  // The pipe closes at exec (success) or carries exec's errno (failure).
  int exec_errno = 0;
  ssize_t n;
  while ((n = ::read(status_pipe[0], &exec_errno, sizeof exec_errno)) < 0 && errno == EINTR) {
  }
  ::close(status_pipe[0]);
  if (n == ssize_t(sizeof exec_errno)) {
    int st;
    while (::waitpid(pid_, &st, 0) < 0 && errno == EINTR) {
    }
    pid_ = -1;
    throw Error("cannot start " + argv[0] + ": " + std::strerror(exec_errno));
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
