// One run per directory: a process that writes a directory (a TrainingSession its run directory,
// a CheckpointGuard its checkpoints) holds an flock on <directory>/.lock while it does. The
// kernel releases it when the process ends, however it ends (SIGKILL included), so a lock is
// never stale. The file names the holder's pid for the message a second run gets. Within one
// process, locks on the same directory share one flock (a session and a guard may write the same
// directory).
#pragma once

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <utility>

#include <spdlog/fmt/fmt.h>

#include "torchguard/core/error.hpp"

namespace torchguard {

// Another run holds the directory this one would write.
class DirectoryInUseError : public Error {
 public:
  using Error::Error;
};

namespace detail {

inline constexpr const char* lock_name = ".lock";

class DirectoryLock {
 public:
  // Locks `directory` (which must exist) for this process. `who` starts the error's message
  // ("CheckpointGuard: the checkpoint directory"). Throws DirectoryInUseError when another
  // process holds it, FileError when the lock file cannot be opened for another reason. A
  // read-only directory without a lock file is not locked (held() is false).
  DirectoryLock(const std::filesystem::path& directory, const std::string& who)
      : path_(directory / lock_name) {
    std::error_code error;
    // The pid too: a child made by fork() inherits the registry, not the lock.
    const auto key =
        fmt::format("{}:{}", ::getpid(), std::filesystem::weakly_canonical(path_, error).string());
    std::lock_guard<std::mutex> guard(registry_mutex());
    auto& held = registry()[key];
    held_ = held.lock();
    if (held_) return;  // this process holds it already
    held_ = std::make_shared<Held>(path_, directory, who);
    held = held_;
  }

  // False when the directory is read-only and had no lock file: nothing excludes another run.
  bool held() const noexcept { return held_ && held_->fd >= 0; }
  const std::filesystem::path& path() const noexcept { return path_; }

 private:
  struct Held {
    Held(const std::filesystem::path& path, const std::filesystem::path& directory,
         const std::string& who) {
      fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
      if (fd < 0 && (errno == EACCES || errno == EROFS)) {
        // A read-only directory still restores: lock an existing lock file read-only, or do
        // without.
        fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) return;
      }
      if (fd < 0) throw FileError(fmt::format("{}: cannot open the lock file", who), path, errno);
      if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
        const int error = errno;
        const std::string holder = read_holder();
        ::close(fd);
        fd = -1;
        if (error != EWOULDBLOCK) throw FileError(fmt::format("{}: cannot lock", who), path, error);
        throw DirectoryInUseError(fmt::format(
            "{} '{}' is in use by another run ({}): two runs must not write one directory; wait "
            "for that run to end, or give this one another directory",
            who, directory.string(), holder.empty() ? "its pid is not recorded" : holder));
      }
      const std::string text = fmt::format("pid {}\n", ::getpid());
      if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, text.data(), text.size(), 0) < 0) {
        // The lock holds without the note; only a second run's message loses the pid.
      }
    }
    ~Held() {
      if (fd >= 0) ::close(fd);  // releases the lock
    }
    Held(const Held&) = delete;
    Held& operator=(const Held&) = delete;

    std::string read_holder() const {
      char buffer[64] = {};
      const ssize_t read = ::pread(fd, buffer, sizeof buffer - 1, 0);
      std::string text(buffer, read > 0 ? static_cast<std::size_t>(read) : 0);
      while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
      return text;
    }

    int fd = -1;
  };

  static std::mutex& registry_mutex() {
    static std::mutex mutex;
    return mutex;
  }
  static std::map<std::string, std::weak_ptr<Held>>& registry() {
    static std::map<std::string, std::weak_ptr<Held>> held;
    return held;
  }

  std::filesystem::path path_;
  std::shared_ptr<Held> held_;
};

}  // namespace detail
}  // namespace torchguard
