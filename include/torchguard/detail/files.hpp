// POSIX file helpers for crash-safe commits: write everything or fail with errno, fsync files
// and directories, read with pread (never a mapping: an I/O error is an exception, not SIGBUS),
// and a streaming xxHash (XXH3-64) of what passes through.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>

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
// the write that failed (some of the bytes may be written then): ENOSPC for a write that wrote
// nothing, ECANCELED for one interrupted (EINTR) once `stop` says so, since a write that hangs
// until a signal comes (a network file system mounted `intr`) would otherwise hang again.
inline int write_all(int fd, const void* data, std::size_t size,
                     const std::function<bool()>& stop = {}) noexcept {
  const char* bytes = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t written = ::write(fd, bytes, size);
    if (written < 0) {
      if (errno != EINTR) return errno;
      try {
        if (stop && stop()) return ECANCELED;
      } catch (...) {
        return ECANCELED;
      }
      continue;
    }
    // Nothing written and no error: some FUSE and network file systems say "full" this way.
    // SQLite reads it as a full disk too; counted as progress it would loop for ever.
    if (written == 0) return ENOSPC;
    bytes += written;
    size -= static_cast<std::size_t>(written);
  }
  return 0;
}

// How DurableFile writes a large file. The defaults are the choices bench_checkpoint measured best
// (docs/measured.md, "Checkpoints in the training loop"); the bench sets the others one at a time,
// to measure each alone. Read when a file is opened (and by the background writer per save).
struct WriteTuning {
  // Hash and write a chunk at a time, while the chunk is still in the cache: one pass over the
  // source instead of two. 0: hash the whole buffer, then write it.
  std::size_t chunk = std::size_t{1} << 20;
  // Start the writeback of each window as soon as it is written, and drop the window before it
  // from the page cache (sync_file_range + posix_fadvise(DONTNEED)): no dirty pages pile up.
  bool drop_behind = false;
  // O_DIRECT through an aligned bounce buffer, the bytes hashed as they are copied into it: no
  // page cache at all. Falls back to buffered writes where the file system refuses O_DIRECT.
  bool direct = true;
  // The background writer thread's nice value (0: as the process).
  int writer_nice = 0;
  // An upper bound on the write rate, in bytes per second (0: none).
  double pace_bytes_per_s = 0;
};

inline WriteTuning& write_tuning() {
  static WriteTuning tuning;
  return tuning;
}

