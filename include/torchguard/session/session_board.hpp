// The TensorBoard side of a TrainingSession (TrainingSessionOptions::tensorboard_dir): the
// scalars of log_metrics, and the run's start, failure and end as text under the tag "session".
//
// Resumed runs. A run resumed from the checkpoint of step S logs S + 1, S + 2, ... again. Each
// session writes one SessionLog START, at its first step (S + 1 after resume_metrics(S)), before
// anything else with a step: TensorBoard's Python readers then forget what earlier files hold at
// that step or later (the plugin accumulator of its server from the second START in a directory
// on; the scalar accumulator of scripts at every START). Its Rust data server drops, tag by tag,
// the records at or past a newer record's step, which the new scalars and texts are.
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <utility>

#include <spdlog/fmt/fmt.h>

#include "torchguard/core/metrics.hpp"
#include "torchguard/session/tensorboard.hpp"

namespace torchguard {
namespace detail {

class SessionBoard {
 public:
  SessionBoard(const std::filesystem::path& directory, std::string start_text)
      : writer_(directory), start_text_(std::move(start_text)) {}

  const std::filesystem::path& path() const noexcept { return writer_.path(); }

  void scalars(std::int64_t step, const Metrics& metrics) {
    begin(step, "");
    writer_.add_scalars(step, metrics);
    step_ = std::max(step_, step);
  }

  // The run goes on after the checkpoint of `step`: a START at step + 1 (a second one when
  // scalars came first), with a line that says so.
  void resume(std::int64_t step) {
    if (started_) writer_.session_start(step + 1);
    begin(step + 1, fmt::format("resumed from the checkpoint of step {}", step));
    step_ = step + 1;
  }

  // Text at the latest step (after the start line when none is written yet; no START, so that a
  // run that ends before its first step leaves the earlier runs' records alone).
  void text(std::string_view markdown) { write_text(step_, markdown); }

  void flush() { writer_.flush(); }
  void close() { writer_.close(); }

 private:
  void begin(std::int64_t step, std::string_view note) {
    if (!started_) {
      writer_.session_start(step);
      started_ = true;
    }
    if (!note.empty() || !start_written_) write_text(step, note);
  }

  // One record: TensorBoard's Rust server keeps one text per step and tag, the newest.
  void write_text(std::int64_t step, std::string_view markdown) {
    if (start_written_) {
      writer_.add_text("session", markdown, step);
      return;
    }
    std::string with_start = start_text_;
    if (!markdown.empty()) with_start += fmt::format("  \n{}", markdown);
    writer_.add_text("session", with_start, step, start_wall_time_);
    start_written_ = true;
  }

  TensorBoardWriter writer_;
  std::string start_text_;
  double start_wall_time_ = TensorBoardWriter::now();
  std::int64_t step_ = 0;       // the latest step written
  bool started_ = false;        // the session's START is written
  bool start_written_ = false;  // the start line is written
};

}  // namespace detail
}  // namespace torchguard
