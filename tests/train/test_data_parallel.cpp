// Data parallel on CPU ranks: `moelab train --nproc 2` (two ranks under mpiexec, each reading its
// own rows, gradients summed over ranks before the update) trains the same model as one rank with
// twice the batch: the same losses step by step, within f32 reduction-order tolerance, and one
// set of run-folder records (rank 0 writes, the other rank writes nothing). Skips where moelab
// was built without MPI.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "comm/communicator.hpp"
#include "config/config.hpp"
#include "run_test_support.hpp"
#include "train/trainer.hpp"

namespace moelab {
namespace {
namespace fs = std::filesystem;

std::vector<double> values(const fs::path& run, const char* event, const char* key) {
  std::vector<double> out;
  for (const auto& j : test::read_events(run, event)) out.push_back(j[key].get<double>());
  return out;
}

TEST(DataParallel, TwoRanksTrainAsOneRankWithTwiceTheBatch) {
  if (!built_with_mpi()) GTEST_SKIP() << "moelab was built without MPI";
  const fs::path dir = test::fresh_dir("dp");
  const std::string text =
      test::write_words(dir, {"each", "rank", "reads", "its", "own", "rows", "and", "the", "gradients", "are", "summed"},
                        6000, 3, 5);
  Config c = test::tiny_byte_config(text);
  c.moe.balance_coef = 0.0;  // the balance loss is each rank's own (nonlinear in the batch's routing)
  c.moe.dispatch = "dropless";
  c.train.steps = 6;
  c.train.eval_every = 3;
  c.train.batch_size = 8;
  c.train.threads = 1;
  c.train.save_final = false;
  validate_config(c);
  run_training(c, (dir / "one").string());

  Config half = c;
  half.train.batch_size = 4;
  std::ofstream(dir / "half.toml") << config_to_toml(half);
  const std::string cmd = std::string(MOELAB_BINARY) + " train --config " + (dir / "half.toml").string() + " --out " +
                          (dir / "two").string() + " --nproc 2 > " + (dir / "two.log").string() + " 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << "see " << (dir / "two.log").string();

  for (const char* key : {"raw_loss"}) {
    const std::vector<double> a = values(dir / "one", "step", key), b = values(dir / "two", "step", key);
    ASSERT_EQ(a.size(), 6u);
    ASSERT_EQ(b.size(), 6u) << "each step recorded once: only rank 0 writes";
    for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(b[i], a[i], 1e-5 * std::fabs(a[i])) << key << " at step " << i;
  }
  const std::vector<double> va = values(dir / "one", "val", "val_loss"), vb = values(dir / "two", "val", "val_loss");
  ASSERT_EQ(va.size(), vb.size());
  for (size_t i = 0; i < va.size(); ++i) EXPECT_NEAR(vb[i], va[i], 1e-5 * std::fabs(va[i])) << "validation " << i;
  EXPECT_EQ(test::read_status(dir / "two")["status"], "completed");
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moelab
