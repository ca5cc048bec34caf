// Data parallel on CPU ranks: `moelab train --nproc 2` (two ranks under mpiexec, each reading its
// own rows, gradients summed over ranks before the update) trains the same model as one rank with
// twice the batch: the same losses and balance losses step by step (the balance loss over both
// ranks' routing), within f32 reduction-order tolerance, and one
// set of run-folder records (rank 0 writes, the other rank writes nothing); a two-rank run resumed
// from a checkpoint logs the uninterrupted two-rank run's losses bit for bit. Skips where moelab
// was built without MPI.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <thread>
#include <fstream>

#include "comm/communicator.hpp"
#include "config/config.hpp"
#include "run_test_support.hpp"
#include "train/safetensors.hpp"
#include "train/trainer.hpp"

namespace moelab {
namespace {
namespace fs = std::filesystem;

std::vector<double> values(const fs::path& run, const char* event, const char* key) {
  std::vector<double> out;
  for (const auto& j : test::read_events(run, event)) out.push_back(j[key].get<double>());
  return out;
}

// The two-rank tests' config; `changes` as with_keys takes them.
Config dp_config(const fs::path& dir, const std::string& changes = "") {
  const std::string text =
      test::write_words(dir, {"each", "rank", "reads", "its", "own", "rows", "and", "the", "gradients", "are", "summed"},
                        6000, 3, 5);
  // The balance loss is over the group's routing, so it matches one rank's whole batch.
  Config c = test::with_keys(test::tiny_byte_config(text),
                             "moe.balance_coef=0.05 moe.dispatch=dropless train.steps=6 train.eval_every=3 "
                             "train.batch_size=8 train.threads=1 train.save_final=false " + changes);
  validate_config(c);
  return c;
}

// `moelab train --nproc 2` on cfg into dir / out, with extra arguments.
int train_two_ranks(const Config& cfg, const fs::path& dir, const std::string& out, const std::string& extra = "") {
  std::ofstream(dir / (out + ".toml")) << config_to_toml(cfg);
  const std::string cmd = std::string(MOELAB_BINARY) + " train --config " + (dir / (out + ".toml")).string() +
                          " --out " + (dir / out).string() + " --nproc 2 " + extra + " >> " +
                          (dir / (out + ".log")).string() + " 2>&1";
  return std::system(cmd.c_str());
}

// The job in `ranks` completed and logged the losses of the one-rank run `one` (six steps, the
// raw and balance losses, and the validations) to 1e-5.
void expect_same_losses(const fs::path& one, const fs::path& ranks) {
  for (const char* key : {"raw_loss", "bal"}) {
    const std::vector<double> a = values(one, "step", key), b = values(ranks, "step", key);
    ASSERT_EQ(a.size(), 6u);
    ASSERT_EQ(b.size(), 6u) << "each step recorded once: only rank 0 writes";
    for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(b[i], a[i], 1e-5 * std::fabs(a[i])) << key << " at step " << i;
  }
  const std::vector<double> va = values(one, "val", "val_loss"), vb = values(ranks, "val", "val_loss");
  ASSERT_EQ(va.size(), vb.size());
  for (size_t i = 0; i < va.size(); ++i) EXPECT_NEAR(vb[i], va[i], 1e-5 * std::fabs(va[i])) << "validation " << i;
  EXPECT_EQ(test::read_status(ranks)["status"], "completed");
}

TEST(DataParallel, TwoRanksTrainAsOneRankWithTwiceTheBatch) {
  if (!built_with_mpi()) GTEST_SKIP() << "moelab was built without MPI";
  const fs::path dir = test::fresh_dir("dp");
  Config c = dp_config(dir);
  run_training(c, (dir / "one").string());

  Config half = c;
  half.train.batch_size = 4;
  ASSERT_EQ(train_two_ranks(half, dir, "two"), 0) << "see " << (dir / "two.log").string();

  expect_same_losses(dir / "one", dir / "two");
  fs::remove_all(dir);
}

// optim.shard_state (ZeRO-1): each of two ranks keeps the optimizer state of its own parameters
// and sends them to the other after its update; the job still trains as one rank with twice the
// batch, with Muon on the matrices and with AdamW on them.
TEST(DataParallel, ShardedOptimizerStateTrainsAsOneRankWithTwiceTheBatch) {
  if (!built_with_mpi()) GTEST_SKIP() << "moelab was built without MPI";
  for (const std::string opt : {"muon", "adamw"}) {
    SCOPED_TRACE(opt);
    const fs::path dir = test::fresh_dir("dpshard");
    Config c = dp_config(dir, "optim.matrix_optimizer=" + opt);
    run_training(c, (dir / "one").string());
    Config half = c;
    half.train.batch_size = 4;
    half.optim.shard_state = true;
    ASSERT_EQ(train_two_ranks(half, dir, "two"), 0) << "see " << (dir / "two.log").string();
    expect_same_losses(dir / "one", dir / "two");
    fs::remove_all(dir);
  }
}

// A sharded run's checkpoint holds the whole state (each rank sends its share, rank 0 writes):
// the interrupted and resumed two-rank run logs the uninterrupted one's losses bit for bit, with
// Muon and with AdamW on the matrices, and a resume by one rank is refused, naming both sizes.
TEST(DataParallel, ShardedOptimizerStateResumesExactly) {
  if (!built_with_mpi()) GTEST_SKIP() << "moelab was built without MPI";
  for (const std::string opt : {"muon", "adamw"}) {
    SCOPED_TRACE(opt);
    const fs::path dir = test::fresh_dir("dpshardresume");
    Config c = dp_config(dir, "train.batch_size=4 train.checkpoint_every=3 optim.shard_state=true optim.matrix_optimizer=" + opt);
    ASSERT_EQ(train_two_ranks(c, dir, "full"), 0) << "see " << (dir / "full.log").string();
    ASSERT_EQ(train_two_ranks(c, dir, "part"), 0) << "see " << (dir / "part.log").string();
    ASSERT_TRUE(fs::remove(dir / "part" / "checkpoints" / "step_000006.safetensors"));
    Config one = c;
    one.train.resume = "auto";
    std::string error;
    try {
      run_training(one, (dir / "part").string());
    } catch (const std::exception& e) {
      error = e.what();
    }
    EXPECT_NE(error.find("written by a job of 2 rank(s) and this job has 1"), std::string::npos) << error;
    ASSERT_EQ(train_two_ranks(c, dir, "part", "--set train.resume=auto"), 0) << "see " << (dir / "part.log").string();
    const auto resumes = test::read_events(dir / "part", "resume");
    ASSERT_EQ(resumes.size(), 1u);
    EXPECT_EQ(resumes[0]["step"], 3);
    const std::vector<double> a = values(dir / "full", "step", "raw_loss"), b = values(dir / "part", "step", "raw_loss");
    ASSERT_EQ(a.size(), 6u);
    ASSERT_EQ(b.size(), 6u);
    for (size_t k = 0; k < a.size(); ++k) EXPECT_EQ(b[k], a[k]) << "step " << k;
    fs::remove_all(dir);
  }
}

TEST(DataParallel, ResumedTwoRankRunLogsTheUninterruptedLosses) {
  if (!built_with_mpi()) GTEST_SKIP() << "moelab was built without MPI";
  const fs::path dir = test::fresh_dir("dpresume");
  Config c = dp_config(dir, "train.batch_size=4 train.checkpoint_every=3");
  ASSERT_EQ(train_two_ranks(c, dir, "full"), 0) << "see " << (dir / "full.log").string();
  ASSERT_EQ(train_two_ranks(c, dir, "part"), 0) << "see " << (dir / "part.log").string();
  // The later checkpoint is lost: the resume starts from step 3 and runs 3..5 again.
  ASSERT_TRUE(fs::remove(dir / "part" / "checkpoints" / "step_000006.safetensors"));
  ASSERT_EQ(train_two_ranks(c, dir, "part", "--set train.resume=auto"), 0) << "see " << (dir / "part.log").string();
  const auto resumes = test::read_events(dir / "part", "resume");
  ASSERT_EQ(resumes.size(), 1u);
  EXPECT_EQ(resumes[0]["step"], 3);
  const std::vector<double> a = values(dir / "full", "step", "raw_loss"), b = values(dir / "part", "step", "raw_loss");
  ASSERT_EQ(a.size(), 6u);
  ASSERT_EQ(b.size(), 6u);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(b[i], a[i]) << "step " << i;
  fs::remove_all(dir);
}

// A checkpoint of a two-rank job resumed by one rank would continue with half the tokens a step
// and another data position, silently: it is refused, naming both job sizes and --nproc, and the
// folder is left as it was.
TEST(DataParallel, ResumeByAnotherNumberOfRanksIsRefused) {
  if (!built_with_mpi()) GTEST_SKIP() << "moelab was built without MPI";
  const fs::path dir = test::fresh_dir("dpworld");
  Config c = dp_config(dir, "train.batch_size=4 train.checkpoint_every=3");
  ASSERT_EQ(train_two_ranks(c, dir, "two"), 0) << "see " << (dir / "two.log").string();
  ASSERT_TRUE(fs::remove(dir / "two" / "checkpoints" / "step_000006.safetensors"));
  const std::string metrics_before = test::read_text(dir / "two" / "metrics.jsonl");
  Config resume = c;
  resume.train.resume = "auto";
  std::string error;
  try {
    run_training(resume, (dir / "two").string());
  } catch (const std::exception& e) {
    error = e.what();
  }
  EXPECT_NE(error.find("written by a job of 2 rank(s) and this job has 1"), std::string::npos) << error;
  EXPECT_NE(error.find("resume with --nproc 2"), std::string::npos) << error;
  // status.json says how many ranks ran it.
  EXPECT_EQ(test::read_status(dir / "two")["ranks"], 2);
  EXPECT_EQ(test::read_text(dir / "two" / "metrics.jsonl"), metrics_before);
  // The matching job size resumes.
  ASSERT_EQ(train_two_ranks(c, dir, "two", "--set train.resume=auto"), 0) << "see " << (dir / "two.log").string();
  fs::remove_all(dir);
}

// More ranks than cores starts with a warning that says so (here the ranks' start-up then fails
// on data that is not there, which the test needs no more than).
TEST(DataParallel, OversubscribedRanksAreNamedBeforeTheyStart) {
  if (!built_with_mpi()) GTEST_SKIP() << "moelab was built without MPI";
  const unsigned cores = std::thread::hardware_concurrency();
  if (cores == 0 || cores > 8) GTEST_SKIP() << "more ranks than " << cores << " cores would be a heavy test";
  const fs::path dir = test::fresh_dir("dpover");
  Config c = dp_config(dir);
  c.data.source = "shards";
  c.data.dir = (dir / "no_shards").string();
  std::ofstream(dir / "c.toml") << config_to_toml(c);
  const std::string cmd = std::string(MOELAB_BINARY) + " train --config " + (dir / "c.toml").string() + " --out " +
                          (dir / "run").string() + " --nproc " + std::to_string(cores + 1) + " > " +
                          (dir / "log").string() + " 2>&1";
  EXPECT_NE(std::system(cmd.c_str()), 0);
  const std::string log = test::read_text(dir / "log");
  EXPECT_NE(log.find("starts " + std::to_string(cores + 1) + " ranks on " + std::to_string(cores) + " cores: oversubscribed"),
            std::string::npos)
      << log;
  fs::remove_all(dir);
}

// Expert parallel on CPU ranks: two ranks, each holding two of the four experts of every MoE
// layer and reading its own rows, train as one rank holding all four with twice the batch (the
// token rows go to their experts' ranks and back by all-to-all): the same losses, balance losses
// and validation losses within f32 reduction-order tolerance.
TEST(ExpertParallel, TwoRanksSplittingTheExpertsTrainAsOneRank) {
  if (!built_with_mpi()) GTEST_SKIP() << "moelab was built without MPI";
  const fs::path dir = test::fresh_dir("ep");
  Config c = dp_config(dir);
  ASSERT_EQ(c.moe.experts, 4);
  run_training(c, (dir / "one").string());

  Config ep = c;
  ep.train.batch_size = 4;
  ep.parallel.expert = 2;
  ASSERT_EQ(train_two_ranks(ep, dir, "ep"), 0) << "see " << (dir / "ep.log").string();

  expect_same_losses(dir / "one", dir / "ep");
  fs::remove_all(dir);
}

// The float32 tensor `name` of a safetensors file, with its shape.
std::vector<float> f32_tensor(const fs::path& file, const std::string& name, Shape& shape) {
  const SafetensorsFile f = read_safetensors(file.string());
  const SafetensorsEntry* e = f.find(name);
  if (!e) return {};
  shape = e->shape;
  std::vector<float> out(e->bytes / sizeof(float));
  std::memcpy(out.data(), f.bytes(*e), e->bytes);
  return out;
}

// Checkpoints of expert-parallel runs hold the whole expert stacks (every rank sends its experts,
// rank 0 writes): the interrupted and resumed two-rank run logs the uninterrupted one's losses bit
// for bit; model.safetensors holds all four experts in order, as the one-rank run with twice the
// batch trained them (to f32 reduction-order tolerance); a resume with another parallel.expert is
// refused naming both layouts.
TEST(ExpertParallel, CheckpointsResumeExactlyAndExportEveryExpert) {
  if (!built_with_mpi()) GTEST_SKIP() << "moelab was built without MPI";
  const fs::path dir = test::fresh_dir("epckpt");
  Config c = dp_config(dir, "train.save_final=true");
  run_training(c, (dir / "one").string());
  Config ep = c;
  ep.train.batch_size = 4;
  ep.parallel.expert = 2;
  ep.train.checkpoint_every = 3;
  ASSERT_EQ(train_two_ranks(ep, dir, "full"), 0) << "see " << (dir / "full.log").string();
  ASSERT_EQ(train_two_ranks(ep, dir, "part"), 0) << "see " << (dir / "part.log").string();
  ASSERT_TRUE(fs::remove(dir / "part" / "checkpoints" / "step_000006.safetensors"));

  EXPECT_NE(train_two_ranks(ep, dir, "part", "--set train.resume=auto --set parallel.expert=1"), 0);
  const std::string log = test::read_text(dir / "part.log");
  EXPECT_NE(log.find("written with parallel.expert = 2 over 2 rank(s) and this job has parallel.expert = 1 over 2"),
            std::string::npos) << log;

  ASSERT_EQ(train_two_ranks(ep, dir, "part", "--set train.resume=auto"), 0) << "see " << (dir / "part.log").string();
  const auto resumes = test::read_events(dir / "part", "resume");
  ASSERT_EQ(resumes.size(), 1u);
  EXPECT_EQ(resumes[0]["step"], 3);
  const std::vector<double> a = values(dir / "full", "step", "raw_loss"), b = values(dir / "part", "step", "raw_loss");
  ASSERT_EQ(a.size(), 6u);
  ASSERT_EQ(b.size(), 6u);
  for (size_t k = 0; k < a.size(); ++k) EXPECT_EQ(b[k], a[k]) << "step " << k;

  for (const std::string name : {"transformer.h.0.mlp.experts.w_fc", "transformer.h.0.mlp.experts.w_proj"}) {
    Shape s1, s2;
    const std::vector<float> w1 = f32_tensor(dir / "one" / "model.safetensors", name, s1),
                             w2 = f32_tensor(dir / "full" / "model.safetensors", name, s2);
    ASSERT_FALSE(w1.empty()) << name;
    ASSERT_EQ(s2, s1) << name;
    EXPECT_EQ(s2[0], 4) << name;
    double err = 0, norm = 0;
    for (size_t k = 0; k < w1.size(); ++k) {
      ASSERT_FALSE(std::isnan(w2[k])) << name;
      err += (double(w2[k]) - w1[k]) * (double(w2[k]) - w1[k]);
      norm += double(w1[k]) * w1[k];
    }
    EXPECT_LT(std::sqrt(err / norm), 1e-4) << name;
  }
  fs::remove_all(dir);
}

// The ranks of this machine whose command line names `needle` and whose environment says
// OMPI_COMM_WORLD_RANK=rank (read from /proc).
std::vector<pid_t> rank_processes(const std::string& needle, int rank) {
  std::vector<pid_t> out;
  const std::string want = "OMPI_COMM_WORLD_RANK=" + std::to_string(rank);
  for (const auto& e : fs::directory_iterator("/proc")) {
    const std::string name = e.path().filename().string();
    if (name.empty() || !std::all_of(name.begin(), name.end(), ::isdigit)) continue;
    std::ifstream cmd(e.path() / "cmdline"), env(e.path() / "environ");
    const std::string c((std::istreambuf_iterator<char>(cmd)), {}), v((std::istreambuf_iterator<char>(env)), {});
    if (c.find(needle) == std::string::npos) continue;
    size_t pos = 0;
    for (size_t end; (end = v.find('\0', pos)) != std::string::npos; pos = end + 1)
      if (v.compare(pos, end - pos, want) == 0) out.push_back(pid_t(std::stoi(name)));
  }
  return out;
}

// A rank that dies (SIGKILL, so it cannot say so itself) takes the job down, and the launcher
// marks the run failed naming that rank: before, rank 0 was killed waiting for it in a collective
// and the run stayed "running".
TEST(DataParallel, ARankThatDiesFailsTheRunNamingIt) {
  if (!built_with_mpi()) GTEST_SKIP() << "moelab was built without MPI";
  const fs::path dir = test::fresh_dir("dpdies");
  Config c = dp_config(dir);
  c.train.steps = 100000;  // long enough to be killed mid-run
  c.train.eval_every = 0;
  std::ofstream(dir / "job.toml") << config_to_toml(c);
  const std::string out = (dir / "run").string();
  const std::string cmd = std::string(MOELAB_BINARY) + " train --config " + (dir / "job.toml").string() + " --out " +
                          out + " --nproc 2 > " + (dir / "job.log").string() + " 2>&1";
  const pid_t job = fork();
  ASSERT_GE(job, 0);
  if (job == 0) {
    execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  // Wait for training to be under way, then kill rank 1.
  std::vector<pid_t> victims;
  for (int i = 0; i < 600 && victims.empty(); ++i) {
    size_t steps = 0;
    try {
      steps = test::read_events(out, "step").size();
    } catch (const std::exception&) {  // a line being written
    }
    if (steps >= 2) victims = rank_processes(out, 1);
    if (victims.empty()) usleep(100 * 1000);
  }
  ASSERT_EQ(victims.size(), 1u) << "rank 1 of the job not found; see " << (dir / "job.log").string();
  ASSERT_EQ(kill(victims[0], SIGKILL), 0);
  int status = 0;
  pid_t done = 0;
  for (int i = 0; i < 600 && done == 0; ++i) {
    done = waitpid(job, &status, WNOHANG);
    if (done == 0) usleep(100 * 1000);
  }
  if (done == 0) kill(job, SIGKILL);
  ASSERT_EQ(done, job) << "the job did not end within 60 s of its rank 1 dying";
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1) << "exit status " << status;
  const auto st = test::read_status(out);
  EXPECT_EQ(st["status"], "failed");
  EXPECT_NE(st["error"].get<std::string>().find("rank 1 died on signal 9"), std::string::npos) << st.dump();
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moelab
