// flock-based folder lock (see folder_lock.hpp).
#include "core/folder_lock.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "core/error.hpp"

namespace moelab {

std::optional<bool> FolderLock::is_held(const std::filesystem::path& dir) {
  const std::string path = (dir / kFileName).string();
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  const bool held = ::flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
  ::close(fd);  // drops the shared lock if it was taken
  return held;
}

std::optional<FolderLock> FolderLock::try_acquire(const std::filesystem::path& dir, pid_t* holder_pid) {
  const std::string path = (dir / kFileName).string();
  // O_CLOEXEC: children started by the holder (a sweep's trainers) must not inherit its lock.
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) throw Error("cannot open lock file '" + path + "': " + std::strerror(errno) + "; check that the folder is writable");
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int err = errno;
    if (holder_pid) {
      char buf[32] = {};
      ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
      *holder_pid = n > 0 ? pid_t(std::atol(buf)) : 0;
    }
    ::close(fd);
    if (err != EWOULDBLOCK) throw Error("cannot lock '" + path + "': " + std::strerror(err));
    return std::nullopt;
  }
  // Ours now: record our pid for whoever is refused next.
  std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) != ssize_t(pid.size())) {
    // The lock holds without the pid; a refused writer then reports the pid as unknown.
  }
  return FolderLock(fd);
}

FolderLock FolderLock::acquire(const std::filesystem::path& dir, const std::string& what) {
  pid_t holder = 0;
  auto lock = try_acquire(dir, &holder);
  if (!lock)
    throw Error(what + " " + dir.string() + " is in use by another process (pid " +
                (holder > 0 ? std::to_string(holder) : std::string("unknown")) +
                "), which holds its lock; wait for it to end or choose another folder");
  return std::move(*lock);
}

FolderLock& FolderLock::operator=(FolderLock&& o) noexcept {
  if (this != &o) {
    release();
    fd_ = o.fd_;
    o.fd_ = -1;
  }
  return *this;
}

void FolderLock::release() {
  if (fd_ >= 0) ::close(fd_);  // closing the last descriptor drops the flock
  fd_ = -1;
}

}  // namespace moelab
