// Persistent workers parked on a condition variable; a job wakes them all, each runs its static
// share of the parts, and the caller (worker 0) runs its own share before waiting for the rest.
// Blocking rather than spinning keeps idle workers from stealing cores on a shared machine.
#include "backend/cpu/thread_pool.hpp"

namespace moelab::cpu {

namespace {
thread_local bool t_inside_job = false;
}

ThreadPool::ThreadPool(int threads) {
  if (threads <= 0) threads = int(std::thread::hardware_concurrency());
  threads_ = threads < 1 ? 1 : threads;
  for (int i = 1; i < threads_; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  start_cv_.notify_all();
  for (auto& w : workers_) w.join();
}

void ThreadPool::run(int64_t parts, const std::function<void(int64_t)>& fn) {
  if (parts <= 0) return;
  if (parts == 1 || threads_ == 1 || t_inside_job) {
    for (int64_t p = 0; p < parts; ++p) fn(p);
    return;
  }
  std::lock_guard<std::mutex> call_lock(call_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = &fn;
    parts_ = parts;
    pending_ = threads_ - 1;
    error_ = nullptr;
    ++generation_;
  }
  start_cv_.notify_all();
  std::exception_ptr mine;
  t_inside_job = true;
  try {
    for (int64_t p = 0; p < parts; p += threads_) fn(p);
  } catch (...) {
    mine = std::current_exception();
  }
  t_inside_job = false;
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [this] { return pending_ == 0; });
  job_ = nullptr;
  if (mine) std::rethrow_exception(mine);
  if (error_) std::rethrow_exception(error_);
}

void ThreadPool::worker_loop(int index) {
  t_inside_job = true;
  uint64_t seen = 0;
  for (;;) {
    const std::function<void(int64_t)>* job;
    int64_t parts;
    {
      std::unique_lock<std::mutex> lock(mu_);
      start_cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      job = job_;
      parts = parts_;
    }
    std::exception_ptr err;
    try {
      for (int64_t p = index; p < parts; p += threads_) (*job)(p);
    } catch (...) {
      err = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (err && !error_) error_ = err;
    if (--pending_ == 0) done_cv_.notify_one();
  }
}

}  // namespace moelab::cpu