// A file created for writing (it must not exist), hashed as it is written, fsynced on commit.
class DurableFile {
 public:
  // `stop`: see write_all.
  explicit DurableFile(std::filesystem::path path, std::function<bool()> stop = {})
      : path_(std::move(path)), stop_(std::move(stop)), tuning_(write_tuning()) {
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd_ < 0) throw FileError("cannot create", path_, errno);
    undecided_ = tuning_.direct;
    started_ = std::chrono::steady_clock::now();
  }
  ~DurableFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  DurableFile(const DurableFile&) = delete;
  DurableFile& operator=(const DurableFile&) = delete;

  void write(const void* data, std::size_t size) {
    const char* bytes = static_cast<const char*>(data);
    if (undecided_) {
      // A small file (a manifest, a header) is written as it is: O_DIRECT only pays for itself
      // on large ones. Its bytes wait here until the file is known to be large.
      if (size_ + size <= direct_threshold) {
        small_.append(bytes, size);
        size_ += size;
        return;
      }
      start_direct();
    }
    put(bytes, size);
  }

  // fsync + close: after this the bytes are on disk, or an error says why not.
  void commit() {
    if (undecided_) {  // a small file
      undecided_ = false;
      size_ -= small_.size();
      put(small_.data(), small_.size());
    }
    if (bounce_ && filled_ > 0) {  // the last block, padded, then cut back to the file's size
      const std::size_t padded =
          (filled_ + direct_alignment - 1) / direct_alignment * direct_alignment;
      std::memset(bounce_.get() + filled_, 0, padded - filled_);
      write_through(bounce_.get(), padded);
      filled_ = 0;
      if (::ftruncate(fd_, static_cast<off_t>(size_)) != 0) {
        throw FileError("cannot truncate", path_, errno);
      }
    }
    if (::fsync(fd_) != 0) throw FileError("cannot fsync", path_, errno);
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) throw FileError("cannot close", path_, errno);
  }

  std::uint64_t size() const noexcept { return size_; }
  std::uint64_t checksum() const { return hasher_.digest(); }
  // True once the file is written with O_DIRECT.
  bool direct() const noexcept { return bounce_ != nullptr; }

 private:
  static constexpr std::size_t direct_alignment = 4096;
  static constexpr std::size_t bounce_size = std::size_t{4} << 20;
  static constexpr std::size_t direct_threshold = std::size_t{1} << 20;
  static constexpr std::uint64_t drop_window = std::uint64_t{8} << 20;

  // The file is large: O_DIRECT from here on (where the file system takes it), starting with
  // the bytes held back so far.
  void start_direct() {
    undecided_ = false;
    const int flags = ::fcntl(fd_, F_GETFL);
    if (flags >= 0 && ::fcntl(fd_, F_SETFL, flags | O_DIRECT) == 0) {
      bounce_.reset(static_cast<char*>(std::aligned_alloc(direct_alignment, bounce_size)));
      if (!bounce_) throw std::bad_alloc();
    }  // else tmpfs and others: buffered
    const std::string held = std::move(small_);
    size_ -= held.size();
    put(held.data(), held.size());
  }

  // Hashes and writes, a chunk at a time.
  void put(const char* bytes, std::size_t size) {
    const std::size_t chunk = tuning_.chunk ? tuning_.chunk : std::max<std::size_t>(size, 1);
    while (size > 0) {
      const std::size_t n = std::min(chunk, size);
      if (bounce_) {
        to_bounce(bytes, n);
      } else {
        hasher_.update(bytes, n);
        write_through(bytes, n);
      }
      size_ += n;
      bytes += n;
      size -= n;
      after_write();
    }
  }

  // O_DIRECT: copies into the bounce buffer, hashing each piece while it is in the cache, and
  // writes the buffer whenever it is full.
  void to_bounce(const char* bytes, std::size_t size) {
    constexpr std::size_t piece = std::size_t{256} << 10;
    while (size > 0) {
      const std::size_t n = std::min({piece, size, bounce_size - filled_});
      std::memcpy(bounce_.get() + filled_, bytes, n);
      hasher_.update(bounce_.get() + filled_, n);
      filled_ += n;
      bytes += n;
      size -= n;
      if (filled_ == bounce_size) {
        write_through(bounce_.get(), bounce_size);
        filled_ = 0;
      }
    }
  }

  void write_through(const char* bytes, std::size_t size) {
    int error = write_all(fd_, bytes, size, stop_);
    if (error == EINVAL && bounce_) {
      // O_DIRECT refused after all (or a short write left the offset unaligned): the rest buffered.
      const off_t at = ::lseek(fd_, 0, SEEK_CUR);
      const int flags = ::fcntl(fd_, F_GETFL);
      if (at >= 0 && flags >= 0 && ::fcntl(fd_, F_SETFL, flags & ~O_DIRECT) == 0) {
        const std::size_t done = static_cast<std::size_t>(at) - written_;
        error = write_all(fd_, bytes + done, size - done, stop_);
      }
    }
    if (error) {
      if (error == ECANCELED) {
        throw FileError("cannot write", path_,
                        "a stop was requested while the write was interrupted (EINTR): abandoned",
                        error);
      }
      throw FileError("cannot write", path_, error);
    }
    written_ += size;
  }

  void after_write() {
    if (tuning_.drop_behind && !bounce_ && size_ - window_start_ >= drop_window) {
      const auto at = static_cast<off64_t>(window_start_);
      const auto length = static_cast<off64_t>(size_ - window_start_);
      ::sync_file_range(fd_, at, length, SYNC_FILE_RANGE_WRITE);  // start it, do not wait
      if (window_start_ > 0) {  // the window before: wait for it, then let the cache drop it
        const auto before = static_cast<off64_t>(previous_window_);
        ::sync_file_range(
            fd_, before, at - before,
            SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
        ::posix_fadvise(fd_, before, at - before, POSIX_FADV_DONTNEED);
      }
      previous_window_ = window_start_;
      window_start_ = size_;
    }
    if (tuning_.pace_bytes_per_s > 0) {
      std::this_thread::sleep_until(started_ +
                                    std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                        std::chrono::duration<double>(static_cast<double>(size_) /
                                                                      tuning_.pace_bytes_per_s)));
    }
  }

  struct Free {
    void operator()(char* p) const noexcept { std::free(p); }
  };
  std::filesystem::path path_;
  std::function<bool()> stop_;
  WriteTuning tuning_;
  int fd_ = -1;
  std::uint64_t size_ = 0;     // bytes given to write()
  std::uint64_t written_ = 0;  // bytes written to the file
  Hasher hasher_;
  bool undecided_ = false;              // O_DIRECT wanted, the file's size not known yet
  std::string small_;                   // ... and its bytes so far
  std::unique_ptr<char, Free> bounce_;  // O_DIRECT only
  std::size_t filled_ = 0;
  std::uint64_t window_start_ = 0;     // drop_behind: the window being written
  std::uint64_t previous_window_ = 0;  // ... and the one before it
  std::chrono::steady_clock::time_point started_;
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

