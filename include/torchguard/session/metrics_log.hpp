// The JSON-lines metrics file of a TrainingSession: one object per call, appended with one
// write(2) (a write that writes nothing is an error, never a loop), cut back to a step when a run
// resumes from a checkpoint older than the file's last row.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <sstream>
#include <string>
#include <system_error>

#include <nlohmann/json.hpp>

#include "torchguard/core/error.hpp"
#include "torchguard/core/outcome.hpp"
#include "torchguard/detail/files.hpp"

namespace torchguard {
namespace detail {

class MetricsLog {
 public:
  explicit MetricsLog(std::filesystem::path path) : path_(std::move(path)) {
    std::error_code ignored;  // like the log file, missing parent directories are created
    if (path_.has_parent_path()) std::filesystem::create_directories(path_.parent_path(), ignored);
    open();
  }
  ~MetricsLog() {
    if (fd_ >= 0) ::close(fd_);
  }
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;

  const std::filesystem::path& path() const noexcept { return path_; }

  // One row, with one write(2): it reaches the file as this returns. Throws FileError.
  void append(const nlohmann::ordered_json& record) {
    const std::string line = record.dump() + '\n';
    if (const int error = write_all(fd_, line.data(), line.size())) {
      throw FileError("cannot write metrics to", path_, error);
    }
  }

  // Makes the rows written so far durable (fsync).
  void flush() {
    if (::fsync(fd_) != 0) throw FileError("cannot fsync the metrics file", path_, errno);
  }

  // fsync, then close. Throws FileError.
  void close() {
    if (fd_ < 0) return;
    flush();
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) throw FileError("cannot close the metrics file", path_, errno);
  }

  // Keeps the complete rows whose "step" is at most `step` and drops the rest (rows of a run
  // past the checkpoint it resumes from, a partial last row of a killed run). Atomic: the file is
  // rewritten beside itself and renamed. Returns the number of rows dropped.
  std::size_t cut_back_to(std::int64_t step) {
    std::istringstream in(read_whole_file(path_));
    std::string kept;
    std::size_t dropped = 0;
    std::string line;
    while (std::getline(in, line)) {
      const bool complete = !in.eof();  // the last line of a killed writer has no newline
      const auto row = nlohmann::json::parse(line, nullptr, false);
      const auto found = row.is_object() ? row.find("step") : row.end();
      if (complete && row.is_object() && found != row.end() && found->is_number_integer() &&
          found->get<std::int64_t>() <= step) {
        kept += line + '\n';
      } else {
        ++dropped;
      }
    }
    if (dropped > 0) {
      write_file_atomically(path_, [&](auto& out) { out.write(kept.data(), kept.size()); });
      ::close(fd_);
      fd_ = -1;
      open();
    }
    return dropped;
  }

 private:
  void open() {
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd_ < 0) throw FileError("cannot open the metrics file", path_, errno);
  }

  std::filesystem::path path_;
  int fd_ = -1;
};

}  // namespace detail
}  // namespace torchguard
