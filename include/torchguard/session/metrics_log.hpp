// The JSON-lines metrics file of a TrainingSession: one object per call, appended and flushed,
// cut back to a step when a run resumes from a checkpoint older than the file's last row.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <system_error>

#include <nlohmann/json.hpp>

#include "torchguard/core/error.hpp"
#include "torchguard/core/outcome.hpp"

namespace torchguard {
namespace detail {

class MetricsLog {
 public:
  explicit MetricsLog(std::filesystem::path path) : path_(std::move(path)) {
    std::error_code ignored;  // like the log file, missing parent directories are created
    if (path_.has_parent_path()) std::filesystem::create_directories(path_.parent_path(), ignored);
    open();
  }

  const std::filesystem::path& path() const noexcept { return path_; }

  void append(const nlohmann::ordered_json& record) {
    stream_ << record.dump() << '\n';
    stream_.flush();
    if (!stream_) throw FileError("cannot write metrics to", path_, errno);
  }

  // Makes the rows written so far durable (fsync).
  void flush() {
    stream_.flush();
    const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw FileError("cannot open the metrics file", path_, errno);
    const int result = ::fsync(fd);
    const int error = errno;
    ::close(fd);
    if (result != 0) throw FileError("cannot fsync the metrics file", path_, error);
  }

  // Keeps the complete rows whose "step" is at most `step` and drops the rest (rows of a run
  // past the checkpoint it resumes from, a partial last row of a killed run). Atomic: the file is
  // rewritten beside itself and renamed. Returns the number of rows dropped.
  std::size_t cut_back_to(std::int64_t step) {
    stream_.close();
    std::ifstream in(path_);
    std::ostringstream kept;
    std::size_t dropped = 0;
    std::string line;
    while (std::getline(in, line)) {
      const bool complete = !in.eof();  // the last line of a killed writer has no newline
      const auto row = nlohmann::json::parse(line, nullptr, false);
      const auto found = row.is_object() ? row.find("step") : row.end();
      if (complete && row.is_object() && found != row.end() && found->is_number_integer() &&
          found->get<std::int64_t>() <= step) {
        kept << line << '\n';
      } else {
        ++dropped;
      }
    }
    in.close();
    if (dropped > 0) {
      const auto temporary = path_.string() + ".tmp";
      {
        std::ofstream out(temporary, std::ios::trunc);
        out << kept.str();
        out.flush();
        if (!out) throw FileError("cannot write", temporary, errno);
      }
      if (std::rename(temporary.c_str(), path_.c_str()) != 0) {
        throw FileError("cannot replace", path_, errno);
      }
    }
    open();
    return dropped;
  }

 private:
  void open() {
    stream_.open(path_, std::ios::out | std::ios::app);
    if (!stream_) throw FileError("cannot open the metrics file", path_, errno);
  }

  std::filesystem::path path_;
  std::ofstream stream_;
};

}  // namespace detail
}  // namespace torchguard
