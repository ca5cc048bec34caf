// The communicator seam without other ranks: the launch environment as torchrun, mpirun and Slurm
// set it (contradictions refused, naming the variable), and the one-rank communicator's
// collectives (the identity, or a copy of the only chunk). The collectives across ranks run in
// mpi_collectives.cpp under mpiexec (ctest: MpiCollectives.TwoRanks).
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "comm/communicator.hpp"
#include "comm/rank_launcher.hpp"
#include "core/error.hpp"

namespace moelab {
namespace {

LaunchEnv env_of(const std::map<std::string, std::string>& vars) {
  return launch_env([&](const char* name) -> const char* {
    auto it = vars.find(name);
    return it == vars.end() ? nullptr : it->second.c_str();
  });
}

TEST(LaunchEnv, ReadsEachLaunchersVariables) {
  LaunchEnv none = env_of({});
  EXPECT_EQ(none.world, 1);
  EXPECT_EQ(none.launcher, "none");
  LaunchEnv t = env_of({{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}});
  EXPECT_EQ(t.launcher, "torchrun");
  EXPECT_EQ(t.rank, 3);
  EXPECT_EQ(t.world, 8);
  EXPECT_EQ(t.local_rank, 1);
  LaunchEnv m = env_of({{"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "2"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}});
  EXPECT_EQ(m.launcher, "mpirun");
  EXPECT_EQ(m.rank, 1);
  EXPECT_EQ(m.world, 2);
  LaunchEnv s = env_of({{"PMI_RANK", "0"}, {"PMI_SIZE", "4"}});
  EXPECT_EQ(s.launcher, "slurm");
  EXPECT_EQ(s.world, 4);
}

TEST(LaunchEnv, ContradictionsAreRefusedNamingTheVariable) {
  auto message = [](const std::map<std::string, std::string>& vars) {
    try {
      env_of(vars);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(message({{"RANK", "2"}, {"WORLD_SIZE", "2"}}).find("RANK=2"), std::string::npos);
  EXPECT_NE(message({{"RANK", "0"}}).find("WORLD_SIZE"), std::string::npos);
  EXPECT_NE(message({{"RANK", "x"}, {"WORLD_SIZE", "2"}}).find("RANK=\"x\""), std::string::npos);
  EXPECT_NE(message({{"WORLD_SIZE", "0"}, {"RANK", "0"}}).find("WORLD_SIZE=0"), std::string::npos);
}

TEST(SingleProcessCommunicator, CollectivesOfOneRank) {
  auto comm = make_communicator(LaunchEnv{});
  EXPECT_EQ(comm->rank(), 0);
  EXPECT_EQ(comm->world(), 1);
  std::vector<float> a = {1, -2, 3.5f}, b(3, 0.0f);
  Tensor ta = borrow_host(a), tb = borrow_host(b);
  comm->all_reduce_sum(ta);
  EXPECT_EQ(a, (std::vector<float>{1, -2, 3.5f}));
  comm->reduce_scatter_sum(ta, tb);
  EXPECT_EQ(b, a);
  b.assign(3, 0.0f);
  comm->all_gather(ta, tb);
  EXPECT_EQ(b, a);
  b.assign(3, 0.0f);
  comm->all_to_all(ta, tb);
  EXPECT_EQ(b, a);
  b.assign(3, 0.0f);
  comm->all_to_all_v(ta, {2}, tb, {2});
  EXPECT_EQ(b, (std::vector<float>{1, -2, 0}));
  EXPECT_THROW(comm->all_to_all_v(ta, {2}, tb, {3}), Error);
  comm->broadcast(ta, 0);
  EXPECT_THROW(comm->broadcast(ta, 1), Error);
  std::vector<float> small(2);
  Tensor ts = borrow_host(small);
  EXPECT_THROW(comm->reduce_scatter_sum(ta, ts), Error);
  comm->barrier();
}

TEST(SingleProcessCommunicator, ALargerJobNeedsItsLauncher) {
  LaunchEnv env;
  env.world = 2;
  env.rank = 1;
  env.launcher = "torchrun";
  EXPECT_THROW(make_communicator(env), Error);  // CPU ranks run on MPI: mpirun
}

// What the supervising launcher reads from a job's error output: a rank's own error as the
// trainer words it, and Open MPI's notice of a rank that died; other lines say nothing. The cause
// of a job's end is a rank that died before the others' interruptions (mpiexec stops them when
// one fails, and their own errors may come first).
TEST(RankLauncher, ReadsWhichRankFailed) {
  auto text = [](const std::string& line) {
    auto f = rank_failure_in(line);
    return f ? f->text : std::string("-");
  };
  EXPECT_EQ(text("moelab: error: rank 1 of 2: data: the corpus is empty"), "rank 1 of 2 failed: data: the corpus is empty");
  EXPECT_EQ(text("mpiexec noticed that process rank 3 with PID 0 on node vm exited on signal 9 (Killed)."),
            "rank 3 died on signal 9 (Killed)");
  EXPECT_EQ(text("mpiexec noticed that process rank 0 with PID 4242 on node gpu-7 exited on signal 11"),
            "rank 0 died on signal 11");
  EXPECT_EQ(text("step 00003/02000 (0.15%) | loss: 8.210512 | bal: 0.0401 | lrm: 1.00"), "-");
  EXPECT_EQ(text("Primary job  terminated normally, but 1 process returned"), "-");

  const RankFailure stopped = *rank_failure_in("moelab: error: rank 0 of 2: interrupted by signal 15 (SIGTERM) before step 9");
  const RankFailure died = *rank_failure_in("mpiexec noticed that process rank 1 with PID 0 on node vm exited on signal 9 (Killed).");
  const RankFailure broke = *rank_failure_in("moelab: error: rank 1 of 2: loss is NaN at step 3");
  EXPECT_TRUE(stopped.interrupted);
  EXPECT_EQ(first_cause({stopped, died}), died.text);
  EXPECT_EQ(first_cause({stopped, broke}), broke.text);
  EXPECT_EQ(first_cause({stopped}), stopped.text);
  EXPECT_EQ(first_cause({}), "");
}

}  // namespace
}  // namespace moelab
