// The supervising launcher of `moelab train --nproc N` (see rank_launcher.hpp).
#include "comm/rank_launcher.hpp"

#include <fcntl.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "core/error.hpp"
#include "core/regex.hpp"

namespace moelab {

namespace {

std::atomic<pid_t> g_job{0};
std::atomic<bool> g_forwarded{false};
void forward_to_job(int sig) {
  g_forwarded.store(true);
  if (pid_t p = g_job.load(); p > 0) kill(p, sig);
}

}  // namespace

std::optional<RankFailure> rank_failure_in(const std::string& line) {
  static const Regex own(R"(rank (\d+) of (\d+): (.*)$)");
  static const Regex died(R"(process rank (\d+) with PID \d+ on node \S+ exited on signal (\d+)(?: \(([^)]*)\))?)");
  RankFailure f;
  if (const auto m = own.search(line)) {
    f.text = "rank " + m->str(1) + " of " + m->str(2) + " failed: " + m->str(3);
    f.interrupted = m->str(3).rfind("interrupted by signal", 0) == 0;
    return f;
  }
  if (const auto m = died.search(line)) {
    f.text = "rank " + m->str(1) + " died on signal " + m->str(2);
    if (m->matched(3)) f.text += " (" + m->str(3) + ")";
    f.died = true;
    return f;
  }
  return std::nullopt;
}

std::string first_cause(const std::vector<RankFailure>& failures) {
  for (const RankFailure& f : failures)
    if (f.died) return f.text;
  for (const RankFailure& f : failures)
    if (!f.interrupted) return f.text;
  return failures.empty() ? std::string() : failures.front().text;
}

RankJobResult run_rank_job(int nproc, const std::vector<std::string>& argv) {
  // Containers often run as root, which mpiexec refuses unless told; and forbid the shared-memory
  // single copy it tries first.
  if (geteuid() == 0) {
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 0);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 0);
  }
  setenv("OMPI_MCA_btl_vader_single_copy_mechanism", "none", 0);
  std::vector<std::string> cmd = {"mpiexec", "-n", std::to_string(nproc), "--oversubscribe"};
  cmd.insert(cmd.end(), argv.begin(), argv.end());
  std::vector<char*> c_argv;
  for (auto& a : cmd) c_argv.push_back(a.data());
  c_argv.push_back(nullptr);

  int err[2], started[2];  // the job's stderr; a close-on-exec pipe that says whether exec worked
  if (pipe(err) != 0 || pipe(started) != 0) throw Error(std::string("--nproc: cannot make a pipe: ") + std::strerror(errno));
  const pid_t child = fork();
  if (child < 0) throw Error(std::string("--nproc: cannot fork: ") + std::strerror(errno));
  if (child == 0) {
    setpgid(0, 0);  // a terminal's Ctrl-C reaches the job once, through forward_to_job
    prctl(PR_SET_PDEATHSIG, SIGTERM);  // and the job ends if this launcher is killed
    dup2(err[1], STDERR_FILENO);
    close(err[0]);
    close(err[1]);
    close(started[0]);
    fcntl(started[1], F_SETFD, FD_CLOEXEC);
    execvp(c_argv[0], c_argv.data());
    const int e = errno;
    (void)!write(started[1], &e, sizeof(e));
    _exit(127);
  }
  close(err[1]);
  close(started[1]);
  int exec_errno = 0;
  if (read(started[0], &exec_errno, sizeof(exec_errno)) == ssize_t(sizeof(exec_errno))) {
    close(started[0]);
    close(err[0]);
    waitpid(child, nullptr, 0);
    throw Error(std::string("--nproc: cannot start mpiexec (") + std::strerror(exec_errno) +
                "); is openmpi-bin installed? (scripts/install-deps.sh installs it)");
  }
  close(started[0]);
  g_forwarded.store(false);
  g_job.store(child);
  auto old_int = std::signal(SIGINT, forward_to_job);
  auto old_term = std::signal(SIGTERM, forward_to_job);

  RankJobResult result;
  std::vector<RankFailure> failures;
  std::string pending;
  char buf[4096];
  for (;;) {
    const ssize_t n = read(err[0], buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    (void)!write(STDERR_FILENO, buf, size_t(n));  // the ranks' messages reach the user as they come
    pending.append(buf, size_t(n));
    for (size_t nl; (nl = pending.find('\n')) != std::string::npos; pending.erase(0, nl + 1))
      if (auto f = rank_failure_in(pending.substr(0, nl))) failures.push_back(*f);
  }
  if (auto f = rank_failure_in(pending)) failures.push_back(*f);  // a last line without its newline
  result.failure = first_cause(failures);
  close(err[0]);
  int status = 0;
  while (waitpid(child, &status, 0) < 0 && errno == EINTR) {
  }
  g_job.store(0);
  std::signal(SIGINT, old_int);
  std::signal(SIGTERM, old_term);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  result.interrupted = g_forwarded.load();
  return result;
}

}  // namespace moelab
