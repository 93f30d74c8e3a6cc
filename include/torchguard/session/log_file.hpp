// The log file of a TrainingSession: an spdlog sink that writes each line with one write(2) to a
// file opened for appending, so that a line reaches the file as it is logged (a crash loses
// none), and keeps the first write error for close() to report (spdlog itself would only print
// it). A write that writes nothing is an error too (detail::write_all), never a loop.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <mutex>
#include <optional>
#include <string>

#include <spdlog/sinks/base_sink.h>
#include <spdlog/spdlog.h>

#include "torchguard/core/error.hpp"
#include "torchguard/detail/files.hpp"

namespace torchguard {
namespace detail {

class LogFileSink final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  // Throws FileError when the file cannot be opened.
  explicit LogFileSink(std::filesystem::path path) : path_(std::move(path)) {
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd_ < 0) throw FileError("TrainingSession: cannot open the log file", path_, errno);
  }
  ~LogFileSink() override {
    if (fd_ >= 0) ::close(fd_);
  }
  LogFileSink(const LogFileSink&) = delete;
  LogFileSink& operator=(const LogFileSink&) = delete;

  // fsync, then close: the first error of the file's life, if any, as a FileError.
  void close() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (fd_ >= 0) {
      if (::fsync(fd_) != 0) keep(FileError("cannot fsync the log file", path_, errno));
      const int fd = fd_;
      fd_ = -1;
      if (::close(fd) != 0) keep(FileError("cannot close the log file", path_, errno));
    }
    if (error_) throw *error_;
  }
  // Makes the lines written so far durable.
  void sync() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (fd_ >= 0 && ::fsync(fd_) != 0) {
      keep(FileError("cannot fsync the log file", path_, errno));
      throw *error_;
    }
  }

 protected:
  void sink_it_(const spdlog::details::log_msg& message) override {
    if (fd_ < 0) return;
    spdlog::memory_buf_t formatted;
    formatter_->format(message, formatted);
    if (const int error = write_all(fd_, formatted.data(), formatted.size())) {
      keep(FileError("cannot write the log file", path_, error));
    }
  }
  void flush_() override {}  // every line is written as it is logged

 private:
  void keep(FileError error) {
    if (!error_) error_ = std::move(error);
  }

  std::filesystem::path path_;
  int fd_ = -1;
  std::optional<FileError> error_;
};

}  // namespace detail
}  // namespace torchguard
