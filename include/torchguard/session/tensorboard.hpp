// TensorBoardWriter: TensorBoard event files, written from C++ without TensorFlow or protobuf.
//
//   torchguard::TensorBoardWriter board("runs/exp1");  // a new events.out.tfevents.* file there
//   board.add_scalars(step, {{"loss", loss}, {"accuracy", accuracy}});
//   board.add_text("notes", "learning rate halved", step);
//
// Then `tensorboard --logdir runs`. Every call appends one record with one write(2), so a process
// killed at any moment (SIGKILL included) leaves every record of the calls that returned; a write
// that fails is cut off again, so the file stays readable. flush() makes the file durable
// (fsync). TrainingSession writes one when TrainingSessionOptions::tensorboard_dir is set.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include <spdlog/fmt/fmt.h>

#include "torchguard/core/error.hpp"
#include "torchguard/core/metrics.hpp"
#include "torchguard/detail/files.hpp"
#include "torchguard/session/tfrecord.hpp"

namespace torchguard {

class TensorBoardWriter {
 public:
  // Creates `directory` when missing, and a new event file in it whose name sorts after every
  // event file already there: TensorBoard reads a directory's files in name order, and a resumed
  // run's records must come after those of the run it resumes.
  explicit TensorBoardWriter(const std::filesystem::path& directory) {
    std::error_code error;
    std::filesystem::create_directories(directory, error);
    if (error)
      throw FileError("TensorBoard: cannot create the directory", directory, error.value());
    open_new_file(directory);
    // The first record: the format version TensorBoard checks before it honours session_start().
    write_event(detail::ProtoMessage()
                    .float64(1, now())
                    .bytes(3, "brain.Event:2")
                    .message(10, detail::ProtoMessage().bytes(1, "torchguard")));
  }

  TensorBoardWriter(TensorBoardWriter&& other) noexcept
      : path_(std::move(other.path_)),
        fd_(std::exchange(other.fd_, -1)),
        size_(std::exchange(other.size_, 0)) {}
  TensorBoardWriter& operator=(TensorBoardWriter&& other) noexcept {
    if (this != &other) {
      close_file();
      path_ = std::move(other.path_);
      fd_ = std::exchange(other.fd_, -1);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  ~TensorBoardWriter() { close_file(); }

  const std::filesystem::path& path() const noexcept { return path_; }

  // One event at `step` with a scalar per metric (the metric's name is its tag), as float32.
  void add_scalars(std::int64_t step, const Metrics& metrics,
                   std::optional<double> wall_time = std::nullopt) {
    detail::ProtoMessage summary;
    for (const auto& [tag, value] : metrics) {
      summary.message(
          1, detail::ProtoMessage().bytes(1, tag).float32(2, static_cast<float>(value.value())));
    }
    write_event(event(step, wall_time).message(5, summary));
  }

  void add_scalar(const std::string& tag, double value, std::int64_t step,
                  std::optional<double> wall_time = std::nullopt) {
    add_scalars(step, {{tag, value}}, wall_time);
  }

  // Markdown for TensorBoard's Text tab (its text plugin: a string tensor of shape [1]).
  void add_text(std::string_view tag, std::string_view markdown, std::int64_t step,
                std::optional<double> wall_time = std::nullopt) {
    const auto text_plugin = detail::ProtoMessage().message(
        1, detail::ProtoMessage().bytes(1, "text"));  // SummaryMetadata.plugin_data.plugin_name
    const auto tensor = detail::ProtoMessage()
                            .varint(1, 7)  // dtype: DT_STRING
                            .message(2, detail::ProtoMessage().message(
                                            2, detail::ProtoMessage().varint(1, 1)))  // shape [1]
                            .bytes(8, markdown);                                      // string_val
    const auto value =
        detail::ProtoMessage().bytes(1, tag).message(9, text_plugin).message(8, tensor);
    write_event(event(step, wall_time).message(5, detail::ProtoMessage().message(1, value)));
  }

  // A SessionLog START at `step`: TensorBoard forgets every record at `step` or later that came
  // before it, in this file or in earlier ones. A run resumed from the checkpoint of step S writes
  // it at S + 1, so that the steps the interrupted run logged past S are not shown twice.
  void session_start(std::int64_t step) {
    write_event(event(step, std::nullopt).message(7, detail::ProtoMessage().varint(1, 1)));
  }

  // Makes every record written so far durable (fsync). Records reach the file (and survive the
  // process) as each call returns; this is for a power loss.
  void flush() {
    if (::fsync(fd_) != 0) throw FileError("TensorBoard: cannot fsync", path_, errno);
  }

  // fsync, then close: what failed, as a FileError. Idempotent; the destructor closes quietly.
  void close() {
    if (fd_ < 0) return;
    const int fd = std::exchange(fd_, -1);
    const bool synced = ::fsync(fd) == 0;
    const int sync_error = errno;
    if (::close(fd) != 0) throw FileError("TensorBoard: cannot close", path_, errno);
    if (!synced) throw FileError("TensorBoard: cannot fsync", path_, sync_error);
  }

  // Seconds since the epoch: an event's wall time.
  static double now() {
    return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
        .count();
  }

 private:
  static detail::ProtoMessage event(std::int64_t step, std::optional<double> wall_time) {
    auto message = detail::ProtoMessage().float64(1, wall_time ? *wall_time : now());
    if (step != 0) message.varint(2, static_cast<std::uint64_t>(step));
    return message;
  }

  // Appends one record with one write. A failed or partial write is cut off again, so that the
  // records after it stay readable.
  void write_event(const detail::ProtoMessage& event) {
    const std::string record = detail::tfrecord(event.str());
    if (const int error = detail::write_all(fd_, record.data(), record.size())) {
      [[maybe_unused]] const int ignored = ::ftruncate(fd_, static_cast<off_t>(size_));
      throw FileError("TensorBoard: cannot write an event to", path_, error);
    }
    size_ += record.size();
  }

  // events.out.tfevents.<seconds, 10 digits>.<host>.<pid>, as PyTorch's SummaryWriter names them;
  // the seconds are moved past the greatest name already in `directory` when needed.
  void open_new_file(const std::filesystem::path& directory) {
    const std::string prefix = "events.out.tfevents.";
    std::string greatest;
    std::error_code error;
    for (const auto& entry : std::filesystem::directory_iterator(directory, error)) {
      const std::string name = entry.path().filename().string();
      if (name.rfind(prefix, 0) == 0 && name > greatest) greatest = name;
    }
    if (error) throw FileError("TensorBoard: cannot list", directory, error.value());
    auto seconds = static_cast<std::int64_t>(now());
    if (!greatest.empty()) {
      try {
        seconds = std::max<std::int64_t>(seconds, std::stoll(greatest.substr(prefix.size())) + 1);
      } catch (const std::exception&) {  // not a number: a foreign name, sorted as it is
      }
    }
    char host[256] = "localhost";
    ::gethostname(host, sizeof host - 1);
    for (int attempt = 0;; ++attempt, ++seconds) {
      path_ = directory / fmt::format("{}{:010d}.{}.{}", prefix, seconds, host, ::getpid());
      fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0644);
      if (fd_ >= 0) return;
      if (errno != EEXIST || attempt == 100) {
        throw FileError("TensorBoard: cannot create the event file", path_, errno);
      }
    }
  }

  void close_file() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  std::filesystem::path path_;
  int fd_ = -1;
  std::uint64_t size_ = 0;  // the bytes of the complete records written
};

}  // namespace torchguard
