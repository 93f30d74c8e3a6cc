// One run per checkpoint directory: the writing process holds an flock on <directory>/.lock for
// the guard's lifetime. The kernel releases it when the process ends, however it ends (SIGKILL
// included), so a lock is never stale. The file names the holder's pid for the message a second
// run gets.
#pragma once

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <string>
#include <utility>

#include <spdlog/fmt/fmt.h>

#include "torchguard/checkpoint/options.hpp"
#include "torchguard/core/error.hpp"

namespace torchguard {
namespace detail {

inline constexpr const char* lock_name = ".lock";

class DirectoryLock {
 public:
  explicit DirectoryLock(const std::filesystem::path& directory) : path_(directory / lock_name) {
    fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0 && (errno == EACCES || errno == EROFS)) {
      // A read-only directory still restores: lock an existing lock file read-only, or do without.
      fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd_ < 0) return;
    }
    if (fd_ < 0) throw FileError("CheckpointGuard: cannot open the lock file", path_, errno);
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      const int error = errno;
      const std::string holder = read_holder();
      ::close(fd_);
      fd_ = -1;
      if (error != EWOULDBLOCK) throw FileError("CheckpointGuard: cannot lock", path_, error);
      throw CheckpointError(fmt::format(
          "CheckpointGuard: the checkpoint directory '{}' is in use by another run ({}): two runs "
          "must not write one directory; wait for that run to end, or give this one another "
          "directory",
          directory.string(), holder.empty() ? "its pid is not recorded" : holder));
    }
    const std::string text = fmt::format("pid {}\n", ::getpid());
    if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, text.data(), text.size(), 0) < 0) {
      // The lock holds without the note; only a second run's message loses the pid.
    }
  }
  // False when the directory is read-only and had no lock file: nothing excludes another run.
  bool held() const noexcept { return fd_ >= 0; }
  const std::filesystem::path& path() const noexcept { return path_; }

  ~DirectoryLock() {
    if (fd_ >= 0) ::close(fd_);  // releases the lock
  }
  DirectoryLock(DirectoryLock&& other) noexcept
      : path_(std::move(other.path_)), fd_(std::exchange(other.fd_, -1)) {}
  DirectoryLock& operator=(DirectoryLock&&) = delete;
  DirectoryLock(const DirectoryLock&) = delete;

 private:
  std::string read_holder() const {
    char buffer[64] = {};
    const ssize_t read = ::pread(fd_, buffer, sizeof buffer - 1, 0);
    std::string text(buffer, read > 0 ? static_cast<std::size_t>(read) : 0);
    while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
    return text;
  }

  std::filesystem::path path_;
  int fd_ = -1;
};

}  // namespace detail
}  // namespace torchguard
