// POSIX file helpers for crash-safe commits: write everything or fail with errno, fsync files
// and directories, and a streaming xxHash (XXH3-64) of what passes through.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include <spdlog/fmt/fmt.h>

#include "torchguard/core/error.hpp"

namespace torchguard {
namespace detail {

// Streaming XXH3-64 of the bytes given to update().
class Hasher {
 public:
  Hasher() : state_(XXH3_createState()) {
    if (!state_) throw std::bad_alloc();
    XXH3_64bits_reset(state_);
  }
  ~Hasher() { XXH3_freeState(state_); }
  Hasher(const Hasher&) = delete;
  Hasher& operator=(const Hasher&) = delete;
  void update(const void* data, std::size_t size) { XXH3_64bits_update(state_, data, size); }
  std::uint64_t digest() const { return XXH3_64bits_digest(state_); }

 private:
  XXH3_state_t* state_;
};

inline std::string hex64(std::uint64_t value) { return fmt::format("{:016x}", value); }

// Writes all `size` bytes to `fd`, through short writes and EINTR. Returns 0, or the errno of
// the write that failed (some of the bytes may be written then).
inline int write_all(int fd, const void* data, std::size_t size) noexcept {
  const char* bytes = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t written = ::write(fd, bytes, size);
    if (written < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    bytes += written;
    size -= static_cast<std::size_t>(written);
  }
  return 0;
}

// A file created for writing (it must not exist), hashed as it is written, fsynced on commit.
class DurableFile {
 public:
  explicit DurableFile(std::filesystem::path path) : path_(std::move(path)) {
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd_ < 0) throw FileError("cannot create", path_, errno);
  }
  ~DurableFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  DurableFile(const DurableFile&) = delete;
  DurableFile& operator=(const DurableFile&) = delete;

  void write(const void* data, std::size_t size) {
    hasher_.update(data, size);
    size_ += size;
    if (const int error = write_all(fd_, data, size)) throw FileError("cannot write", path_, error);
  }

  // fsync + close: after this the bytes are on disk, or an error says why not.
  void commit() {
    if (::fsync(fd_) != 0) throw FileError("cannot fsync", path_, errno);
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) throw FileError("cannot close", path_, errno);
  }

  std::uint64_t size() const noexcept { return size_; }
  std::uint64_t checksum() const { return hasher_.digest(); }

 private:
  std::filesystem::path path_;
  int fd_ = -1;
  std::uint64_t size_ = 0;
  Hasher hasher_;
};

// Makes a directory's entries (a rename, a new file) durable.
inline void fsync_directory(const std::filesystem::path& directory) {
  const int fd = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw FileError("cannot open directory", directory, errno);
  const int result = ::fsync(fd);
  const int error = errno;
  ::close(fd);
  if (result != 0) throw FileError("cannot fsync directory", directory, error);
}

// A file mapped read-only: checksummed and loaded from the page cache without a copy.
class MappedFile {
 public:
  explicit MappedFile(const std::filesystem::path& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw FileError("cannot open", path, errno);
    struct stat info {};
    if (::fstat(fd, &info) != 0) {
      const int error = errno;
      ::close(fd);
      throw FileError("cannot stat", path, error);
    }
    size_ = static_cast<std::size_t>(info.st_size);
    if (size_ > 0) {
      data_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (data_ == MAP_FAILED) {
        const int error = errno;
        ::close(fd);
        data_ = nullptr;
        throw FileError("cannot map", path, error);
      }
      ::madvise(data_, size_, MADV_SEQUENTIAL | MADV_WILLNEED);
    }
    ::close(fd);
  }
  ~MappedFile() {
    if (data_) ::munmap(data_, size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  std::string_view bytes() const noexcept { return {static_cast<const char*>(data_), size_}; }

 private:
  void* data_ = nullptr;
  std::size_t size_ = 0;
};

// Reads a whole file into memory.
inline std::string read_whole_file(const std::filesystem::path& path) {
  return std::string(MappedFile(path).bytes());
}

inline std::uint64_t checksum_of(std::string_view bytes) {
  return XXH3_64bits(bytes.data(), bytes.size());
}

}  // namespace detail
}  // namespace torchguard
