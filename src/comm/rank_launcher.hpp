// `moelab train --nproc N`: N ranks of this host started under mpiexec and supervised, as
// torchrun's agent supervises its workers. mpiexec takes the job down when a rank fails, but a
// rank that dies cannot say so, and rank 0 may be killed while it waits in a collective for the
// dead one, leaving its run marked running. So the launcher stays the job's parent: it passes the
// ranks' output through, reads from it which rank failed first and how, and returns that, so the
// caller can mark the run failed with the rank named.
#pragma once
#include <optional>
#include <string>
#include <vector>

namespace moelab {

struct RankJobResult {
  int exit_code = 0;    // mpiexec's exit status (128 + the signal when it was killed by one)
  std::string failure;  // what failed, naming the rank (first_cause); "" if the job reported none
  bool interrupted = false;  // SIGINT or SIGTERM reached this process and was passed to the job
};

// Runs argv (a program and its arguments) as nproc ranks under mpiexec. SIGINT and SIGTERM sent
// to this process are passed to the job. Throws moelab::Error if mpiexec cannot be started.
RankJobResult run_rank_job(int nproc, const std::vector<std::string>& argv);

// A failure a line of a job's error output reports: a rank's own error ("moelab: error: rank 1
// of 2: ..." as the trainer words it), or mpiexec's notice of a rank that died ("... process
// rank 1 with PID 0 on node vm exited on signal 9 (Killed).").
struct RankFailure {
  std::string text;          // e.g. "rank 1 died on signal 9 (Killed)"
  bool died = false;         // mpiexec's notice: the rank was killed by a signal
  bool interrupted = false;  // the rank's error is its stop on a signal (how the others end when one dies)
};
// nullopt for any other line.
std::optional<RankFailure> rank_failure_in(const std::string& line);
// Which of a job's reported failures caused it: mpiexec's notice of a rank killed by a signal,
// else the first rank error that is not an interruption, else the first one; "" if none.
std::string first_cause(const std::vector<RankFailure>& failures);

}  // namespace moelab