// Writes `write(out)` to `path` crash-safely: a temporary beside it, fsync, rename over `path`,
// fsync of the directory. A failure leaves `path` as it was. Throws FileError.
template <class Write>
void write_file_atomically(const std::filesystem::path& path, Write&& write) {
  const std::filesystem::path directory =
      path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  const std::filesystem::path temporary =
      directory / fmt::format(".tmp-{}-{}", path.filename().string(), ::getpid());
  try {
    DurableFile out(temporary);
    write(out);
    out.commit();
    if (::rename(temporary.c_str(), path.c_str()) != 0) {
      throw FileError("cannot rename a temporary file to", path, errno);
    }
    fsync_directory(directory);
  } catch (...) {
    std::error_code ignored;
    std::filesystem::remove(temporary, ignored);
    throw;
  }
}

// A file opened for reading with pread(2), never mapped: an I/O error (a failing disk, a network
// file system, a file truncated while it is read) is a FileError naming the file, where a read
// through a mapping would kill the process with SIGBUS.
class InputFile {
 public:
  explicit InputFile(std::filesystem::path path) : path_(std::move(path)) {
    fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw FileError("cannot open", path_, errno);
    struct stat info {};
    if (::fstat(fd_, &info) != 0) {
      const int error = errno;
      ::close(fd_);
      throw FileError("cannot stat", path_, error);
    }
    size_ = static_cast<std::uint64_t>(info.st_size);
  }
  ~InputFile() { ::close(fd_); }
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;

  std::uint64_t size() const noexcept { return size_; }
  const std::filesystem::path& path() const noexcept { return path_; }

  // Reads exactly `size` bytes at `offset` into `out`, through short reads and EINTR. A file
  // that ends early (truncated since it was opened) is a FileError too.
  void read(std::uint64_t offset, void* out, std::size_t size) const {
    char* bytes = static_cast<char*>(out);
    while (size > 0) {
      const ssize_t got =
          ::pread(fd_, bytes, std::min<std::size_t>(size, 1u << 30), static_cast<off_t>(offset));
      if (got < 0) {
        if (errno == EINTR) continue;
        throw FileError("cannot read", path_, errno);
      }
      if (got == 0) {
        throw FileError("cannot read", path_,
                        fmt::format("it ends at byte {}, before the {} bytes it had when opened "
                                    "(truncated while read?)",
                                    offset, size_),
                        EIO);
      }
      bytes += got;
      offset += static_cast<std::uint64_t>(got);
      size -= static_cast<std::size_t>(got);
    }
  }

 private:
  std::filesystem::path path_;
  int fd_ = -1;
  std::uint64_t size_ = 0;
};

// A whole file read into memory (64-byte aligned, so that tensors may view it in place), and
// its XXH3-64 computed on the way, a chunk at a time while it is still in the cache.
class FileBytes {
 public:
  explicit FileBytes(const std::filesystem::path& path) {
    const InputFile file(path);
    size_ = static_cast<std::size_t>(file.size());
    data_.reset(static_cast<char*>(std::aligned_alloc(64, (size_ + 64) / 64 * 64)));
    if (!data_) throw std::bad_alloc();
    Hasher hasher;
    constexpr std::size_t chunk = std::size_t{8} << 20;
    for (std::size_t at = 0; at < size_; at += chunk) {
      const std::size_t n = std::min(chunk, size_ - at);
      file.read(at, data_.get() + at, n);
      hasher.update(data_.get() + at, n);
    }
    checksum_ = hasher.digest();
  }
  std::string_view bytes() const noexcept { return {data_.get(), size_}; }
  std::uint64_t checksum() const noexcept { return checksum_; }

 private:
  struct Free {
    void operator()(char* p) const noexcept { std::free(p); }
  };
  std::unique_ptr<char, Free> data_;
  std::size_t size_ = 0;
  std::uint64_t checksum_ = 0;
};

// Reads a whole file into memory. Throws FileError.
inline std::string read_whole_file(const std::filesystem::path& path) {
  const InputFile file(path);
  std::string text(static_cast<std::size_t>(file.size()), '\0');
  file.read(0, text.data(), text.size());
  return text;
}

inline std::uint64_t checksum_of(std::string_view bytes) {
  return XXH3_64bits(bytes.data(), bytes.size());
}

}  // namespace detail
}  // namespace torchguard
