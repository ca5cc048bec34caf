// One writer per folder. A run folder (moelab train) and an experiment folder (moelab sweep) are
// each locked by the process that writes them, through an OS file lock (flock) on FOLDER/.lock.
// The kernel drops the lock when the process ends, however it ends (kill -9 included), so a lock
// never outlives its holder and nothing has to clean it up. The file also holds the holder's pid,
// so a refused second writer can say who holds the folder.
#pragma once
#include <sys/types.h>

#include <filesystem>
#include <optional>
#include <string>

namespace moelab {

class FolderLock {
 public:
  // Locks `dir` (which must exist). Throws moelab::Error naming the folder (`what` says which
  // kind, e.g. "run folder") and the holder's pid when another process holds it.
  static FolderLock acquire(const std::filesystem::path& dir, const std::string& what);
  // Non-throwing form: the lock, or nullopt with *holder_pid set (0 if the pid is unknown).
  static std::optional<FolderLock> try_acquire(const std::filesystem::path& dir, pid_t* holder_pid = nullptr);

  FolderLock(FolderLock&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  FolderLock& operator=(FolderLock&& o) noexcept;
  FolderLock(const FolderLock&) = delete;
  FolderLock& operator=(const FolderLock&) = delete;
  ~FolderLock() { release(); }

  // Whether a process holds dir's lock now, asked without taking it or writing anything (for
  // readers such as the report); nullopt when dir has no lock file (nothing ever locked it).
  static std::optional<bool> is_held(const std::filesystem::path& dir);
  void release();

  static constexpr const char* kFileName = ".lock";

 private:
  explicit FolderLock(int fd) : fd_(fd) {}
  int fd_ = -1;
};

}  // namespace moelab
