// A small persistent thread pool for the CPU backend. Work is split statically: part p of a job
// always goes to worker p % size(), and parallel_for cuts [0, n) into fixed contiguous ranges, so
// an op's result never depends on scheduling. Ops that also want results independent of the
// thread count make each output element the work of exactly one part (see cpu_common.hpp).
#pragma once
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moelab::cpu {

class ThreadPool {
 public:
  // threads <= 0: one per hardware thread.
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return threads_; }

  // Calls fn(p) for every p in [0, parts), part p on worker p % size() (worker 0 is the caller),
  // and returns when all are done. The first exception thrown by any part is rethrown here.
  // A call from inside a running job runs serially on the calling thread (no nested fan-out).
  void run(int64_t parts, const std::function<void(int64_t)>& fn);

  // Splits [0, n) into at most size() contiguous ranges of at least `grain` items each and
  // calls fn(begin, end) once per range.
  template <class F>
  void parallel_for(int64_t n, int64_t grain, F&& fn) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    int64_t parts = n / grain;
    if (parts > threads_) parts = threads_;
    if (parts <= 1) {
      fn(int64_t(0), n);
      return;
    }
    run(parts, [&](int64_t p) { fn(n * p / parts, n * (p + 1) / parts); });
  }

 private:
  void worker_loop(int index);

  int threads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex call_mu_;  // one job at a time per pool
  std::mutex mu_;
  std::condition_variable start_cv_, done_cv_;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t parts_ = 0;
  uint64_t generation_ = 0;
  int pending_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

}  // namespace moelab::cpu
