// The thread pool's contract: every part runs exactly once on its static worker, exceptions
// reach the caller, nested calls run inline instead of deadlocking, and parallel_for covers
// [0, n) with contiguous ranges.
#include <atomic>
#include <stdexcept>
#include <thread>

#include "backend/cpu/thread_pool.hpp"
#include "gradcheck.hpp"

namespace moelab::test {
namespace {

TEST(ThreadPool, RunsEveryPartOnceOnItsStaticWorker) {
  cpu::ThreadPool pool(3);
  ASSERT_EQ(pool.size(), 3);
  std::vector<std::thread::id> who(50);
  std::vector<int> hits(50, 0);
  pool.run(50, [&](int64_t p) {
    who[size_t(p)] = std::this_thread::get_id();
    ++hits[size_t(p)];
  });
  for (int p = 0; p < 50; ++p) {
    EXPECT_EQ(hits[size_t(p)], 1);
    EXPECT_EQ(who[size_t(p)], who[size_t(p % 3)]) << "part " << p;
  }
  EXPECT_EQ(who[0], std::this_thread::get_id());  // part 0 runs on the caller
}

TEST(ThreadPool, PropagatesExceptionsAndStaysUsable) {
  cpu::ThreadPool pool(2);
  EXPECT_THROW(pool.run(4, [](int64_t p) {
    if (p == 3) throw std::runtime_error("part 3");
  }), std::runtime_error);
  std::atomic<int> n{0};
  pool.run(8, [&](int64_t) { ++n; });
  EXPECT_EQ(n.load(), 8);
}

TEST(ThreadPool, NestedCallsRunInline) {
  cpu::ThreadPool pool(2);
  std::atomic<int> n{0};
  pool.run(2, [&](int64_t) { pool.run(5, [&](int64_t) { ++n; }); });
  EXPECT_EQ(n.load(), 10);
}

TEST(ThreadPool, ParallelForCoversRangeContiguously) {
  cpu::ThreadPool pool(2);
  for (int64_t n : {0, 1, 7, 1000}) {
    std::vector<int> hits(size_t(n), 0);
    pool.parallel_for(n, 3, [&](int64_t b, int64_t e) {
      EXPECT_LE(b, e);
      for (int64_t i = b; i < e; ++i) ++hits[size_t(i)];
    });
    for (int h : hits) EXPECT_EQ(h, 1);
  }
}

}  // namespace
}  // namespace moelab::test
